// The gpoe_fusion operator schemas, and the Python module `gpoe_fusion._C` that carries them
// (importing it runs the registrations below). Device kernels are registered in
// cpu/fusion_cpu.cpp and cuda/fusion_cuda.cpp; fake (meta) and autograd kernels in Python
// (gpoe_fusion/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/fusion_cpu.h"

namespace {

bool compiled_with_cuda() {
#if defined(WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cpu_capability() { return gpoe::cpu::capability_name(); }

// The CUDA architectures the kernels were compiled for, comma-separated: "sm_XY" for machine code,
// "compute_XY" for PTX (setup.py passes them as GPOE_CUDA_ARCHS); empty without CUDA.
#define GPOE_STRINGIFY(...) #__VA_ARGS__
#define GPOE_EXPAND_STRINGIFY(...) GPOE_STRINGIFY(__VA_ARGS__)
std::string cuda_architectures() {
#if defined(WITH_CUDA) && defined(GPOE_CUDA_ARCHS)
  return GPOE_EXPAND_STRINGIFY(GPOE_CUDA_ARCHS);
#else
  return "";
#endif
}

// Raised whenever the operator schemas or their meaning change; gpoe_fusion/ops.py refuses a
// build whose number differs from its own (a stale build left from an earlier version).
int64_t interface_version() { return 4; }

}  // namespace

TORCH_LIBRARY(gpoe_fusion, m) {
  // joint_mu, joint_logvar [N, D] of experts mu, logvar [M, N, D]; logits [M, N or 1, D or 1]
  // (same dtype as mu); mask bool [M, N] (true = present); prior_expert adds N(0, I).
  // return_weights: the third output is every expert's weight [M, N, D] (alpha with logits, the
  // share of the joint precision without; 0 when masked), else an empty tensor.
  m.def(
      "fuse_forward(Tensor mu, Tensor logvar, Tensor? logits, Tensor? mask, bool prior_expert, "
      "bool return_weights=False) -> (Tensor, Tensor, Tensor)");
  // Gradients w.r.t. mu, logvar [M, N, D] and logits (shaped like logits), recomputed from the
  // inputs; an absent incoming gradient (of joint_mu, joint_logvar [N, D] or of the weights
  // [M, N, D]) counts as zero. output_mask says which of the three to compute; the others (and
  // grad_logits without logits) come back as empty tensors.
  m.def(
      "fuse_backward(Tensor? grad_joint_mu, Tensor? grad_joint_logvar, Tensor? grad_weights, Tensor mu, "
      "Tensor logvar, Tensor? logits, Tensor? mask, bool prior_expert, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // MoPoE: the product (gPoE with logits, alpha renormalised over the members) of every non-empty
  // subset of the M <= 8 experts, [S = 2^M - 1, N, D]; component c holds the experts whose bit is
  // set in c + 1. logits [M, N, D] or none. A subset with a masked member gives zeros (it is not a
  // component of that row).
  m.def("mopoe_forward(Tensor mu, Tensor logvar, Tensor? logits, Tensor? mask, bool prior_expert) -> (Tensor, Tensor)");
  // Gradients w.r.t. mu, logvar, logits [M, N, D] of the incoming [S, N, D] gradients, as fuse_backward.
  m.def(
      "mopoe_backward(Tensor? grad_joint_mu, Tensor? grad_joint_logvar, Tensor mu, Tensor logvar, Tensor? logits, "
      "Tensor? mask, bool prior_expert, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Whether the extension was built with its CUDA kernels (so they must be registered).
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  // The instruction set of the CPU kernels in use ("AVX512", "AVX2" or "DEFAULT").
  m.def("cpu_capability() -> str", &cpu_capability);
  // The CUDA architectures of the kernels ("sm_90,compute_90"; empty without CUDA).
  m.def("cuda_architectures() -> str", &cuda_architectures);
  m.def("interface_version() -> int", &interface_version);
}

// An empty Python module: `from gpoe_fusion import _C` finds exactly this package's build by
// Python's own import rules and runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "gpoe_fusion's compiled operators", -1, nullptr};
  return PyModule_Create(&module);
}
