// Host-side argument checking and the translation of tensors into the kernels' FuseArgs,
// shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <array>
#include <optional>

#include "fusion_args.h"

namespace gpoe {

// Checked inputs of one call. The tensors are the ones the kernel reads (an input whose last
// axis is not unit-stride is copied) and keep the data that `args` points into alive.
struct PreparedInputs {
  at::Tensor mu, logvar, logits, mask;
  FuseArgs args;
};

// Checks mu, logvar [M, N, D], logits [M, N or 1, D or 1] (same dtype), mask bool [M, N], all on
// a device of type `device`; `op` names the operator in error messages.
PreparedInputs prepare_inputs(const char* op, c10::DeviceType device, const at::Tensor& mu, const at::Tensor& logvar,
                              const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& mask,
                              bool prior_expert);

// The incoming gradients of the backward: of joint_mu and joint_logvar [N, D] and of the weights
// [M, N, D], each absent (zero) or not.
struct PreparedGrads {
  at::Tensor grad_joint_mu, grad_joint_logvar, grad_weights;
  BackwardArgs args;
};

// components: 0 for the fusion's [N, D] outputs, S for MoPoE's [S, N, D] ones.
PreparedGrads prepare_grads(const char* op, const PreparedInputs& inputs,
                            const std::optional<at::Tensor>& grad_joint_mu,
                            const std::optional<at::Tensor>& grad_joint_logvar,
                            const std::optional<at::Tensor>& grad_weights, int64_t components = 0);

// MoPoE's extra requirements: M <= kMaxSubsetExperts, logits [M, N, D] (or none).
void check_subsets(const char* op, const PreparedInputs& inputs);

// MoPoE's outputs, allocated: every subset's joint_mu, joint_logvar [S = 2^M - 1, N, D].
std::array<at::Tensor, 2> allocate_subsets(const PreparedInputs& inputs, ForwardOut& out);

// The forward's outputs, allocated: joint_mu, joint_logvar [N, D] and, with `weights`, the
// experts' weights [M, N, D] (else an empty tensor), in the inputs' dtype.
std::array<at::Tensor, 3> allocate_forward(const PreparedInputs& inputs, bool weights, ForwardOut& out);

// The backward's per-element outputs, allocated where output_mask asks for them (else an empty
// tensor): grad_mu, grad_logvar [M, N, D] and, for [M, N, D] logits, grad_logits; sets the
// pointers in `grads`. Broadcast logits' gradients are reduced by each backend.
std::array<at::Tensor, 3> allocate_backward(const PreparedInputs& inputs, std::array<bool, 3> output_mask,
                                            BackwardArgs& grads);

// float32, or float64 for float64 inputs: the type partial sums are accumulated in.
c10::ScalarType accumulation_type(const PreparedInputs& inputs);

}  // namespace gpoe
