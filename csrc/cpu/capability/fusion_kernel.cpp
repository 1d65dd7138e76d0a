// The vectorised CPU kernels, compiled once per instruction set with -DCPU_CAPABILITY=<set>
// (see ../fusion_cpu_kernels.h). One row at a time, the latent dimensions are walked in SIMD
// vectors of at::vec::Vectorized<acc_t>; the experts of one vector are held in a small array
// (compile-time sized for M <= 8) and the math is gpoe::forward_point / backward_point.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/fusion_cpu_kernels.h"
#include "dispatch.h"
#include "fusion_math.h"

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py does)"
#endif

namespace gpoe::cpu::CPU_CAPABILITY {
namespace {

template <class T>
using Vec = at::vec::Vectorized<T>;

// float16/bfloat16 are computed in float32; float32 and float64 in themselves.
template <class scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// exp and log for float vectors, inlined (ATen's Vectorized<float>::exp()/log() are Sleef calls
// which, on x86, spill every vector register around each use; inlined, the forward runs about
// 1.4x faster here). Both are within ~1.5 ulp of the exact value on the arguments the fusion
// produces: exp on x <= 88.3 (here always x <= 0), log on x >= 0.

// exp: x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two so k ln2 is exact), exp(r) by its
// Taylor series to r^7 (truncation error < 6e-9, under half an ulp), times 2^k built in the
// exponent bits. Results below 2^-126 flush to zero: every exp here is a term of a sum that
// holds a 1 (the largest term), so a subnormal one is below the sum's resolution.
inline Vec<float> exp_f32(const Vec<float>& x) {
  using V = Vec<float>;
  const V clamped = at::vec::maximum(x, V(-88.0f));  // keeps k >= -127 (2^-127 -> the bits of 0)
  const V k = (clamped * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(k, V(-0.693145751953125f), clamped);
  r = at::vec::fmadd(k, V(-1.428606820309417232e-06f), r);
  V p(1.0f / 5040.0f);
  p = at::vec::fmadd(p, r, V(1.0f / 720.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 120.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 24.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 6.0f));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.0f));
  p = at::vec::fmadd(p, r, V(1.0f));
  const auto bits = (at::vec::convert_to_int_of_same_size(k) + Vec<int32_t>(127)) << Vec<int32_t>(23);
  return p * at::vec::cast<float>(bits);
}

// log: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(z), z = (m - 1) / (m + 1),
// |z| <= 0.172, by its series to z^9 (truncation < 1e-9 relative); log x = e ln2 + log m.
// Subnormal x are scaled by 2^23 first; log(0) = -inf, log(inf) = inf, log(x < 0) = NaN.
inline Vec<float> log_f32(const Vec<float>& x) {
  using V = Vec<float>;
  using I = Vec<int32_t>;
  const V subnormal = x < V(1.17549435e-38f);
  const V scaled = V::blendv(x, x * V(8388608.0f), subnormal);
  const I bits = at::vec::cast<int32_t>(scaled);
  V e = at::vec::convert_to_fp_of_same_size<float>((bits >> I(23)) - I(127));
  e = V::blendv(e, e - V(23.0f), subnormal);
  V m = at::vec::cast<float>((bits & I(0x007fffff)) | I(0x3f800000));  // in [1, 2)
  const V big = m > V(1.41421356f);
  m = V::blendv(m, m * V(0.5f), big);
  e = V::blendv(e, e + V(1.0f), big);
  const V z = (m - V(1.0f)) / (m + V(1.0f));
  const V z2 = z * z;
  V p(1.0f / 9.0f);
  p = at::vec::fmadd(p, z2, V(1.0f / 7.0f));
  p = at::vec::fmadd(p, z2, V(1.0f / 5.0f));
  p = at::vec::fmadd(p, z2, V(1.0f / 3.0f));
  p = at::vec::fmadd(p, z2, V(1.0f));
  const V log_m = (z + z) * p;
  V result = at::vec::fmadd(e, V(0.693145751953125f), at::vec::fmadd(e, V(1.428606820309417232e-06f), log_m));
  result = V::blendv(result, V(-std::numeric_limits<float>::infinity()), x == V(0.0f));
  result = V::blendv(result, x, x == V(std::numeric_limits<float>::infinity()));
  return V::blendv(result, V(std::numeric_limits<float>::quiet_NaN()), (x < V(0.0f)) | x.isnan());
}

template <class T>
struct VecOps;

template <>
struct VecOps<float> {
  using V = Vec<float>;
  static V zero() { return V(0.0f); }
  static V one() { return V(1.0f); }
  static V neg_inf() { return V(-std::numeric_limits<float>::infinity()); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V exp(const V& x) { return exp_f32(x); }
  static V log(const V& x) { return log_f32(x); }
};

template <>
struct VecOps<double> {
  using V = Vec<double>;
  static V zero() { return V(0.0); }
  static V one() { return V(1.0); }
  static V neg_inf() { return V(-std::numeric_limits<double>::infinity()); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
};

// `count` (<= the vector width) consecutive elements from p (or, `broadcast`, the one element at
// p repeated), as a vector of acc_t; lanes past `count` are zero.
template <class scalar_t, class acc_t = acc_type<scalar_t>>
inline Vec<acc_t> load_vec(const scalar_t* p, bool broadcast, int64_t count) {
  using V = Vec<acc_t>;
  if (broadcast) return V(static_cast<acc_t>(*p));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return V::loadu(p, count);
  } else {
    acc_t buffer[V::size()] = {};
    for (int64_t j = 0; j < count; ++j) buffer[j] = static_cast<acc_t>(p[j]);
    return V::loadu(buffer);
  }
}

template <class scalar_t, class acc_t>
inline void store_vec(scalar_t* p, const Vec<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    acc_t buffer[Vec<acc_t>::size()];
    v.store(buffer);
    for (int64_t j = 0; j < count; ++j) p[j] = static_cast<scalar_t>(buffer[j]);
  }
}

// The vector of positions [n, d0, d0 + count) of slice i of operand o, as a vector of acc_t.
template <class scalar_t, class acc_t = acc_type<scalar_t>>
inline Vec<acc_t> load_operand(const Operand& o, int64_t i, int64_t n, int64_t d0, int64_t count) {
  return load_vec<scalar_t, acc_t>(o.at<scalar_t>(i, n, d0), o.broadcast_d(), count);
}

// The same, or zeros for an absent operand (an incoming gradient that is zero).
template <class scalar_t, class acc_t = acc_type<scalar_t>>
inline Vec<acc_t> load_operand_or_zero(const Operand& o, int64_t i, int64_t n, int64_t d0, int64_t count) {
  return o.present() ? load_operand<scalar_t, acc_t>(o, i, n, d0, count) : Vec<acc_t>(acc_t(0));
}

// Per-expert storage: a fixed array when M is a compile-time constant (kM > 0), which the
// compiler can keep in registers, else a heap array allocated once per chunk of rows.
template <class T, int kM>
struct Slots {
  explicit Slots(int /*m*/) {}
  T& operator[](int i) { return values[i]; }
  const T& operator[](int i) const { return values[i]; }
  T values[kM];
};

template <class T>
struct Slots<T, 0> {
  explicit Slots(int m) : values(static_cast<size_t>(m)) {}
  T& operator[](int i) { return values[i]; }
  const T& operator[](int i) const { return values[i]; }
  std::vector<T> values;
};

// The experts of one vector of positions, as gpoe::forward_point / backward_point read them.
template <class V, int kM>
struct Experts {
  using value_type = V;
  static constexpr bool kScratch = true;
  explicit Experts(int m)
      : m_(kM > 0 ? kM : m), present_(m), mu_(m), logvar_(m), logit_(m), weight_grad_(m), w_(m), gs_(m), alpha_(m) {}
  int count() const { return kM > 0 ? kM : m_; }
  bool present(int i) const { return present_[i] != 0; }
  V mu(int i) const { return mu_[i]; }
  V logvar(int i) const { return logvar_[i]; }
  V logit(int i) const { return logit_[i]; }
  V weight_grad(int i) const { return weight_grad_[i]; }
  V& w(int i) { return w_[i]; }
  V& gs(int i) { return gs_[i]; }
  V& alpha(int i) { return alpha_[i]; }

  int m_;
  Slots<uint8_t, kM> present_;
  Slots<V, kM> mu_, logvar_, logit_, weight_grad_, w_, gs_, alpha_;
};

// Pointers into one row n of the inputs, and the loads of one vector of it.
template <class scalar_t>
struct RowInputs {
  const FuseArgs& a;
  int64_t n = 0;

  template <class E>
  void load_presence(E& e) const {
    for (int i = 0; i < e.count(); ++i) {
      e.present_[i] = a.present(i, n);
    }
  }

  // The inputs of one vector of positions; with kWeightGrad also the weights' incoming gradient.
  template <bool kLogits, bool kWeightGrad = false, class E>
  void load(E& e, int64_t d0, int64_t count, const Operand* grad_weights = nullptr) const {
    for (int i = 0; i < e.count(); ++i) {
      // Masked experts are not read: they may hold anything, NaN included.
      if (!e.present(i)) continue;
      e.mu_[i] = load_operand<scalar_t>(a.mu, i, n, d0, count);
      e.logvar_[i] = load_operand<scalar_t>(a.logvar, i, n, d0, count);
      if constexpr (kLogits) e.logit_[i] = load_operand<scalar_t>(a.logits, i, n, d0, count);
      if constexpr (kWeightGrad) e.weight_grad_[i] = load_operand<scalar_t>(*grad_weights, i, n, d0, count);
    }
  }
};

// Stores the experts' weights of one vector of positions [n, d0, d0 + count) into the [M, N, D] output.
template <class scalar_t>
struct WeightStore {
  using V = Vec<acc_type<scalar_t>>;
  const FuseArgs& a;
  scalar_t* weights;
  int64_t n = 0, d0 = 0, count = 0;
  void weight(int i, const V& v) { store_vec(weights + a.out_index(i, n, d0), v, count); }
};

template <class scalar_t, int kM, bool kLogits, bool kWeights>
void forward_rows(const FuseArgs& a, const ForwardOut& out, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t kWidth = V::size();
  Experts<V, kM> e(static_cast<int>(a.m));
  auto* joint_mu = static_cast<scalar_t*>(out.joint_mu);
  auto* joint_logvar = static_cast<scalar_t*>(out.joint_logvar);
  WeightStore<scalar_t> weights{a, static_cast<scalar_t*>(out.weights)};
  NoWeights none;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const RowInputs<scalar_t> row{a, n};
    row.load_presence(e);
    for (int64_t d0 = 0; d0 < a.d; d0 += kWidth) {
      const int64_t count = std::min(kWidth, a.d - d0);
      row.template load<kLogits>(e, d0, count);
      V mu, logvar;
      if constexpr (kWeights) {
        weights.n = n;
        weights.d0 = d0;
        weights.count = count;
        forward_point<VecOps<acc_t>, kLogits, true>(e, a.prior, mu, logvar, weights);
      } else {
        forward_point<VecOps<acc_t>, kLogits, false>(e, a.prior, mu, logvar, none);
      }
      store_vec(joint_mu + a.out_index(0, n, d0), mu, count);
      store_vec(joint_logvar + a.out_index(0, n, d0), logvar, count);
    }
  }
}

// Receives the per-expert gradients of one vector of positions (see fusion_math.h).
template <class scalar_t, int kM>
struct GradSink {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  const FuseArgs& a;
  const BackwardArgs& g;
  int64_t chunk = 0;
  int64_t n = 0;
  int64_t d0 = 0;
  int64_t count = 0;
  // kDims: this row's sums; kAll: this chunk's sums (one vector per expert).
  Slots<V, kM>& sums;

  int64_t offset(int i) const { return a.out_index(i, n, d0); }
  void mu(int i, const V& v) {
    if (g.grad_mu != nullptr) store_vec(static_cast<scalar_t*>(g.grad_mu) + offset(i), v, count);
  }
  void logvar(int i, const V& v) {
    if (g.grad_logvar != nullptr) store_vec(static_cast<scalar_t*>(g.grad_logvar) + offset(i), v, count);
  }
  void logit(int i, const V& v) {
    if (g.grad_logits == nullptr) return;
    switch (a.logit_reduce) {
      case LogitReduce::kNone:
        store_vec(static_cast<scalar_t*>(g.grad_logits) + offset(i), v, count);
        break;
      case LogitReduce::kRows: {
        acc_t* p = static_cast<acc_t*>(g.grad_logits) + dense_index(chunk, i, d0, a.m, a.d);
        (V::loadu(p, count) + v).store(p, count);
        break;
      }
      case LogitReduce::kDims:
      case LogitReduce::kAll:
        // Lanes past `count` hold gradients of padding positions: keep them out of the sum.
        sums[i] = sums[i] + V::set(V(acc_t(0)), v, count);
        break;
    }
  }
};

template <class V>
typename V::value_type horizontal_sum(const V& v) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  typename V::value_type total = 0;
  for (int j = 0; j < V::size(); ++j) total += lanes[j];
  return total;
}

template <class scalar_t, int kM, bool kLogits, bool kWeightGrad>
void backward_rows(const FuseArgs& a, const BackwardArgs& g, int64_t chunk, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t kWidth = V::size();
  const int m = static_cast<int>(a.m);
  Experts<V, kM> e(m);
  Slots<V, kM> sums(m);
  for (int i = 0; i < m; ++i) sums[i] = V(acc_t(0));
  GradSink<scalar_t, kM> sink{a, g, chunk, 0, 0, 0, sums};
  for (int64_t n = row_begin; n < row_end; ++n) {
    const RowInputs<scalar_t> row{a, n};
    row.load_presence(e);
    sink.n = n;
    for (int64_t d0 = 0; d0 < a.d; d0 += kWidth) {
      const int64_t count = std::min(kWidth, a.d - d0);
      row.template load<kLogits, kWeightGrad>(e, d0, count, &g.grad_weights);
      const V g_mu = load_operand_or_zero<scalar_t>(g.grad_joint_mu, 0, n, d0, count);
      const V g_logvar = load_operand_or_zero<scalar_t>(g.grad_joint_logvar, 0, n, d0, count);
      sink.d0 = d0;
      sink.count = count;
      backward_point<VecOps<acc_t>, kLogits, kWeightGrad>(e, a.prior, g_mu, g_logvar, sink);
    }
    if (kLogits && g.grad_logits != nullptr && a.logit_reduce == LogitReduce::kDims) {
      for (int i = 0; i < m; ++i) {
        static_cast<acc_t*>(g.grad_logits)[dense_index(0, i, n, a.m, a.n)] = horizontal_sum(sums[i]);
        sums[i] = V(acc_t(0));
      }
    }
  }
  if (kLogits && g.grad_logits != nullptr && a.logit_reduce == LogitReduce::kAll) {
    for (int i = 0; i < m; ++i) {
      static_cast<acc_t*>(g.grad_logits)[dense_index(0, chunk, i, 0, a.m)] = horizontal_sum(sums[i]);
    }
  }
}

// ---- MoPoE: the product of every subset of the experts ------------------------------------------

// Bit i set: expert i is present in this row.
template <class E>
uint32_t presence_bits(const E& e) {
  uint32_t bits = 0;
  for (int i = 0; i < e.count(); ++i) bits |= e.present(i) ? (1u << i) : 0u;
  return bits;
}

// Walks rows [row_begin, row_end) a vector of positions at a time with the row's present experts
// loaded into e: f(n, d0, count, present_bits) for every vector.
template <class scalar_t, bool kLogits, class E, class F>
void for_each_vector(const FuseArgs& a, E& e, int64_t row_begin, int64_t row_end, const F& f) {
  constexpr int64_t kWidth = Vec<acc_type<scalar_t>>::size();
  for (int64_t n = row_begin; n < row_end; ++n) {
    const RowInputs<scalar_t> row{a, n};
    row.load_presence(e);
    const uint32_t present = presence_bits(e);
    for (int64_t d0 = 0; d0 < a.d; d0 += kWidth) {
      const int64_t count = std::min(kWidth, a.d - d0);
      row.template load<kLogits>(e, d0, count);
      f(n, d0, count, present);
    }
  }
}

template <class scalar_t, int kM, bool kLogits>
void subsets_forward_rows(const FuseArgs& a, const ForwardOut& out, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  Experts<V, kM> e(static_cast<int>(a.m));
  const uint32_t subsets = (1u << a.m) - 1;
  auto* joint_mu = static_cast<scalar_t*>(out.joint_mu);
  auto* joint_logvar = static_cast<scalar_t*>(out.joint_logvar);
  NoWeights none;
  for_each_vector<scalar_t, kLogits>(a, e, row_begin, row_end, [&](int64_t n, int64_t d0, int64_t count,
                                                                   uint32_t present) {
    for (uint32_t members = 1; members <= subsets; ++members) {
      const int64_t offset = a.out_index(members - 1, n, d0);
      V mu(acc_t(0)), logvar(acc_t(0));
      // A subset with a missing member is not a component of this row: zeros, never its NaN.
      if ((members & ~present) == 0) {
        Subset<Experts<V, kM>> subset{e, members};
        forward_point<VecOps<acc_t>, kLogits, false>(subset, a.prior, mu, logvar, none);
      }
      store_vec(joint_mu + offset, mu, count);
      store_vec(joint_logvar + offset, logvar, count);
    }
  });
}

// Sums each expert's gradients over the subsets it belongs to (one vector of positions).
template <class V, int kM>
struct SubsetGradSums {
  Slots<V, kM> mu, logvar, logit;
  explicit SubsetGradSums(int m) : mu(m), logvar(m), logit(m) {}
  void clear(int m) {
    for (int i = 0; i < m; ++i) mu[i] = logvar[i] = logit[i] = V(typename V::value_type(0));
  }
};

template <class V, int kM>
struct SubsetGradSink {
  SubsetGradSums<V, kM>& sums;
  void mu(int i, const V& v) { sums.mu[i] = sums.mu[i] + v; }
  void logvar(int i, const V& v) { sums.logvar[i] = sums.logvar[i] + v; }
  void logit(int i, const V& v) { sums.logit[i] = sums.logit[i] + v; }
};

template <class scalar_t, int kM, bool kLogits>
void subsets_backward_rows(const FuseArgs& a, const BackwardArgs& g, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  const int m = static_cast<int>(a.m);
  Experts<V, kM> e(m);
  SubsetGradSums<V, kM> sums(m);
  SubsetGradSink<V, kM> sink{sums};
  const uint32_t subsets = (1u << a.m) - 1;
  auto store = [&](void* out, const Slots<V, kM>& values, int64_t n, int64_t d0, int64_t count) {
    if (out == nullptr) return;
    for (int i = 0; i < m; ++i) store_vec(static_cast<scalar_t*>(out) + a.out_index(i, n, d0), values[i], count);
  };
  for_each_vector<scalar_t, kLogits>(a, e, row_begin, row_end, [&](int64_t n, int64_t d0, int64_t count,
                                                                   uint32_t present) {
    sums.clear(m);
    for (uint32_t members = 1; members <= subsets; ++members) {
      if ((members & ~present) != 0) continue;  // not a component of this row: no gradient
      Subset<Experts<V, kM>> subset{e, members};
      backward_point<VecOps<acc_t>, kLogits, false>(
          subset, a.prior, load_operand_or_zero<scalar_t>(g.grad_joint_mu, members - 1, n, d0, count),
          load_operand_or_zero<scalar_t>(g.grad_joint_logvar, members - 1, n, d0, count), sink);
    }
    store(g.grad_mu, sums.mu, n, d0, count);
    store(g.grad_logvar, sums.logvar, n, d0, count);
    if constexpr (kLogits) store(g.grad_logits, sums.logit, n, d0, count);
  });
}

}  // namespace

void fuse_forward_rows(const FuseArgs& args, const ForwardOut& out, int64_t row_begin, int64_t row_end) {
  dispatch<c10::Half, c10::BFloat16>(args, [&](auto scalar, auto experts, auto logits) {
    dispatch_bool(out.weights != nullptr, [&](auto weights) {
      forward_rows<decltype(scalar), decltype(experts)::value, decltype(logits)::value, decltype(weights)::value>(
          args, out, row_begin, row_end);
    });
  });
}

void mopoe_forward_rows(const FuseArgs& args, const ForwardOut& out, int64_t row_begin, int64_t row_end) {
  dispatch<c10::Half, c10::BFloat16>(args, [&](auto scalar, auto experts, auto logits) {
    subsets_forward_rows<decltype(scalar), decltype(experts)::value, decltype(logits)::value>(args, out, row_begin,
                                                                                               row_end);
  });
}

void mopoe_backward_rows(const FuseArgs& args, const BackwardArgs& grads, int64_t row_begin, int64_t row_end) {
  dispatch<c10::Half, c10::BFloat16>(args, [&](auto scalar, auto experts, auto logits) {
    subsets_backward_rows<decltype(scalar), decltype(experts)::value, decltype(logits)::value>(args, grads, row_begin,
                                                                                                row_end);
  });
}

void fuse_backward_rows(const FuseArgs& args, const BackwardArgs& grads, int64_t chunk, int64_t row_begin,
                        int64_t row_end) {
  dispatch<c10::Half, c10::BFloat16>(args, [&](auto scalar, auto experts, auto logits) {
    dispatch_bool(grads.grad_weights.data != nullptr, [&](auto weight_grad) {
      backward_rows<decltype(scalar), decltype(experts)::value, decltype(logits)::value,
                    decltype(weight_grad)::value>(args, grads, chunk, row_begin, row_end);
    });
  });
}

}  // namespace gpoe::cpu::CPU_CAPABILITY
