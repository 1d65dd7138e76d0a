// The vectorised CPU kernels, compiled once per instruction set with -DCPU_CAPABILITY=<set>
// (see ../fusion_cpu_kernels.h). One row at a time, the latent dimensions are walked in SIMD
// vectors of at::vec::Vectorized<acc_t>; the experts of one vector are held in a small array
// (compile-time sized for M <= 8) and the math is gpoe::forward_point / backward_point.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

// Whether scalar_t is a 16-bit type, whose results are rounded to 8 or 11 bits.
template <class scalar_t>
inline constexpr bool kNarrowType = sizeof(scalar_t) == 2;

// exp and log for float vectors, inlined (ATen's Vectorized<float>::exp()/log() are Sleef calls
// which, on x86, spill every vector register around each use; inlined, the forward runs about
// 1.4x faster here). Both are within ~1.5 ulp of the exact value on the arguments the fusion
// produces: exp on x <= 88.3 (here always x <= 0), log on x >= 0.

// exp: x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two so k ln2 is exact), exp(r) by a
// polynomial, times 2^k built in the exponent bits. k comes from one multiply-add: adding
// kExpShift = 1.5 2^23 + 127 rounds x log2(e) to the nearest integer k and leaves 127 + k in the
// low mantissa bits, which shifted by 23 are the exponent field of 2^k (no rounding or conversion
// instruction). The polynomial is 1 + r + r^2 q(r), q fitted for least maximum relative error on
// [-ln2/2, ln2/2] (a Lawson-weighted least-squares fit, the coefficients rounded to float): degree
// 6 (relative error 6.1e-8 evaluated in float, about that of the Taylor series to r^7, with one
// multiply-add fewer); kNarrow, for 16-bit inputs whose outputs keep 8 or 11 bits, degree 5 (1.6e-7,
// a 3000th of float16's half ulp, so a result is rarely rounded differently from the exact value's
// rounding: docs/kernels.md, "Cheaper exponentials"). Results below 2^-126
// flush to zero: every exp here is a term of a sum that holds a 1 (the largest term), so a
// subnormal one is below the sum's resolution.
constexpr float kExpShift = 12583039.0f;  // 1.5 * 2^23 + 127

template <bool kNarrow = false>
GPOE_HD Vec<float> exp_f32(const Vec<float>& x) {
  using V = Vec<float>;
  // clamp_min keeps a NaN x (one instruction; maximum() spends three on NaN either side).
  const V clamped = at::vec::clamp_min(x, V(-88.0f));  // keeps k >= -127 (2^-127 -> the bits of 0)
  const V shifted = at::vec::fmadd(clamped, V(1.44269504088896341f), V(kExpShift));
  const V k = shifted - V(kExpShift);
  V r = at::vec::fmadd(k, V(-0.693145751953125f), clamped);
  r = at::vec::fmadd(k, V(-1.428606820309417232e-06f), r);
  V p;
  if constexpr (kNarrow) {
    p = at::vec::fmadd(V(0.008312505669891834f), r, V(0.04189009591937065f));
    p = at::vec::fmadd(p, r, V(0.16667114198207855f));
    p = at::vec::fmadd(p, r, V(0.499992311000824f));
  } else {
    p = at::vec::fmadd(V(0.0013814592966809869f), r, V(0.008368708193302155f));
    p = at::vec::fmadd(p, r, V(0.04166838899254799f));
    p = at::vec::fmadd(p, r, V(0.1666652113199234f));
    p = at::vec::fmadd(p, r, V(0.4999999403953552f));
  }
  p = at::vec::fmadd(p, r, V(1.0f));
  p = at::vec::fmadd(p, r, V(1.0f));
  return p * at::vec::cast<float>(at::vec::cast<int32_t>(shifted) << Vec<int32_t>(23));
}

// log: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(z), z = (m - 1) / (m + 1),
// |z| <= 0.172, by its series to z^9 (truncation < 1e-9 relative; kNarrow: to z^5, < 4e-6);
// log x = e ln2 + log m. Subnormal x are scaled by 2^23 first; log(0) = -inf, log(inf) = inf,
// log(x < 0) = NaN.
template <bool kNarrow = false>
GPOE_HD Vec<float> log_f32(const Vec<float>& x) {
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
  V p(kNarrow ? 1.0f / 5.0f : 1.0f / 9.0f);
  if constexpr (!kNarrow) {
    p = at::vec::fmadd(p, z2, V(1.0f / 7.0f));
    p = at::vec::fmadd(p, z2, V(1.0f / 5.0f));
  }
  p = at::vec::fmadd(p, z2, V(1.0f / 3.0f));
  p = at::vec::fmadd(p, z2, V(1.0f));
  const V log_m = (z + z) * p;
  V result = at::vec::fmadd(e, V(0.693145751953125f), at::vec::fmadd(e, V(1.428606820309417232e-06f), log_m));
  result = V::blendv(result, V(-std::numeric_limits<float>::infinity()), x == V(0.0f));
  result = V::blendv(result, x, x == V(std::numeric_limits<float>::infinity()));
  return V::blendv(result, V(std::numeric_limits<float>::quiet_NaN()), (x < V(0.0f)) | x.isnan());
}

// The math's operations on vectors of T (fusion_math.h); kNarrow: for 16-bit inputs (see exp_f32).
template <class T, bool kNarrow = false>
struct VecOps;

template <bool kNarrow>
struct VecOps<float, kNarrow> {
  using V = Vec<float>;
  GPOE_HD static V zero() { return V(0.0f); }
  GPOE_HD static V one() { return V(1.0f); }
  GPOE_HD static V neg_inf() { return V(-std::numeric_limits<float>::infinity()); }
  GPOE_HD static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  GPOE_HD static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  GPOE_HD static V exp(const V& x) { return exp_f32<kNarrow>(x); }
  GPOE_HD static V log(const V& x) { return log_f32<kNarrow>(x); }
};

template <bool kNarrow>
struct VecOps<double, kNarrow> {
  using V = Vec<double>;
  GPOE_HD static V zero() { return V(0.0); }
  GPOE_HD static V one() { return V(1.0); }
  GPOE_HD static V neg_inf() { return V(-std::numeric_limits<double>::infinity()); }
  GPOE_HD static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  GPOE_HD static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  GPOE_HD static V exp(const V& x) { return x.exp(); }
  GPOE_HD static V log(const V& x) { return x.log(); }
};

// `count` (<= the vector width) consecutive elements from p (or, `broadcast`, the one element at
// p repeated), as a vector of acc_t; lanes past `count` are zero. 16-bit values are widened with
// ATen's vector conversion (a shift for bfloat16, F16C for float16), a whole vector at a time.
template <class scalar_t, class acc_t = acc_type<scalar_t>>
GPOE_HD Vec<acc_t> load_vec(const scalar_t* p, bool broadcast, int64_t count) {
  using V = Vec<acc_t>;
  if (broadcast) return V(static_cast<acc_t>(*p));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return V::loadu(p, count);
  } else {
    V out;
    if (count == V::size()) {
      at::vec::load_to_float(p, out);
    } else {
      scalar_t buffer[V::size()] = {};
      std::copy(p, p + count, buffer);
      at::vec::load_to_float(buffer, out);
    }
    return out;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Whether to convert with AVX512-BF16 (CPUID leaf 7, subleaf 1, eax bit 5: Intel since Cooper
// Lake, AMD since Zen 4): where the CPU has it, unless GPOE_FUSION_NO_AVX512_BF16 is set (the
// tests compare both paths on one machine).
const bool kHasAvx512Bf16 = [] {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u) &&
         std::getenv("GPOE_FUSION_NO_AVX512_BF16") == nullptr;
}();

// 16 floats rounded to bfloat16, to nearest even. With AVX512-BF16 one instruction, written by its
// mnemonic: compiling this file with -mavx512bf16 would let the compiler use the extension
// anywhere, and the file must run on every AVX512 CPU. It differs from c10's rounding only in
// flushing float subnormals (below 2^-126) to zero and in a NaN's payload. Without it, ATen's
// conversion: eight instructions (docs/kernels.md, "The full table on the Intel machine, and one
// instruction per bfloat16 conversion").
GPOE_HD __m256i float_to_bfloat16(const Vec<float>& v) {
  if (!kHasAvx512Bf16) return at::vec::cvtfp32_bf16(v);
  __m256i bits;
  const __m512 floats = v;
  asm("vcvtneps2bf16 %1, %0" : "=v"(bits) : "v"(floats));
  return bits;
}
#endif

// A whole vector of float rounded to the 16-bit type (to nearest even, as c10's conversions) and
// stored at p.
template <class scalar_t>
GPOE_HD void store_narrowed(scalar_t* p, const Vec<float>& v) {
  constexpr bool kBFloat16 = std::is_same_v<scalar_t, c10::BFloat16>;
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i bits = kBFloat16 ? float_to_bfloat16(v) : at::vec::cvtfp32_fp16(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i bits = kBFloat16 ? at::vec::cvtfp32_bf16(v) : at::vec::cvtfp32_fp16(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
#else
  float lanes[Vec<float>::size()];
  v.store(lanes);
  for (int j = 0; j < Vec<float>::size(); ++j) p[j] = static_cast<scalar_t>(lanes[j]);
#endif
}

template <class scalar_t, class acc_t>
GPOE_HD void store_vec(scalar_t* p, const Vec<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else if (count == Vec<acc_t>::size()) {
    store_narrowed(p, v);
  } else {
    acc_t buffer[Vec<acc_t>::size()];
    v.store(buffer);
    for (int64_t j = 0; j < count; ++j) p[j] = static_cast<scalar_t>(buffer[j]);
  }
}

// ---- Memory traffic --------------------------------------------------------------------------------
//
// The kernels read M experts' operands and write M experts' outputs at once, each a stream of its
// own: 3M + 2 streams in the forward, 6M + 2 in the backward, 2^(M+1) - 2 outputs in MoPoE's
// forward. Two measures keep large calls at the memory's speed (docs/kernels.md, "CPU"):
//
// - Outputs larger than the caches (OutputRows) are written a tile of a row at a time into a buffer
//   that stays in the L1 cache, and each finished tile is streamed out of it with non-temporal
//   stores, whole cache lines one slice after the other: no line of the output is read before it is
//   overwritten (a third of a backward's traffic) and the stores wait on no read. Written in
//   place, the loads of every output line compete with the inputs' (and with 16-bit outputs, half
//   lines streamed out directly would leave the write-combining buffers partly filled).
// - Where the call reads more streams than the L2 hardware prefetcher follows, each load also asks
//   for the positions kPrefetchBytes further on (in the next row where this one ends). Intel's
//   cores follow 32 streams (Intel's optimisation manual), and below that prefetching only costs
//   time; on AMD's Zen 4 it gained 10-35 % from 12 streams up and lost up to 0.3 ms in the
//   smallest calls, so there it is always on. Rows longer than kPrefetchBytes are not prefetched a
//   whole row ahead: a row of 4 KiB would put every prefetched line in the L1 set of the line being
//   read, where the experts' streams already compete whenever N D times the element size is a
//   multiple of 4 KiB; at M = 13, D = 1024 the forward then took 2.4x as long as with 512 bytes
//   (docs/kernels.md).

// Bytes written per call above which the outputs are streamed past the caches.
constexpr int64_t kStreamingBytes = int64_t{32} << 20;
// The bytes of OutputRows' buffer (two thirds of a 48 KiB L1 data cache).
constexpr int64_t kTileBytes = int64_t{32} << 10;
// How far ahead of a load its prefetch asks, at most (whole rows, where they are shorter).
constexpr int64_t kPrefetchBytes = 512;

// Input streams beyond which the loads prefetch (see "Memory traffic"): 32 on Intel, 0 on AMD.
inline int64_t prefetcher_streams() {
  static const int64_t streams = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // The vendor string "AuthenticAMD": "Auth" in ebx, "cAMD" in ecx.
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) && ebx == 0x68747541 && ecx == 0x444d4163) return int64_t{0};
#endif
    return int64_t{32};
  }();
  return streams;
}

// n bytes from src to dst, the whole cache lines of dst with non-temporal stores.
inline void stream_copy(void* dst, const void* src, int64_t n) {
  auto* to = static_cast<char*>(dst);
  const auto* from = static_cast<const char*>(src);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const int64_t head = std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(to) % 64) % 64);
  std::memcpy(to, from, head);
  to += head, from += head, n -= head;
  for (; n >= 64; to += 64, from += 64, n -= 64) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(to), _mm512_loadu_si512(from));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + 32)));
#endif
  }
#endif
  std::memcpy(to, from, n);
}

// The per-element outputs of one chunk of rows: `targets`, each [K = slices, N, D] (nullptr: not
// wanted). Small calls write them in place; large ones (see "Memory traffic") into a buffer of one
// tile of a row, [targets, slices, tile], whose every slice is streamed out once the tile is
// written (`written`). A tile is as many dimensions as fit kTileBytes, at least a cache line.
template <class scalar_t>
class OutputRows {
 public:
  OutputRows(const FuseArgs& a, std::initializer_list<void*> targets, int64_t slices)
      : a_(a), targets_(targets), slices_(slices), tile_(a.d) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    int64_t wanted = 0;
    for (void* t : targets_) wanted += t != nullptr;
    constexpr int64_t kElement = sizeof(scalar_t), kWidth = Vec<acc_type<scalar_t>>::size();
    if (wanted * slices * a.n * a.d * kElement > kStreamingBytes) {
      const int64_t fit = kTileBytes / (wanted * slices * kElement) / kWidth * kWidth;
      tile_ = std::min(a.d, std::max({fit, kWidth, (64 / kElement + kWidth - 1) / kWidth * kWidth}));
      buffer_.resize(static_cast<size_t>(static_cast<int64_t>(targets_.size()) * slices * tile_));
    }
#endif
  }
  OutputRows(const OutputRows&) = delete;
  OutputRows& operator=(const OutputRows&) = delete;
  // Streaming stores are weakly ordered: make them visible before the chunk counts as done.
  ~OutputRows() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (!buffer_.empty()) _mm_sfence();
#endif
  }

  bool wanted(int k) const { return targets_[k] != nullptr; }
  // Where output k's [slice i, row n, dimensions from d0] go (only where wanted(k)); a vector at d0
  // never crosses a tile (tiles are whole vectors), and the vectors of a row come in order.
  scalar_t* at(int k, int64_t i, int64_t n, int64_t d0) {
    if (buffer_.empty()) return static_cast<scalar_t*>(targets_[k]) + a_.out_index(i, n, d0);
    return buffer_.data() + dense_index(k, i, d0 - tile_begin_, slices_, tile_);
  }
  // Row n's outputs up to dimension d_end are written: stream out a tile they complete.
  void written(int64_t n, int64_t d_end) {
    if (buffer_.empty() || (d_end - tile_begin_ < tile_ && d_end != a_.d)) return;
    const int64_t begin = tile_begin_;
    const int64_t bytes = (d_end - begin) * static_cast<int64_t>(sizeof(scalar_t));
    tile_begin_ = d_end == a_.d ? 0 : d_end;
    for (int k = 0; k < static_cast<int>(targets_.size()); ++k) {
      if (!wanted(k)) continue;
      for (int64_t i = 0; i < slices_; ++i) {
        stream_copy(static_cast<scalar_t*>(targets_[k]) + a_.out_index(i, n, begin),
                    buffer_.data() + dense_index(k, i, 0, slices_, tile_), bytes);
      }
    }
  }

 private:
  const FuseArgs& a_;
  std::vector<void*> targets_;
  int64_t slices_;
  int64_t tile_;
  int64_t tile_begin_ = 0;  // the first dimension of the tile in the buffer
  std::vector<scalar_t> buffer_;  // [targets, slices, tile] when streaming
};

// Whether a call whose inputs are `per_element_inputs` [M, N, D] operands and `rows` [N, D] ones
// reads more streams than the hardware prefetcher follows.
inline bool many_streams(const FuseArgs& a, int64_t per_element_inputs, int64_t rows = 0) {
  return rows + per_element_inputs * a.m > prefetcher_streams();
}

// Asks for the cache line at p now: see "Memory traffic" above.
GPOE_HD void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// The vector of positions [n, d0, d0 + count) of slice i of operand o, as a vector of acc_t.
template <class scalar_t, class acc_t = acc_type<scalar_t>>
GPOE_HD Vec<acc_t> load_operand(const Operand& o, int64_t i, int64_t n, int64_t d0, int64_t count) {
  return load_vec<scalar_t, acc_t>(o.at<scalar_t>(i, n, d0), o.broadcast_d(), count);
}

// The same, or zeros for an absent operand (an incoming gradient that is zero).
template <class scalar_t, class acc_t = acc_type<scalar_t>>
GPOE_HD Vec<acc_t> load_operand_or_zero(const Operand& o, int64_t i, int64_t n, int64_t d0, int64_t count) {
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

// One row n of the inputs (and with kWeightGrad the weights' incoming gradient), and the loads of
// one vector of it; with `ahead` (the call reads many streams, and row n + 1 is the chunk's), each
// load also asks for the positions `distance` further on: of this row, or past its end of row n + 1.
template <class scalar_t>
struct RowInputs {
  RowInputs(const FuseArgs& a, int64_t n, bool ahead, const Operand& grad_weights = Operand{})
      : a(a), n(n), ahead(ahead), mu(a.mu.row<scalar_t>(n)), logvar(a.logvar.row<scalar_t>(n)),
        logits(a.logits.row<scalar_t>(n)), weight_grad(grad_weights.row<scalar_t>(n)),
        next{a.mu.row<scalar_t>(n + ahead), a.logvar.row<scalar_t>(n + ahead), a.logits.row<scalar_t>(n + ahead),
             grad_weights.row<scalar_t>(n + ahead)},
        distance(std::min<int64_t>(a.d, std::max<int64_t>(1, kPrefetchBytes / int64_t{sizeof(scalar_t)}))) {}

  template <class E>
  GPOE_HD void load_presence(E& e) const {
    for (int i = 0; i < e.count(); ++i) {
      e.present_[i] = a.present(i, n);
    }
  }

  // The inputs of one vector of positions; with kWeightGrad also the weights' incoming gradient.
  template <bool kLogits, bool kWeightGrad = false, class E>
  GPOE_HD void load(E& e, int64_t d0, int64_t count) const {
    // The positions this vector's loads prefetch: `distance` on, in this row or row n + 1.
    const bool same_row = d0 + distance < a.d;
    const int64_t ahead_d = same_row ? d0 + distance : d0 + distance - a.d;
    const OperandRow<scalar_t>& ahead_mu = same_row ? mu : next[0];
    const OperandRow<scalar_t>& ahead_logvar = same_row ? logvar : next[1];
    const OperandRow<scalar_t>& ahead_logits = same_row ? logits : next[2];
    const OperandRow<scalar_t>& ahead_weight_grad = same_row ? weight_grad : next[3];
    for (int i = 0; i < e.count(); ++i) {
      // Masked experts are not read: they may hold anything, NaN included.
      if (!e.present(i)) continue;
      e.mu_[i] = load_vec(mu.at(i, d0), false, count);
      e.logvar_[i] = load_vec(logvar.at(i, d0), false, count);
      if constexpr (kLogits) e.logit_[i] = load_vec(logits.at(i, d0), logits.broadcast_d(), count);
      if constexpr (kWeightGrad) e.weight_grad_[i] = load_vec(weight_grad.at(i, d0), false, count);
      if (ahead) {
        prefetch(ahead_mu.at(i, ahead_d));
        prefetch(ahead_logvar.at(i, ahead_d));
        if constexpr (kLogits) prefetch(ahead_logits.at(i, ahead_d));
        if constexpr (kWeightGrad) prefetch(ahead_weight_grad.at(i, ahead_d));
      }
    }
  }

  const FuseArgs& a;
  int64_t n;
  bool ahead;
  OperandRow<scalar_t> mu, logvar, logits, weight_grad;
  OperandRow<scalar_t> next[4];  // the same of row n + 1, with `ahead`
  int64_t distance;  // elements between a load and its prefetch
};

// Stores the experts' weights of one vector of positions [n, d0, d0 + count) into the [M, N, D] output.
template <class scalar_t>
struct WeightStore {
  using V = Vec<acc_type<scalar_t>>;
  OutputRows<scalar_t>& out;
  int64_t n = 0, d0 = 0, count = 0;
  void weight(int i, const V& v) { store_vec(out.at(0, i, n, d0), v, count); }
};

template <class scalar_t, int kM, bool kLogits, bool kWeights>
void forward_rows(const FuseArgs& a, const ForwardOut& out, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t kWidth = V::size();
  Experts<V, kM> e(static_cast<int>(a.m));
  auto* joint_mu = static_cast<scalar_t*>(out.joint_mu);
  auto* joint_logvar = static_cast<scalar_t*>(out.joint_logvar);
  OutputRows<scalar_t> weight_rows(a, {out.weights}, a.m);
  WeightStore<scalar_t> weights{weight_rows};
  const bool many = many_streams(a, 2 + kLogits);
  NoWeights none;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const RowInputs<scalar_t> row(a, n, many && n + 1 < row_end);
    row.load_presence(e);
    for (int64_t d0 = 0; d0 < a.d; d0 += kWidth) {
      const int64_t count = std::min(kWidth, a.d - d0);
      row.template load<kLogits>(e, d0, count);
      V mu, logvar;
      if constexpr (kWeights) {
        weights.n = n;
        weights.d0 = d0;
        weights.count = count;
        forward_point<VecOps<acc_t, kNarrowType<scalar_t>>, kLogits, true>(e, a.prior, mu, logvar, weights);
      } else {
        forward_point<VecOps<acc_t, kNarrowType<scalar_t>>, kLogits, false>(e, a.prior, mu, logvar, none);
      }
      store_vec(joint_mu + a.out_index(0, n, d0), mu, count);
      store_vec(joint_logvar + a.out_index(0, n, d0), logvar, count);
      weight_rows.written(n, d0 + count);
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
  // The per-element gradients: grad_mu, grad_logvar and, for [M, N, D] logits, grad_logits.
  OutputRows<scalar_t>& out;

  // Expert i's gradient into per-element output k.
  void put(int k, int i, const V& v) {
    if (out.wanted(k)) store_vec(out.at(k, i, n, d0), v, count);
  }
  void mu(int i, const V& v) { put(0, i, v); }
  void logvar(int i, const V& v) { put(1, i, v); }
  void logit(int i, const V& v) {
    if (g.grad_logits == nullptr) return;
    switch (a.logit_reduce) {
      case LogitReduce::kNone:
        put(2, i, v);
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
  OutputRows<scalar_t> grad_rows(a, {g.grad_mu, g.grad_logvar,
                                      a.logit_reduce == LogitReduce::kNone ? g.grad_logits : nullptr}, a.m);
  GradSink<scalar_t, kM> sink{a, g, chunk, 0, 0, 0, sums, grad_rows};
  const bool many = many_streams(a, 2 + kLogits + kWeightGrad, 2);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const RowInputs<scalar_t> row(a, n, many && n + 1 < row_end, g.grad_weights);
    row.load_presence(e);
    sink.n = n;
    for (int64_t d0 = 0; d0 < a.d; d0 += kWidth) {
      const int64_t count = std::min(kWidth, a.d - d0);
      row.template load<kLogits, kWeightGrad>(e, d0, count);
      const V g_mu = load_operand_or_zero<scalar_t>(g.grad_joint_mu, 0, n, d0, count);
      const V g_logvar = load_operand_or_zero<scalar_t>(g.grad_joint_logvar, 0, n, d0, count);
      sink.d0 = d0;
      sink.count = count;
      backward_point<VecOps<acc_t, kNarrowType<scalar_t>>, kLogits, kWeightGrad>(e, a.prior, g_mu, g_logvar, sink);
      grad_rows.written(n, d0 + count);
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
      static_cast<acc_t*>(g.grad_logits)[dense_index(0, chunk, i, 0, a.m)] += horizontal_sum(sums[i]);
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
// loaded into e: f(n, d0, count, present_bits, ahead) for every vector; `many`: the call reads
// many streams (the experts' loads prefetch, and f is told when row n + 1 follows).
template <class scalar_t, bool kLogits, class E, class F>
void for_each_vector(const FuseArgs& a, E& e, int64_t row_begin, int64_t row_end, bool many, const F& f) {
  constexpr int64_t kWidth = Vec<acc_type<scalar_t>>::size();
  for (int64_t n = row_begin; n < row_end; ++n) {
    const RowInputs<scalar_t> row(a, n, many && n + 1 < row_end);
    row.load_presence(e);
    const uint32_t present = presence_bits(e);
    for (int64_t d0 = 0; d0 < a.d; d0 += kWidth) {
      const int64_t count = std::min(kWidth, a.d - d0);
      row.template load<kLogits>(e, d0, count);
      f(n, d0, count, present, row.ahead);
    }
  }
}

template <class scalar_t, int kM, bool kLogits>
void subsets_forward_rows(const FuseArgs& a, const ForwardOut& out, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  Experts<V, kM> e(static_cast<int>(a.m));
  const uint32_t subsets = (1u << a.m) - 1;
  OutputRows<scalar_t> rows(a, {out.joint_mu, out.joint_logvar}, subsets);
  NoWeights none;
  for_each_vector<scalar_t, kLogits>(a, e, row_begin, row_end, many_streams(a, 2 + kLogits),
                                     [&](int64_t n, int64_t d0, int64_t count, uint32_t present, bool) {
    for (uint32_t members = 1; members <= subsets; ++members) {
      V mu(acc_t(0)), logvar(acc_t(0));
      // A subset with a missing member is not a component of this row: zeros, never its NaN.
      if ((members & ~present) == 0) {
        Subset<Experts<V, kM>> subset{e, members};
        forward_point<VecOps<acc_t, kNarrowType<scalar_t>>, kLogits, false>(subset, a.prior, mu, logvar, none);
      }
      store_vec(rows.at(0, members - 1, n, d0), mu, count);
      store_vec(rows.at(1, members - 1, n, d0), logvar, count);
    }
    rows.written(n, d0 + count);
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
  OutputRows<scalar_t> rows(a, {g.grad_mu, g.grad_logvar, g.grad_logits}, a.m);
  auto store = [&](int k, const Slots<V, kM>& values, int64_t n, int64_t d0, int64_t count) {
    if (!rows.wanted(k)) return;
    for (int i = 0; i < m; ++i) store_vec(rows.at(k, i, n, d0), values[i], count);
  };
  const int64_t incoming = g.grad_joint_mu.present() + g.grad_joint_logvar.present();
  for_each_vector<scalar_t, kLogits>(a, e, row_begin, row_end, many_streams(a, 2 + kLogits, incoming * subsets),
                                     [&](int64_t n, int64_t d0, int64_t count, uint32_t present, bool ahead) {
    sums.clear(m);
    for (uint32_t members = 1; members <= subsets; ++members) {
      if (ahead) {
        if (g.grad_joint_mu.present()) prefetch(g.grad_joint_mu.at<scalar_t>(members - 1, n + 1, d0));
        if (g.grad_joint_logvar.present()) prefetch(g.grad_joint_logvar.at<scalar_t>(members - 1, n + 1, d0));
      }
      if ((members & ~present) != 0) continue;  // not a component of this row: no gradient
      Subset<Experts<V, kM>> subset{e, members};
      backward_point<VecOps<acc_t, kNarrowType<scalar_t>>, kLogits, false>(
          subset, a.prior, load_operand_or_zero<scalar_t>(g.grad_joint_mu, members - 1, n, d0, count),
          load_operand_or_zero<scalar_t>(g.grad_joint_logvar, members - 1, n, d0, count), sink);
    }
    store(0, sums.mu, n, d0, count);
    store(1, sums.logvar, n, d0, count);
    if constexpr (kLogits) store(2, sums.logit, n, d0, count);
    rows.written(n, d0 + count);
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
