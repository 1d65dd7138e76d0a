// CUDA implementations of gpoe_fusion::fuse_forward / fuse_backward: argument checks, device
// guard and stream, and the final reduction of broadcast logits' gradients.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cuda/fusion_cuda_kernels.h"
#include "fusion_host.h"

namespace gpoe::cuda {
namespace {

int multiprocessors(const at::Tensor& on) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, on.get_device()));
  return count;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                                                 const std::optional<at::Tensor>& logits,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 bool prior_expert, bool return_weights) {
  const PreparedInputs in =
      prepare_inputs("fuse_forward", c10::DeviceType::CUDA, mu, logvar, logits, mask, prior_expert);
  const c10::cuda::CUDAGuard guard(mu.device());
  ForwardOut out;
  auto outputs = allocate_forward(in, return_weights, out);
  if (in.args.n > 0 && in.args.d > 0) {
    fuse_forward(in.args, out, plan(in.args, multiprocessors(mu)), c10::cuda::getCurrentCUDAStream());
  }
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_backward_cuda(
    const std::optional<at::Tensor>& grad_joint_mu, const std::optional<at::Tensor>& grad_joint_logvar,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& mask, bool prior_expert,
    std::array<bool, 3> output_mask) {
  const PreparedInputs in =
      prepare_inputs("fuse_backward", c10::DeviceType::CUDA, mu, logvar, logits, mask, prior_expert);
  const c10::cuda::CUDAGuard guard(mu.device());
  PreparedGrads g = prepare_grads("fuse_backward", in, grad_joint_mu, grad_joint_logvar, grad_weights);
  auto grads = allocate_backward(in, output_mask, g.args);
  const FuseArgs& a = in.args;
  if (a.n == 0 || a.d == 0) {
    if (output_mask[2] && in.logits.defined()) grads[2] = at::zeros(in.logits.sizes(), in.logits.options());
    return {grads[0], grads[1], grads[2]};
  }
  const Plan p = plan(a, multiprocessors(mu));
  const bool reduced = output_mask[2] && in.logits.defined() && a.logit_reduce != LogitReduce::kNone;
  at::Tensor partial;
  if (reduced) {
    partial = at::zeros({p.partial_shape[0], p.partial_shape[1], p.partial_shape[2]},
                        in.mu.options().dtype(accumulation_type(in)));
  }
  fuse_backward(a, g.args, reduced ? partial.data_ptr() : nullptr, p, c10::cuda::getCurrentCUDAStream());
  if (reduced) {
    const auto dtype = in.mu.scalar_type();
    switch (a.logit_reduce) {
      case LogitReduce::kRows: grads[2] = partial.sum(0).view({a.m, 1, a.d}).to(dtype); break;
      case LogitReduce::kDims: grads[2] = partial.sum(0).view({a.m, a.n, 1}).to(dtype); break;
      default: grads[2] = partial.sum(at::IntArrayRef{0, 2}).view({a.m, 1, 1}).to(dtype); break;
    }
  }
  return {grads[0], grads[1], grads[2]};
}

std::tuple<at::Tensor, at::Tensor> mopoe_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                                      const std::optional<at::Tensor>& logits,
                                                      const std::optional<at::Tensor>& mask, bool prior_expert) {
  const PreparedInputs in =
      prepare_inputs("mopoe_forward", c10::DeviceType::CUDA, mu, logvar, logits, mask, prior_expert);
  check_subsets("mopoe_forward", in);
  const c10::cuda::CUDAGuard guard(mu.device());
  ForwardOut out;
  auto joint = allocate_subsets(in, out);
  if (in.args.n > 0 && in.args.d > 0) {
    mopoe_forward(in.args, out, multiprocessors(mu), c10::cuda::getCurrentCUDAStream());
  }
  return {joint[0], joint[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mopoe_backward_cuda(
    const std::optional<at::Tensor>& grad_joint_mu, const std::optional<at::Tensor>& grad_joint_logvar,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& logits,
    const std::optional<at::Tensor>& mask, bool prior_expert, std::array<bool, 3> output_mask) {
  const PreparedInputs in =
      prepare_inputs("mopoe_backward", c10::DeviceType::CUDA, mu, logvar, logits, mask, prior_expert);
  check_subsets("mopoe_backward", in);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int64_t components = (int64_t{1} << in.args.m) - 1;
  PreparedGrads g = prepare_grads("mopoe_backward", in, grad_joint_mu, grad_joint_logvar, std::nullopt, components);
  auto grads = allocate_backward(in, output_mask, g.args);
  if (in.args.n > 0 && in.args.d > 0) {
    mopoe_backward(in.args, g.args, multiprocessors(mu), c10::cuda::getCurrentCUDAStream());
  }
  return {grads[0], grads[1], grads[2]};
}

}  // namespace
}  // namespace gpoe::cuda

TORCH_LIBRARY_IMPL(gpoe_fusion, CUDA, m) {
  m.impl("fuse_forward", &gpoe::cuda::fuse_forward_cuda);
  m.impl("fuse_backward", &gpoe::cuda::fuse_backward_cuda);
  m.impl("mopoe_forward", &gpoe::cuda::mopoe_forward_cuda);
  m.impl("mopoe_backward", &gpoe::cuda::mopoe_backward_cuda);
}
