#include "fusion_host.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace gpoe {
namespace {

Dtype kernel_dtype(const char* op, const at::Tensor& mu) {
  switch (mu.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": mu: expected float16, bfloat16, float32 or float64, got ", mu.scalar_type());
  }
}

// An axis of size 1 is broadcast whatever its stride says: read it with stride 0.
int64_t stride_of(const at::Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

// The kernels read the last axis with stride 1 (mu, logvar) or with stride 0 or 1 (logits and
// incoming gradients may be broadcast along it); anything else is copied first.
at::Tensor unit_stride_last(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

at::Tensor unit_or_zero_stride_last(const at::Tensor& t) {
  return t.stride(-1) == 0 ? t : unit_stride_last(t);
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& mu,
                  c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", name, ": expected a ", c10::DeviceTypeName(device),
                    " tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == mu.device(), op, ": ", name, ": device ", t.device(), " differs from mu's device ",
                    mu.device());
}

Operand operand(const at::Tensor& t) {
  Operand o;
  o.data = t.data_ptr();
  o.stride_m = stride_of(t, 0);
  o.stride_n = stride_of(t, 1);
  o.stride_d = stride_of(t, 2);
  return o;
}

}  // namespace

PreparedInputs prepare_inputs(const char* op, c10::DeviceType device, const at::Tensor& mu_in,
                              const at::Tensor& logvar_in, const std::optional<at::Tensor>& logits_in,
                              const std::optional<at::Tensor>& mask_in, bool prior_expert) {
  TORCH_CHECK_VALUE(mu_in.dim() == 3, op, ": mu: expected shape [M, N, D], got ", mu_in.sizes());
  TORCH_CHECK_VALUE(logvar_in.sizes() == mu_in.sizes(), op, ": logvar: shape ", logvar_in.sizes(),
                    " differs from mu's shape ", mu_in.sizes());
  TORCH_CHECK_TYPE(logvar_in.scalar_type() == mu_in.scalar_type(), op, ": logvar: dtype ", logvar_in.scalar_type(),
                   " differs from mu's dtype ", mu_in.scalar_type());
  TORCH_CHECK_VALUE(mu_in.size(0) >= 1, op, ": mu: expected at least one expert (M >= 1), got shape ",
                    mu_in.sizes());
  check_device(op, "mu", mu_in, mu_in, device);
  check_device(op, "logvar", logvar_in, mu_in, device);

  PreparedInputs p;
  FuseArgs& a = p.args;
  a.dtype = kernel_dtype(op, mu_in);
  a.m = mu_in.size(0);
  a.n = mu_in.size(1);
  a.d = mu_in.size(2);
  a.prior = prior_expert;
  p.mu = unit_stride_last(mu_in);
  p.logvar = unit_stride_last(logvar_in);
  a.mu = operand(p.mu);
  a.logvar = operand(p.logvar);
  a.mu.stride_d = 1;
  a.logvar.stride_d = 1;

  if (logits_in.has_value()) {
    const at::Tensor& l = *logits_in;
    TORCH_CHECK_VALUE(l.dim() == 3 && l.size(0) == a.m && (l.size(1) == a.n || l.size(1) == 1) &&
                          (l.size(2) == a.d || l.size(2) == 1),
                      op, ": logits: expected shape [M, N or 1, D or 1] with [M, N, D] = ", mu_in.sizes(), ", got ",
                      l.sizes());
    TORCH_CHECK_TYPE(l.scalar_type() == mu_in.scalar_type(), op, ": logits: dtype ", l.scalar_type(),
                     " differs from mu's dtype ", mu_in.scalar_type());
    check_device(op, "logits", l, mu_in, device);
    p.logits = unit_or_zero_stride_last(l);
    a.logits = operand(p.logits);
    const bool shared_rows = l.size(1) == 1 && a.n != 1;
    const bool shared_dims = l.size(2) == 1 && a.d != 1;
    a.logit_reduce = shared_rows ? (shared_dims ? LogitReduce::kAll : LogitReduce::kRows)
                                 : (shared_dims ? LogitReduce::kDims : LogitReduce::kNone);
  }

  if (mask_in.has_value()) {
    const at::Tensor& mask = *mask_in;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask: expected dtype bool (true = present), got ",
                     mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == a.m && mask.size(1) == a.n, op,
                      ": mask: expected shape [M, N] = [", a.m, ", ", a.n, "], got ", mask.sizes());
    check_device(op, "mask", mask, mu_in, device);
    p.mask = mask;
    a.mask = mask.data_ptr<bool>();
    a.mask_stride_m = stride_of(mask, 0);
    a.mask_stride_n = stride_of(mask, 1);
  }
  return p;
}

PreparedGrads prepare_grads(const char* op, const PreparedInputs& inputs,
                            const std::optional<at::Tensor>& grad_joint_mu,
                            const std::optional<at::Tensor>& grad_joint_logvar,
                            const std::optional<at::Tensor>& grad_weights, int64_t components) {
  const FuseArgs& a = inputs.args;
  PreparedGrads g;
  // [N, D] (components == 0) or [S, N, D]; the last axis unit- or zero-strided.
  auto take = [&](const char* name, const std::optional<at::Tensor>& grad, at::Tensor& kept, Operand& o) {
    if (!grad.has_value() || !grad->defined()) return;
    const at::Tensor& t = *grad;
    if (components == 0) {
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == a.n && t.size(1) == a.d, op, ": ", name,
                        ": expected shape [N, D] = [", a.n, ", ", a.d, "], got ", t.sizes());
    } else {
      TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == components && t.size(1) == a.n && t.size(2) == a.d, op, ": ",
                        name, ": expected shape [S, N, D] = [", components, ", ", a.n, ", ", a.d, "], got ",
                        t.sizes());
    }
    TORCH_CHECK_TYPE(t.scalar_type() == inputs.mu.scalar_type(), op, ": ", name, ": dtype ", t.scalar_type(),
                     " differs from mu's dtype ", inputs.mu.scalar_type());
    check_device(op, name, t, inputs.mu, inputs.mu.device().type());
    kept = unit_or_zero_stride_last(t);
    o.data = kept.data_ptr();
    const int64_t first = kept.dim() - 2;  // the N axis
    o.stride_m = first > 0 ? stride_of(kept, 0) : 0;
    o.stride_n = stride_of(kept, first);
    o.stride_d = stride_of(kept, first + 1);
  };
  take("grad_joint_mu", grad_joint_mu, g.grad_joint_mu, g.args.grad_joint_mu);
  take("grad_joint_logvar", grad_joint_logvar, g.grad_joint_logvar, g.args.grad_joint_logvar);
  if (grad_weights.has_value() && grad_weights->defined()) {
    const at::Tensor& t = *grad_weights;
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == a.m && t.size(1) == a.n && t.size(2) == a.d, op,
                      ": grad_weights: expected shape [M, N, D] = [", a.m, ", ", a.n, ", ", a.d, "], got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == inputs.mu.scalar_type(), op, ": grad_weights: dtype ", t.scalar_type(),
                     " differs from mu's dtype ", inputs.mu.scalar_type());
    check_device(op, "grad_weights", t, inputs.mu, inputs.mu.device().type());
    g.grad_weights = unit_stride_last(t);
    g.args.grad_weights = operand(g.grad_weights);
    g.args.grad_weights.stride_d = 1;
  }
  return g;
}

void check_subsets(const char* op, const PreparedInputs& inputs) {
  const FuseArgs& a = inputs.args;
  TORCH_CHECK_VALUE(a.m <= kMaxSubsetExperts, op, ": mu: at most ", kMaxSubsetExperts, " experts (",
                    (int64_t{1} << kMaxSubsetExperts) - 1, " subsets), got M = ", a.m);
  TORCH_CHECK_VALUE(a.logits.data == nullptr || a.logit_reduce == LogitReduce::kNone, op,
                    ": logits: expected shape [M, N, D] (expand broadcast logits first), got ", inputs.logits.sizes());
}

std::array<at::Tensor, 2> allocate_subsets(const PreparedInputs& inputs, ForwardOut& out) {
  const FuseArgs& a = inputs.args;
  const auto options = inputs.mu.options();
  const int64_t components = (int64_t{1} << a.m) - 1;
  at::Tensor joint_mu = at::empty({components, a.n, a.d}, options);
  at::Tensor joint_logvar = at::empty({components, a.n, a.d}, options);
  out.joint_mu = joint_mu.data_ptr();
  out.joint_logvar = joint_logvar.data_ptr();
  return {joint_mu, joint_logvar};
}

std::array<at::Tensor, 3> allocate_forward(const PreparedInputs& inputs, bool weights, ForwardOut& out) {
  const FuseArgs& a = inputs.args;
  const auto options = inputs.mu.options();
  at::Tensor joint_mu = at::empty({a.n, a.d}, options);
  at::Tensor joint_logvar = at::empty({a.n, a.d}, options);
  at::Tensor expert_weights = weights ? at::empty({a.m, a.n, a.d}, options) : at::empty({0}, options);
  out.joint_mu = joint_mu.data_ptr();
  out.joint_logvar = joint_logvar.data_ptr();
  out.weights = weights ? expert_weights.data_ptr() : nullptr;
  return {joint_mu, joint_logvar, expert_weights};
}

std::array<at::Tensor, 3> allocate_backward(const PreparedInputs& inputs, std::array<bool, 3> output_mask,
                                            BackwardArgs& grads) {
  const FuseArgs& a = inputs.args;
  const auto options = inputs.mu.options();
  auto full = [&](bool wanted) {
    return wanted ? at::empty({a.m, a.n, a.d}, options) : at::empty({0}, options);
  };
  at::Tensor grad_mu = full(output_mask[0]);
  at::Tensor grad_logvar = full(output_mask[1]);
  const bool logit_grad = output_mask[2] && inputs.logits.defined();
  at::Tensor grad_logits = full(logit_grad && a.logit_reduce == LogitReduce::kNone);
  grads.grad_mu = output_mask[0] ? grad_mu.data_ptr() : nullptr;
  grads.grad_logvar = output_mask[1] ? grad_logvar.data_ptr() : nullptr;
  grads.grad_logits = logit_grad && a.logit_reduce == LogitReduce::kNone ? grad_logits.data_ptr() : nullptr;
  return {grad_mu, grad_logvar, grad_logits};
}

c10::ScalarType accumulation_type(const PreparedInputs& inputs) {
  return inputs.mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gpoe
