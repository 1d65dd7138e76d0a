// The gpoe_fusion operator schemas. Device kernels are registered in cpu/fusion_cpu.cpp and
// cuda/fusion_cuda.cpp; fake (meta) and autograd kernels in Python (gpoe_fusion/ops.py).
#include <torch/library.h>

#include <string>

#include "cpu/fusion_cpu.h"
#include "cpu/output_cache.h"

namespace {

bool compiled_with_cuda() {
#if defined(WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cpu_capability() { return gpoe::cpu::capability_name(); }

int64_t cpu_cache_bytes() { return gpoe::cpu::output_cache_bytes(); }

int64_t clear_cpu_cache() { return gpoe::cpu::clear_output_cache(); }

}  // namespace

TORCH_LIBRARY(gpoe_fusion, m) {
  // joint_mu, joint_logvar [N, D] of experts mu, logvar [M, N, D]; logits [M, N or 1, D or 1]
  // (same dtype as mu); mask bool [M, N] (true = present); prior_expert adds N(0, I).
  m.def("fuse_forward(Tensor mu, Tensor logvar, Tensor? logits, Tensor? mask, bool prior_expert) -> (Tensor, Tensor)");
  // Gradients w.r.t. mu, logvar [M, N, D] and logits (shaped like logits), recomputed from the
  // inputs; an absent incoming gradient counts as zero. output_mask says which of the three to
  // compute; the others (and grad_logits without logits) come back as empty tensors.
  m.def(
      "fuse_backward(Tensor? grad_joint_mu, Tensor? grad_joint_logvar, Tensor mu, Tensor logvar, Tensor? logits, "
      "Tensor? mask, bool prior_expert, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Whether the extension was built with its CUDA kernels (so they must be registered).
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  // The instruction set of the CPU kernels in use ("AVX512", "AVX2" or "DEFAULT").
  m.def("cpu_capability() -> str", &cpu_capability);
  // The cache of released CPU output blocks (cpu/output_cache.h): bytes held, and freeing them.
  m.def("cpu_cache_bytes() -> int", &cpu_cache_bytes);
  m.def("clear_cpu_cache() -> int", &clear_cpu_cache);
}
