// CPU implementations of gpoe_fusion::fuse_forward / fuse_backward: argument checks, the split
// of the rows into parallel chunks, the choice of instruction set, and the final reduction of
// broadcast logits' gradients.
#include "cpu/fusion_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include "cpu/fusion_cpu_kernels.h"
#include "fusion_host.h"

namespace gpoe::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa pick_isa() {
  const std::string aten = at::get_cpu_capability();
#if defined(GPOE_CPU_AVX512)
  if (aten == "AVX512") return Isa::kAvx512;
#endif
#if defined(GPOE_CPU_AVX2)
  if (aten == "AVX512" || aten == "AVX2") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

// The row kernels of one instruction set (cpu/fusion_cpu_kernels.h).
struct RowKernels {
  decltype(&DEFAULT::fuse_forward_rows) fuse_forward;
  decltype(&DEFAULT::fuse_backward_rows) fuse_backward;
  decltype(&DEFAULT::mopoe_forward_rows) mopoe_forward;
  decltype(&DEFAULT::mopoe_backward_rows) mopoe_backward;
};

#define GPOE_ROW_KERNELS(NS) \
  RowKernels { &NS::fuse_forward_rows, &NS::fuse_backward_rows, &NS::mopoe_forward_rows, &NS::mopoe_backward_rows }

const RowKernels& kernels() {
  static const RowKernels chosen = [] {
    switch (isa()) {
#if defined(GPOE_CPU_AVX512)
      case Isa::kAvx512: return GPOE_ROW_KERNELS(AVX512);
#endif
#if defined(GPOE_CPU_AVX2)
      case Isa::kAvx2: return GPOE_ROW_KERNELS(AVX2);
#endif
      default: return GPOE_ROW_KERNELS(DEFAULT);
    }
  }();
  return chosen;
}

#undef GPOE_ROW_KERNELS

// Rows are split into `chunks` equal ranges: several per thread (load balance), each holding at
// least ~16k expert elements (threading overhead), and a fixed function of the shape and thread
// count, so reductions over chunks are deterministic.
int64_t chunk_count(const FuseArgs& a) {
  const int64_t work = a.m * a.n * a.d;
  const int64_t by_work = std::max<int64_t>(1, work / (int64_t{1} << 14));
  return std::max<int64_t>(1, std::min({a.n, by_work, int64_t{8} * at::get_num_threads()}));
}

// Runs f(chunk, first_row, end_row) for every chunk. Threads take chunks from a shared counter
// rather than a fixed share: on a machine whose cores are also busy with other work, a thread
// that gets less CPU time takes fewer chunks instead of holding up the others.
template <class F>
void for_each_chunk(const FuseArgs& a, int64_t chunks, const F& f) {
  const int64_t rows = (a.n + chunks - 1) / chunks;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      f(c, c * rows, std::min(a.n, (c + 1) * rows));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                                const std::optional<at::Tensor>& logits,
                                                                const std::optional<at::Tensor>& mask,
                                                                bool prior_expert, bool return_weights) {
  const PreparedInputs in = prepare_inputs("fuse_forward", c10::DeviceType::CPU, mu, logvar, logits, mask, prior_expert);
  ForwardOut out;
  auto outputs = allocate_forward(in, return_weights, out);
  if (in.args.n > 0 && in.args.d > 0) {
    for_each_chunk(in.args, chunk_count(in.args),
                   [&](int64_t, int64_t begin, int64_t end) { kernels().fuse_forward(in.args, out, begin, end); });
  }
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_backward_cpu(
    const std::optional<at::Tensor>& grad_joint_mu, const std::optional<at::Tensor>& grad_joint_logvar,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& mask, bool prior_expert,
    std::array<bool, 3> output_mask) {
  const PreparedInputs in = prepare_inputs("fuse_backward", c10::DeviceType::CPU, mu, logvar, logits, mask, prior_expert);
  PreparedGrads g = prepare_grads("fuse_backward", in, grad_joint_mu, grad_joint_logvar, grad_weights);
  auto grads = allocate_backward(in, output_mask, g.args);
  const FuseArgs& a = in.args;
  const int64_t chunks = chunk_count(a);

  // Broadcast logits: the kernels leave partial sums (layouts in fusion_cpu_kernels.h).
  const bool reduced = output_mask[2] && in.logits.defined() && a.logit_reduce != LogitReduce::kNone;
  at::Tensor partial;
  if (reduced) {
    const auto options = in.mu.options().dtype(accumulation_type(in));
    switch (a.logit_reduce) {
      case LogitReduce::kRows: partial = at::zeros({chunks, a.m, a.d}, options); break;
      case LogitReduce::kDims: partial = at::zeros({a.m, a.n}, options); break;
      default: partial = at::zeros({chunks, a.m}, options); break;
    }
    g.args.grad_logits = partial.data_ptr();
  }
  if (a.n > 0 && a.d > 0) {
    for_each_chunk(a, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      kernels().fuse_backward(a, g.args, chunk, begin, end);
    });
  }
  if (reduced) {
    const auto dtype = in.mu.scalar_type();
    switch (a.logit_reduce) {
      case LogitReduce::kRows: grads[2] = partial.sum(0).view({a.m, 1, a.d}).to(dtype); break;
      case LogitReduce::kDims: grads[2] = partial.view({a.m, a.n, 1}).to(dtype); break;
      default: grads[2] = partial.sum(0).view({a.m, 1, 1}).to(dtype); break;
    }
  }
  return {grads[0], grads[1], grads[2]};
}

// MoPoE's two passes: every subset's product, and the gradients summed over the subsets.
std::tuple<at::Tensor, at::Tensor> mopoe_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                     const std::optional<at::Tensor>& logits,
                                                     const std::optional<at::Tensor>& mask, bool prior_expert) {
  const PreparedInputs in = prepare_inputs("mopoe_forward", c10::DeviceType::CPU, mu, logvar, logits, mask, prior_expert);
  check_subsets("mopoe_forward", in);
  ForwardOut out;
  auto joint = allocate_subsets(in, out);
  if (in.args.n > 0 && in.args.d > 0) {
    for_each_chunk(in.args, chunk_count(in.args), [&](int64_t, int64_t begin, int64_t end) {
      kernels().mopoe_forward(in.args, out, begin, end);
    });
  }
  return {joint[0], joint[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mopoe_backward_cpu(
    const std::optional<at::Tensor>& grad_joint_mu, const std::optional<at::Tensor>& grad_joint_logvar,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& logits,
    const std::optional<at::Tensor>& mask, bool prior_expert, std::array<bool, 3> output_mask) {
  const PreparedInputs in = prepare_inputs("mopoe_backward", c10::DeviceType::CPU, mu, logvar, logits, mask, prior_expert);
  check_subsets("mopoe_backward", in);
  const int64_t components = (int64_t{1} << in.args.m) - 1;
  PreparedGrads g = prepare_grads("mopoe_backward", in, grad_joint_mu, grad_joint_logvar, std::nullopt, components);
  auto grads = allocate_backward(in, output_mask, g.args);
  if (in.args.n > 0 && in.args.d > 0) {
    for_each_chunk(in.args, chunk_count(in.args), [&](int64_t, int64_t begin, int64_t end) {
      kernels().mopoe_backward(in.args, g.args, begin, end);
    });
  }
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

std::string capability_name() {
  switch (isa()) {
    case Isa::kAvx512: return "AVX512";
    case Isa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace gpoe::cpu

TORCH_LIBRARY_IMPL(gpoe_fusion, CPU, m) {
  m.impl("fuse_forward", &gpoe::cpu::fuse_forward_cpu);
  m.impl("fuse_backward", &gpoe::cpu::fuse_backward_cpu);
  m.impl("mopoe_forward", &gpoe::cpu::mopoe_forward_cpu);
  m.impl("mopoe_backward", &gpoe::cpu::mopoe_backward_cpu);
}
