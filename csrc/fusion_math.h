// The per-point math of the weighted Gaussian product, shared by the CPU and CUDA kernels.
//
// A "point" is one (row n, dimension d) position, or a SIMD vector of consecutive d of one row on
// the CPU. With present experts i (a row's mask), logits l_i (PoE: none), log-variances v_i:
//
//   c      = log sum_i exp(l_i)                  (the credibility softmax normaliser)
//   s_i    = (l_i - c) - v_i                     (= log alpha_i - logvar_i; PoE: -v_i)
//   top    = max_i s_i                           (and 0 when the N(0, I) prior is an expert)
//   S      = sum_i exp(s_i - top) [+ exp(-top)]
//   joint_logvar = -(top + log S),  joint_mu = sum_i exp(s_i - top) mu_i / S
//
// Without the prior, c cancels from every weight exp(s_i - top), so it is never formed: s_i is
// taken as l_i - v_i and joint_logvar = (max_i l_i - top) + log(sum_i exp(l_i - max l) / S),
// one logarithm instead of two.
//
// Backward, with w_i = exp(s_i - top) / S (the prior has mu = 0 and no gradient):
//   g_s_i        = w_i (g_mu (mu_i - joint_mu) - g_logvar)
//   grad_mu_i    = g_mu w_i,  grad_logvar_i = -g_s_i
//   grad_logit_i = g_s_i - alpha_i sum_j g_s_j,  alpha_i = exp(l_i - c)
//
// The forward can also hand out each expert's weight (0 when masked): alpha_i with logits (gPoE's
// credibility), else w_i (PoE's implicit weight, the expert's share of the joint precision). An
// incoming gradient g_a_i of those weights enters the backward through the softmax it came from:
//   gPoE: grad_logit_i += alpha_i (g_a_i - sum_j alpha_j g_a_j)
//   PoE:  g_s_i        += w_i (g_a_i - sum_j w_j g_a_j)       (so grad_logvar_i moves with it)
// Masked experts are never read (they may hold NaN) and get zero gradients. A row with no
// present expert gives the prior (joint 0, 0) or, without a prior, joint_mu NaN and
// joint_logvar +inf, as the pure-PyTorch reference does.
//
// The backward recomputes everything from the inputs rather than from the saved joint outputs:
// for 16-bit inputs the saved outputs are rounded to 16 bits, and exp(s_i + joint_logvar) with a
// rounded joint_logvar would be off by up to |joint_logvar| * 2^-9 relative. Recomputing costs
// no more exponentials (alpha_i and w_i are needed either way) and reads two fewer tensors.
//
// Interfaces (duck-typed, so the same code runs on scalars in CUDA threads and on
// at::vec::Vectorized on the CPU):
//   Ops (static): V zero(); V one(); V neg_inf(); V exp(V); V log(V); V max(V, V); V fma(V a, V b, V c)
//   Experts e:    using value_type = V; int count(); bool present(int i);
//                 V mu(int i); V logvar(int i); V logit(int i);
//                 static constexpr bool kScratch; with kScratch also V& w(int i), V& gs(int i),
//                 V& alpha(int i) (storage for the weights, the s-gradients and exp(l_i - max l);
//                 without it they are recomputed). With kScratch, backward_point reads an
//                 expert's mu / logvar / logit for the last time before it hands out that
//                 input's gradient, so a sink may overwrite the inputs in place.
//                 With kWeightGrad (backward_point): V weight_grad(int i), the incoming g_a_i.
//   Sink out:     void mu(int i, V), logvar(int i, V), logit(int i, V): per-expert gradients.
//   Weight sink:  void weight(int i, V) (forward_point with kWeights): per-expert weights.
#pragma once

#include <cstdint>

#include "fusion_args.h"  // GPOE_HD, GPOE_UNROLL

namespace gpoe {

template <class V>
struct Credibility {
  V top;  // max_i l_i over the present experts
  V sum;  // sum_i exp(l_i - top); c = top + log(sum)
};

// The softmax normaliser of the present experts' logits; with kKeep (and scratch) the
// unnormalised exp(l_i - top) are kept in e.alpha(i) for the backward.
template <class Ops, bool kKeep, class E>
GPOE_HD Credibility<typename E::value_type> credibility(E& e) {
  using V = typename E::value_type;
  V top = Ops::neg_inf();
  GPOE_UNROLL
  for (int i = 0; i < e.count(); ++i) {
    if (e.present(i)) top = Ops::max(top, e.logit(i));
  }
  V sum = Ops::zero();
  GPOE_UNROLL
  for (int i = 0; i < e.count(); ++i) {
    if (e.present(i)) {
      const V a = Ops::exp(e.logit(i) - top);
      if constexpr (kKeep && E::kScratch) e.alpha(i) = a;
      sum = sum + a;
    }
  }
  return {top, sum};
}

// The normaliser subtracted from the logits in s_i: c with the prior expert, where it does not
// cancel, else 0 (l - 0 is exactly l).
template <class Ops, class V>
GPOE_HD V log_normaliser(const Credibility<V>& cred, bool prior) {
  return prior ? cred.top + Ops::log(cred.sum) : Ops::zero();
}

// s_i = log alpha_i - logvar_i, in the reference's order of operations.
template <class Ops, bool kLogits, class E, class V>
GPOE_HD V expert_s(const E& e, int i, V log_norm) {
  if constexpr (kLogits) {
    return (e.logit(i) - log_norm) - e.logvar(i);
  } else {
    return Ops::zero() - e.logvar(i);
  }
}

// The shift `top` = max over the present s_i (and 0 with a prior) that keeps every exp <= 1.
template <class Ops, bool kLogits, class E, class V>
GPOE_HD V max_s(const E& e, V log_norm, bool prior) {
  V top = Ops::neg_inf();
  GPOE_UNROLL
  for (int i = 0; i < e.count(); ++i) {
    if (e.present(i)) top = Ops::max(top, expert_s<Ops, kLogits>(e, i, log_norm));
  }
  return prior ? Ops::max(top, Ops::zero()) : top;
}

// Forward: joint_mu and joint_logvar at one point; with kWeights also every expert's weight
// (alpha_i with logits, else w_i; 0 when masked), handed to `weights`.
template <class Ops, bool kLogits, bool kWeights, class E, class W, class V = typename E::value_type>
GPOE_HD void forward_point(E& e, bool prior, V& joint_mu, V& joint_logvar, W& weights) {
  constexpr bool kKeepAlpha = kWeights && kLogits;
  Credibility<V> cred{Ops::zero(), Ops::zero()};
  V log_norm = Ops::zero();
  if constexpr (kLogits) {
    cred = credibility<Ops, kKeepAlpha>(e);
    log_norm = log_normaliser<Ops>(cred, prior);
  }
  const V top = max_s<Ops, kLogits>(e, log_norm, prior);
  V sum = prior ? Ops::exp(Ops::zero() - top) : Ops::zero();
  V acc = Ops::zero();
  bool any = false;
  GPOE_UNROLL
  for (int i = 0; i < e.count(); ++i) {
    if (e.present(i)) {
      any = true;
      const V w = Ops::exp(expert_s<Ops, kLogits>(e, i, log_norm) - top);
      if constexpr (kWeights && !kLogits && E::kScratch) e.w(i) = w;
      sum = sum + w;
      acc = Ops::fma(w, e.mu(i), acc);
    }
  }
  joint_mu = acc / sum;
  if (kLogits && !prior) {
    // c - top - log S, with c = cred.top + log(cred.sum); no expert at all: +inf, as below.
    joint_logvar = any ? (cred.top - top) + Ops::log(cred.sum / sum) : Ops::zero() - Ops::neg_inf();
  } else {
    joint_logvar = Ops::zero() - (top + Ops::log(sum));
  }
  if constexpr (kWeights) {
    const V inv = Ops::one() / (kLogits ? cred.sum : sum);
    GPOE_UNROLL
    for (int i = 0; i < e.count(); ++i) {
      if (!e.present(i)) {
        weights.weight(i, Ops::zero());
      } else if constexpr (kLogits) {
        if constexpr (E::kScratch) {
          weights.weight(i, e.alpha(i) * inv);
        } else {
          weights.weight(i, Ops::exp(e.logit(i) - cred.top) * inv);
        }
      } else if constexpr (E::kScratch) {
        weights.weight(i, e.w(i) * inv);
      } else {
        weights.weight(i, Ops::exp(expert_s<Ops, kLogits>(e, i, log_norm) - top) * inv);
      }
    }
  }
}

// A weight sink for forward_point without kWeights.
struct NoWeights {
  template <class V>
  GPOE_HD void weight(int, const V&) {}
};

// Backward at one point: gradients of sum(g_mu * joint_mu + g_logvar * joint_logvar
// [+ sum_i g_a_i * weight_i with kWeightGrad]) w.r.t. the experts' mu, logvar and (with kLogits)
// logits, handed to `out` expert by expert.
template <class Ops, bool kLogits, bool kWeightGrad, class E, class Sink, class V = typename E::value_type>
GPOE_HD void backward_point(E& e, bool prior, V g_mu, V g_logvar, Sink& out) {
  Credibility<V> cred{Ops::zero(), Ops::zero()};
  V log_norm = Ops::zero();
  if constexpr (kLogits) {
    cred = credibility<Ops, true>(e);
    log_norm = log_normaliser<Ops>(cred, prior);
  }
  const V top = max_s<Ops, kLogits>(e, log_norm, prior);
  auto weight = [&](int i) { return Ops::exp(expert_s<Ops, kLogits>(e, i, log_norm) - top); };

  V sum = prior ? Ops::exp(Ops::zero() - top) : Ops::zero();
  V acc = Ops::zero();
  V weighted_grad = Ops::zero();  // PoE weights' gradient: sum_j exp(s_j - top) g_a_j
  GPOE_UNROLL
  for (int i = 0; i < e.count(); ++i) {
    if (e.present(i)) {
      const V w = weight(i);
      if constexpr (E::kScratch) e.w(i) = w;
      sum = sum + w;
      acc = Ops::fma(w, e.mu(i), acc);
      if constexpr (kWeightGrad && !kLogits) weighted_grad = Ops::fma(w, e.weight_grad(i), weighted_grad);
    }
  }
  const V inv_sum = Ops::one() / sum;
  const V joint_mu = acc * inv_sum;
  // -g_logvar, and for PoE's weights minus their mean gradient sum_j w_j g_a_j.
  V base = Ops::zero() - g_logvar;
  if constexpr (kWeightGrad && !kLogits) base = base - weighted_grad * inv_sum;

  // g_s_i for a present expert; the weights come from scratch or are recomputed.
  auto grad_s = [&](int i, V& w) {
    if constexpr (E::kScratch) {
      w = e.w(i) * inv_sum;
    } else {
      w = weight(i) * inv_sum;
    }
    V inner = Ops::fma(g_mu, e.mu(i) - joint_mu, base);
    if constexpr (kWeightGrad && !kLogits) inner = inner + e.weight_grad(i);
    return w * inner;
  };

  V gs_total = Ops::zero();
  GPOE_UNROLL
  for (int i = 0; i < e.count(); ++i) {
    if (e.present(i)) {
      V w;
      const V gs = grad_s(i, w);
      if constexpr (E::kScratch) e.gs(i) = gs;
      gs_total = gs_total + gs;
      out.mu(i, g_mu * w);
      out.logvar(i, Ops::zero() - gs);
    } else {
      out.mu(i, Ops::zero());
      out.logvar(i, Ops::zero());
    }
  }
  if constexpr (kLogits) {
    const V inv_cred_sum = Ops::one() / cred.sum;
    auto alpha = [&](int i) {
      if constexpr (E::kScratch) {
        return e.alpha(i) * inv_cred_sum;
      } else {
        return Ops::exp(e.logit(i) - cred.top) * inv_cred_sum;
      }
    };
    // gPoE weights' gradient: sum_j alpha_j g_a_j, subtracted from each g_a_i below.
    V alpha_grad = Ops::zero();
    if constexpr (kWeightGrad) {
      GPOE_UNROLL
      for (int i = 0; i < e.count(); ++i) {
        if (e.present(i)) alpha_grad = Ops::fma(alpha(i), e.weight_grad(i), alpha_grad);
      }
    }
    GPOE_UNROLL
    for (int i = 0; i < e.count(); ++i) {
      if (e.present(i)) {
        V gs;
        if constexpr (E::kScratch) {
          gs = e.gs(i);
        } else {
          V w;
          gs = grad_s(i, w);
        }
        const V a = alpha(i);
        V grad = gs - a * gs_total;
        if constexpr (kWeightGrad) grad = Ops::fma(a, e.weight_grad(i) - alpha_grad, grad);
        out.logit(i, grad);
      } else {
        out.logit(i, Ops::zero());
      }
    }
  }
}

// The experts of one subset of `e` (bit i of `members` set: expert i belongs to it), as
// forward_point / backward_point read experts: MoPoE's components are these subsets' products.
// Members must be present in `e`; with logits, alpha is renormalised over the members because
// the credibility softmax runs over the present experts only.
template <class E>
struct Subset {
  using value_type = typename E::value_type;
  static constexpr bool kScratch = E::kScratch;
  E& e;
  uint32_t members;
  GPOE_HD int count() const { return e.count(); }
  GPOE_HD bool present(int i) const { return ((members >> i) & 1u) != 0; }
  GPOE_HD value_type mu(int i) const { return e.mu(i); }
  GPOE_HD value_type logvar(int i) const { return e.logvar(i); }
  GPOE_HD value_type logit(int i) const { return e.logit(i); }
  GPOE_HD decltype(auto) w(int i) { return e.w(i); }
  GPOE_HD decltype(auto) gs(int i) { return e.gs(i); }
  GPOE_HD decltype(auto) alpha(int i) { return e.alpha(i); }
};

}  // namespace gpoe
