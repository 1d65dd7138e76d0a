// CUDA kernels of the weighted Gaussian product, forward and backward.
//
// Each thread owns `kVec` consecutive dimensions of one row at a time (128-bit loads and stores
// where the operands are aligned) and loops over rows. For M in kStaticExperts the experts'
// values live in registers (arrays indexed by compile-time constants after unrolling); any
// other M takes the general path: one dimension per thread, experts re-read from memory (L1)
// in each pass of the math. The math itself is gpoe::forward_point / backward_point, shared
// with the CPU kernels. float16/bfloat16 are computed in float32, float64 in float64.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/fusion_cuda_kernels.h"
#include "dispatch.h"
#include "fusion_math.h"

namespace gpoe::cuda {
namespace {

constexpr int kThreads = 256;  // per block
// Resident blocks per multiprocessor the register allocation must allow (<= 128 registers a
// thread): 16 warps keep enough loads in flight to saturate memory bandwidth.
constexpr int kMinBlocks = 2;
constexpr int kBlocksPerSm = 16;  // grid size, in blocks per multiprocessor (several waves)

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <class A>
struct DeviceOps;

template <>
struct DeviceOps<float> {
  static __device__ __forceinline__ float zero() { return 0.0f; }
  static __device__ __forceinline__ float one() { return 1.0f; }
  static __device__ __forceinline__ float neg_inf() { return -INFINITY; }
  static __device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
  static __device__ __forceinline__ float fma(float a, float b, float c) { return fmaf(a, b, c); }
  // The accurate expf/logf (no fast-math intrinsics): results stay within float32 rounding.
  static __device__ __forceinline__ float exp(float x) { return expf(x); }
  static __device__ __forceinline__ float log(float x) { return logf(x); }
};

template <>
struct DeviceOps<double> {
  static __device__ __forceinline__ double zero() { return 0.0; }
  static __device__ __forceinline__ double one() { return 1.0; }
  static __device__ __forceinline__ double neg_inf() { return -INFINITY; }
  static __device__ __forceinline__ double max(double a, double b) { return fmax(a, b); }
  static __device__ __forceinline__ double fma(double a, double b, double c) { return ::fma(a, b, c); }
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
};

// ---- Loads and stores of kVec consecutive elements ------------------------------------------

template <int kBytes>
struct RawVector;
template <>
struct RawVector<2> { using type = uint16_t; };
template <>
struct RawVector<4> { using type = uint32_t; };
template <>
struct RawVector<8> { using type = uint2; };
template <>
struct RawVector<16> { using type = uint4; };

// kVec consecutive elements starting at p (`broadcast`: the one element at p repeated), in their
// storage type. `aligned`: p is aligned to the whole group, so it is one 64/128-bit load; `valid`
// elements exist (fewer at the row's tail; the rest are zero).
template <class T, int kVec>
__device__ __forceinline__ void load_raw(const T* p, bool broadcast, bool aligned, int64_t valid, T (&out)[kVec]) {
  if (broadcast) {
    const T x = p[0];
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = x;
  } else if (aligned && valid >= kVec) {
    using Raw = typename RawVector<sizeof(T) * kVec>::type;
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    memcpy(out, &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = j < valid ? p[j] : T(from_acc<T>(0));
  }
}

// The group [n, d0, d0 + kVec) of slice i of operand o, in its storage type.
template <class T, int kVec>
__device__ __forceinline__ void load_operand(const Operand& o, int64_t i, int64_t n, int64_t d0, bool aligned,
                                             int64_t valid, T (&out)[kVec]) {
  load_raw<T, kVec>(o.at<T>(i, n, d0), o.broadcast_d(), aligned, valid, out);
}

// The same, converted to the accumulation type.
template <class T, int kVec>
__device__ __forceinline__ void load_group(const Operand& o, int64_t i, int64_t n, int64_t d0, bool aligned,
                                           int64_t valid, acc_t<T> (&out)[kVec]) {
  T values[kVec];
  load_operand<T, kVec>(o, i, n, d0, aligned, valid, values);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_acc(values[j]);
}

template <class T, int kVec>
__device__ __forceinline__ void store_raw(T* p, bool aligned, int64_t valid, const T (&in)[kVec]) {
  if (aligned && valid >= kVec) {
    using Raw = typename RawVector<sizeof(T) * kVec>::type;
    Raw raw;
    memcpy(&raw, in, sizeof(raw));
    *reinterpret_cast<Raw*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < valid) p[j] = in[j];
    }
  }
}

template <class T, int kVec>
__device__ __forceinline__ void store_group(T* p, bool aligned, int64_t valid, const acc_t<T> (&in)[kVec]) {
  T values[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) values[j] = from_acc<T>(in[j]);
  store_raw<T, kVec>(p, aligned, valid, values);
}

struct Alignment {
  bool mu = false, logvar = false, logits = false, grad_mu = false, grad_logvar = false, grad_weights = false;
  bool out = false;  // the contiguous outputs ([N, D] or [M, N, D]): D % vec == 0
};

// ---- The experts of one thread ---------------------------------------------------------------

// Static path: kM experts x kVec dimensions, in registers, in their storage type (16-bit
// values take half the registers; each is converted where the math reads it). weight_grad holds
// the weights' incoming gradient, only with kWeightGrad.
template <class T, int kM, int kVec, bool kWeightGrad = false>
struct Registers {
  bool present[kM];
  T mu[kM][kVec];
  T logvar[kM][kVec];
  T logit[kM][kVec];
  T weight_grad[kWeightGrad ? kM : 1][kVec];
};

// One lane (dimension) j of Registers, as fusion_math.h reads experts.
template <class T, int kM, int kVec, bool kWeightGrad>
struct Lane {
  using value_type = acc_t<T>;
  using A = value_type;
  static constexpr bool kScratch = true;
  const Registers<T, kM, kVec, kWeightGrad>& r;
  int j;
  A w_[kM];
  A gs_[kM];
  A alpha_[kM];
  __device__ __forceinline__ int count() const { return kM; }
  __device__ __forceinline__ bool present(int i) const { return r.present[i]; }
  __device__ __forceinline__ A mu(int i) const { return to_acc(r.mu[i][j]); }
  __device__ __forceinline__ A logvar(int i) const { return to_acc(r.logvar[i][j]); }
  __device__ __forceinline__ A logit(int i) const { return to_acc(r.logit[i][j]); }
  __device__ __forceinline__ A weight_grad(int i) const { return to_acc(r.weight_grad[kWeightGrad ? i : 0][j]); }
  __device__ __forceinline__ A& w(int i) { return w_[i]; }
  __device__ __forceinline__ A& gs(int i) { return gs_[i]; }
  __device__ __forceinline__ A& alpha(int i) { return alpha_[i]; }
};

// The static path's weights for lane j, kept as computed (accumulation type) until stored.
template <class T, int kM, int kVec>
struct LaneWeights {
  acc_t<T> (&values)[kM][kVec];
  int j;
  __device__ __forceinline__ void weight(int i, acc_t<T> v) { values[i][j] = v; }
};

// The static path's gradients for lane j. They overwrite the inputs they replace in Registers
// (fusion_math.h reads an input for the last time before it hands out that input's gradient
// when kScratch is true), and are stored from there; with kReduce the logits' gradient is
// added, unrounded, into the thread's sums of the broadcast axes instead.
template <class T, int kM, int kVec, bool kReduce, bool kWeightGrad>
struct InPlaceSink {
  using A = acc_t<T>;
  static constexpr int kSums = kReduce ? kM : 1;
  Registers<T, kM, kVec, kWeightGrad>& r;
  int j;
  bool valid;  // lane j is inside the row (not padding past D)
  LogitReduce reduce;
  A (&row_sums)[kSums][kReduce ? kVec : 1];
  A (&dim_sums)[kSums];
  A (&all_sums)[kSums];
  __device__ __forceinline__ void mu(int i, A v) { r.mu[i][j] = from_acc<T>(v); }
  __device__ __forceinline__ void logvar(int i, A v) { r.logvar[i][j] = from_acc<T>(v); }
  __device__ __forceinline__ void logit(int i, A v) {
    if constexpr (kReduce) {
      if (!valid) return;
      if (reduce == LogitReduce::kRows) row_sums[i][j] += v;
      if (reduce == LogitReduce::kDims) dim_sums[i] += v;
      if (reduce == LogitReduce::kAll) all_sums[i] += v;
    } else {
      r.logit[i][j] = from_acc<T>(v);
    }
  }
};

template <class T, bool kLogits, int kM, int kVec, bool kWeightGrad>
__device__ __forceinline__ void load_registers(const FuseArgs& a, const Alignment& al, int64_t n, int64_t d0,
                                               int64_t valid, Registers<T, kM, kVec, kWeightGrad>& r,
                                               const Operand& grad_weights = Operand{}) {
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    r.present[i] = a.present(i, n);
    // Masked experts are not read: they may hold anything, NaN included.
    if (!r.present[i]) continue;
    load_operand<T, kVec>(a.mu, i, n, d0, al.mu, valid, r.mu[i]);
    load_operand<T, kVec>(a.logvar, i, n, d0, al.logvar, valid, r.logvar[i]);
    if constexpr (kLogits) load_operand<T, kVec>(a.logits, i, n, d0, al.logits, valid, r.logit[i]);
    if constexpr (kWeightGrad) load_operand<T, kVec>(grad_weights, i, n, d0, al.grad_weights, valid, r.weight_grad[i]);
  }
}

// General path: any M, one dimension, experts read from memory on each use.
template <class T>
struct GlobalExperts {
  using value_type = acc_t<T>;
  static constexpr bool kScratch = false;
  const FuseArgs& a;
  int64_t n, d;
  __device__ __forceinline__ int count() const { return static_cast<int>(a.m); }
  __device__ __forceinline__ bool present(int i) const { return a.present(i, n); }
  __device__ __forceinline__ value_type mu(int i) const { return to_acc(*a.mu.at<T>(i, n, d)); }
  __device__ __forceinline__ value_type logvar(int i) const { return to_acc(*a.logvar.at<T>(i, n, d)); }
  __device__ __forceinline__ value_type logit(int i) const { return to_acc(*a.logits.at<T>(i, n, d)); }
  __device__ __forceinline__ value_type weight_grad(int i) const { return to_acc(*grad_weights->at<T>(i, n, d)); }
  const Operand* grad_weights = nullptr;  // the weights' incoming gradient (backward with it only)
};

// General path's weights: stored directly into the [M, N, D] output.
template <class T>
struct GlobalWeights {
  const FuseArgs& a;
  T* weights;
  int64_t n, d;
  __device__ __forceinline__ void weight(int i, acc_t<T> v) { weights[a.out_index(i, n, d)] = from_acc<T>(v); }
};

// General path's gradients: stored directly; broadcast logits' gradients added into the
// partial sums (a slot per thread for kRows / kAll; atomics for kDims).
template <class T>
struct GlobalSink {
  using A = acc_t<T>;
  const FuseArgs& a;
  const BackwardArgs& g;
  A* partial;
  int64_t n, d, row_slot, column_slot, columns;
  __device__ __forceinline__ int64_t offset(int i) const { return a.out_index(i, n, d); }
  __device__ __forceinline__ void mu(int i, A v) {
    if (g.grad_mu != nullptr) static_cast<T*>(g.grad_mu)[offset(i)] = from_acc<T>(v);
  }
  __device__ __forceinline__ void logvar(int i, A v) {
    if (g.grad_logvar != nullptr) static_cast<T*>(g.grad_logvar)[offset(i)] = from_acc<T>(v);
  }
  __device__ __forceinline__ void logit(int i, A v) {
    if (a.logit_reduce == LogitReduce::kNone) {
      if (g.grad_logits != nullptr) static_cast<T*>(g.grad_logits)[offset(i)] = from_acc<T>(v);
      return;
    }
    if (partial == nullptr) return;
    switch (a.logit_reduce) {
      case LogitReduce::kNone: break;
      case LogitReduce::kRows: partial[dense_index(row_slot, i, d, a.m, a.d)] += v; break;
      case LogitReduce::kDims: atomicAdd(partial + dense_index(0, i, n, a.m, a.n), v); break;
      case LogitReduce::kAll: partial[dense_index(row_slot, i, column_slot, a.m, columns)] += v; break;
    }
  }
};

// ---- Kernels ---------------------------------------------------------------------------------

template <class T, int kM, bool kLogits, bool kWeights, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocks) forward_kernel(const FuseArgs a, const ForwardOut out, const Alignment al) {
  using A = acc_t<T>;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t d0 = group * kVec;
  if (d0 >= a.d) return;
  const int64_t valid = a.d - d0;
  for (int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; n < a.n;
       n += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    A joint_mu[kVec], joint_logvar[kVec];
    if constexpr (kM > 0) {
      Registers<T, kM, kVec> r;
      load_registers<T, kLogits>(a, al, n, d0, valid, r);
      [[maybe_unused]] A weights[kWeights ? kM : 1][kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        Lane<T, kM, kVec, false> lane{r, j};
        if constexpr (kWeights) {
          LaneWeights<T, kM, kVec> sink{weights, j};
          forward_point<DeviceOps<A>, kLogits, true>(lane, a.prior, joint_mu[j], joint_logvar[j], sink);
        } else {
          NoWeights sink;
          forward_point<DeviceOps<A>, kLogits, false>(lane, a.prior, joint_mu[j], joint_logvar[j], sink);
        }
      }
      if constexpr (kWeights) {
#pragma unroll
        for (int i = 0; i < kM; ++i) {
          store_group<T, kVec>(static_cast<T*>(out.weights) + a.out_index(i, n, d0), al.out, valid, weights[i]);
        }
      }
    } else {
      GlobalExperts<T> experts{a, n, d0};
      if constexpr (kWeights) {
        GlobalWeights<T> sink{a, static_cast<T*>(out.weights), n, d0};
        forward_point<DeviceOps<A>, kLogits, true>(experts, a.prior, joint_mu[0], joint_logvar[0], sink);
      } else {
        NoWeights sink;
        forward_point<DeviceOps<A>, kLogits, false>(experts, a.prior, joint_mu[0], joint_logvar[0], sink);
      }
    }
    store_group<T, kVec>(static_cast<T*>(out.joint_mu) + a.out_index(0, n, d0), al.out, valid, joint_mu);
    store_group<T, kVec>(static_cast<T*>(out.joint_logvar) + a.out_index(0, n, d0), al.out, valid, joint_logvar);
  }
}

// Sum of v over the `width` (a power of two <= 32) lanes of this thread's segment of the warp.
template <class A>
__device__ __forceinline__ A segment_sum(A v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// kReduce: the logits are broadcast and their gradient is wanted, so it is summed into
// `partial` (else it is stored per element, or not at all); a template parameter so that the
// common kernels carry no accumulator registers.
template <class T, int kM, bool kLogits, bool kReduce, bool kWeightGrad, int kVec>
__global__ void __launch_bounds__(kThreads, kReduce || kWeightGrad ? 1 : kMinBlocks)
    backward_kernel(const FuseArgs a, const BackwardArgs g, const Alignment al, acc_t<T>* partial) {
  using A = acc_t<T>;
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t columns = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_slot = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t d0 = column * kVec;
  const bool in_row = d0 < a.d;
  const int64_t valid = a.d - d0;
  const LogitReduce reduce = kReduce ? a.logit_reduce : LogitReduce::kNone;

  constexpr int kSums = kReduce && kM > 0 ? kM : 1;
  [[maybe_unused]] A row_sums[kSums][kReduce ? kVec : 1] = {};  // kRows, static path
  [[maybe_unused]] A all_sums[kSums] = {};                      // kAll, static path
  // Uniform trip count across the block, so that the kDims warp reduction has every lane.
  for (int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.y; first < a.n;
       first += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t n = first + threadIdx.y;
    const bool active = in_row && n < a.n;
    A g_mu[kVec] = {}, g_logvar[kVec] = {};
    if (active && g.grad_joint_mu.present()) load_group<T, kVec>(g.grad_joint_mu, 0, n, d0, al.grad_mu, valid, g_mu);
    if (active && g.grad_joint_logvar.present()) {
      load_group<T, kVec>(g.grad_joint_logvar, 0, n, d0, al.grad_logvar, valid, g_logvar);
    }
    if constexpr (kM > 0) {
      [[maybe_unused]] A dim_sums[kSums] = {};  // kDims
      if (active) {
        Registers<T, kM, kVec, kWeightGrad> r;
        load_registers<T, kLogits>(a, al, n, d0, valid, r, g.grad_weights);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          Lane<T, kM, kVec, kWeightGrad> lane{r, j};
          InPlaceSink<T, kM, kVec, kReduce, kWeightGrad> sink{r, j, j < valid, reduce, row_sums, dim_sums, all_sums};
          backward_point<DeviceOps<A>, kLogits, kWeightGrad>(lane, a.prior, g_mu[j], g_logvar[j], sink);
        }
#pragma unroll
        for (int i = 0; i < kM; ++i) {
          const int64_t offset = a.out_index(i, n, d0);
          if (g.grad_mu != nullptr) store_raw<T, kVec>(static_cast<T*>(g.grad_mu) + offset, al.out, valid, r.mu[i]);
          if (g.grad_logvar != nullptr) {
            store_raw<T, kVec>(static_cast<T*>(g.grad_logvar) + offset, al.out, valid, r.logvar[i]);
          }
          if constexpr (kLogits && !kReduce) {
            if (g.grad_logits != nullptr) {
              store_raw<T, kVec>(static_cast<T*>(g.grad_logits) + offset, al.out, valid, r.logit[i]);
            }
          }
        }
      }
      if constexpr (kReduce) {
        if (reduce == LogitReduce::kDims) {
          const int width = blockDim.x < 32 ? static_cast<int>(blockDim.x) : 32;
          const int64_t slice = column / width;
#pragma unroll
          for (int i = 0; i < kM; ++i) {
            const A total = segment_sum(dim_sums[i], width);
            if (threadIdx.x % width == 0 && n < a.n) partial[dense_index(slice, i, n, a.m, a.n)] = total;
          }
        }
      }
    } else if (active) {
      GlobalExperts<T> experts{a, n, d0, &g.grad_weights};
      GlobalSink<T> sink{a, g, partial, n, d0, row_slot, column, columns};
      backward_point<DeviceOps<A>, kLogits, kWeightGrad>(experts, a.prior, g_mu[0], g_logvar[0], sink);
    }
  }
  if constexpr (kM > 0 && kReduce) {
    if (reduce == LogitReduce::kRows && in_row) {
#pragma unroll
      for (int i = 0; i < kM; ++i) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (j < valid) partial[dense_index(row_slot, i, d0 + j, a.m, a.d)] += row_sums[i][j];
        }
      }
    }
    if (reduce == LogitReduce::kAll) {
#pragma unroll
      for (int i = 0; i < kM; ++i) partial[dense_index(row_slot, i, column, a.m, columns)] += all_sums[i];
    }
  }
}

// ---- MoPoE --------------------------------------------------------------------------------------

// The experts of one point, in the accumulation type: kM of them (compile-time), or with kM = 0
// up to kMaxSubsetExperts (`m` at run time).
template <class A, int kM>
struct PointExperts {
  using value_type = A;
  static constexpr bool kScratch = true;
  static constexpr int kSlots = kM > 0 ? kM : kMaxSubsetExperts;
  int m;
  uint32_t present_bits = 0;
  A mu_[kSlots], logvar_[kSlots], logit_[kSlots], w_[kSlots], gs_[kSlots], alpha_[kSlots];
  __device__ __forceinline__ int count() const { return kM > 0 ? kM : m; }
  __device__ __forceinline__ bool present(int i) const { return ((present_bits >> i) & 1u) != 0; }
  __device__ __forceinline__ A mu(int i) const { return mu_[i]; }
  __device__ __forceinline__ A logvar(int i) const { return logvar_[i]; }
  __device__ __forceinline__ A logit(int i) const { return logit_[i]; }
  __device__ __forceinline__ A& w(int i) { return w_[i]; }
  __device__ __forceinline__ A& gs(int i) { return gs_[i]; }
  __device__ __forceinline__ A& alpha(int i) { return alpha_[i]; }
};

// The present experts of point (n, d); masked ones are not read (they may hold NaN).
template <class T, bool kLogits, int kM>
__device__ __forceinline__ void load_point(const FuseArgs& a, int64_t n, int64_t d, PointExperts<acc_t<T>, kM>& e) {
#pragma unroll
  for (int i = 0; i < PointExperts<acc_t<T>, kM>::kSlots; ++i) {
    if (i >= e.count() || !a.present(i, n)) continue;
    e.present_bits |= 1u << i;
    e.mu_[i] = to_acc(*a.mu.at<T>(i, n, d));
    e.logvar_[i] = to_acc(*a.logvar.at<T>(i, n, d));
    if constexpr (kLogits) e.logit_[i] = to_acc(*a.logits.at<T>(i, n, d));
  }
}

template <class T, int kM, bool kLogits>
__global__ void __launch_bounds__(kThreads) mopoe_forward_kernel(const FuseArgs a, const ForwardOut out) {
  using A = acc_t<T>;
  const int64_t points = a.n * a.d;
  const uint32_t subsets = (1u << a.m) - 1;
  NoWeights none;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < points;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / a.d, d = p % a.d;
    PointExperts<A, kM> e{static_cast<int>(a.m)};
    load_point<T, kLogits>(a, n, d, e);
    for (uint32_t members = 1; members <= subsets; ++members) {
      A joint_mu = A(0), joint_logvar = A(0);
      // A subset with a missing member is not a component of this row: zeros.
      if ((members & ~e.present_bits) == 0) {
        Subset<PointExperts<A, kM>> subset{e, members};
        forward_point<DeviceOps<A>, kLogits, false>(subset, a.prior, joint_mu, joint_logvar, none);
      }
      const int64_t offset = a.out_index(members - 1, n, d);
      static_cast<T*>(out.joint_mu)[offset] = from_acc<T>(joint_mu);
      static_cast<T*>(out.joint_logvar)[offset] = from_acc<T>(joint_logvar);
    }
  }
}

// Adds each subset's per-expert gradients into the point's sums.
template <class A, int kSlots>
struct SubsetSums {
  A mu[kSlots], logvar[kSlots], logit[kSlots];
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) mu[i] = logvar[i] = logit[i] = A(0);
  }
};

template <class A, int kSlots>
struct SubsetSumSink {
  SubsetSums<A, kSlots>& sums;
  __device__ __forceinline__ void mu(int i, A v) { sums.mu[i] += v; }
  __device__ __forceinline__ void logvar(int i, A v) { sums.logvar[i] += v; }
  __device__ __forceinline__ void logit(int i, A v) { sums.logit[i] += v; }
};

template <class T, int kM, bool kLogits>
__global__ void __launch_bounds__(kThreads) mopoe_backward_kernel(const FuseArgs a, const BackwardArgs g) {
  using A = acc_t<T>;
  using E = PointExperts<A, kM>;
  const int64_t points = a.n * a.d;
  const uint32_t subsets = (1u << a.m) - 1;
  auto incoming = [&](const Operand& o, uint32_t members, int64_t n, int64_t d) {
    return o.present() ? to_acc(*o.at<T>(members - 1, n, d)) : A(0);
  };
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < points;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / a.d, d = p % a.d;
    E e{static_cast<int>(a.m)};
    load_point<T, kLogits>(a, n, d, e);
    SubsetSums<A, E::kSlots> sums;
    sums.clear();
    SubsetSumSink<A, E::kSlots> sink{sums};
    for (uint32_t members = 1; members <= subsets; ++members) {
      if ((members & ~e.present_bits) != 0) continue;  // not a component of this row: no gradient
      Subset<E> subset{e, members};
      backward_point<DeviceOps<A>, kLogits, false>(subset, a.prior, incoming(g.grad_joint_mu, members, n, d),
                                                   incoming(g.grad_joint_logvar, members, n, d), sink);
    }
    for (int i = 0; i < e.count(); ++i) {
      const int64_t offset = a.out_index(i, n, d);
      if (g.grad_mu != nullptr) static_cast<T*>(g.grad_mu)[offset] = from_acc<T>(sums.mu[i]);
      if (g.grad_logvar != nullptr) static_cast<T*>(g.grad_logvar)[offset] = from_acc<T>(sums.logvar[i]);
      if (kLogits && g.grad_logits != nullptr) static_cast<T*>(g.grad_logits)[offset] = from_acc<T>(sums.logit[i]);
    }
  }
}

// ---- Dispatch --------------------------------------------------------------------------------

size_t element_bytes(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat64: return 8;
    case Dtype::kFloat32: return 4;
    default: return 2;
  }
}

// Elements per thread: 16 bytes of each operand (one 128-bit access) for M <= 4, 8 bytes for
// M = 8 so that the experts' registers stay within the 255 a thread has; the general path
// (kM = 0) takes one.
template <class T, int kM>
constexpr int vector_width() {
  if constexpr (kM == 0) {
    return 1;
  } else {
    constexpr int bytes = kM > 4 ? 8 : 16;
    return static_cast<int>(sizeof(T)) >= bytes ? 1 : bytes / static_cast<int>(sizeof(T));
  }
}

// The one table (dispatch.h) with this backend's 16-bit types; f(T{}, ExpertCount<kM>{},
// bool_constant<kLogits>{}, integral_constant<int, kVec>{}).
template <class F>
decltype(auto) dispatch_cuda(const FuseArgs& a, F&& f) {
  return dispatch<__half, __nv_bfloat16>(a, [&](auto scalar, auto experts, auto logits) {
    constexpr int kVec = vector_width<decltype(scalar), decltype(experts)::value>();
    return f(scalar, experts, logits, std::integral_constant<int, kVec>{});
  });
}

Alignment alignment(const FuseArgs& a, const BackwardArgs* g, int vec) {
  const size_t bytes = element_bytes(a.dtype);
  Alignment al;
  al.mu = a.mu.vectors_aligned(vec, bytes);
  al.logvar = a.logvar.vectors_aligned(vec, bytes);
  al.logits = a.logits.vectors_aligned(vec, bytes);
  if (g != nullptr) {
    al.grad_mu = g->grad_joint_mu.vectors_aligned(vec, bytes);
    al.grad_logvar = g->grad_joint_logvar.vectors_aligned(vec, bytes);
    al.grad_weights = g->grad_weights.vectors_aligned(vec, bytes);
  }
  al.out = a.d % vec == 0;
  return al;
}

}  // namespace

Plan plan(const FuseArgs& a, int sm_count) {
  Plan p;
  bool static_experts = false;
  dispatch_cuda(a, [&](auto, auto experts, auto, auto width) {
    p.vec = decltype(width)::value;
    static_experts = decltype(experts)::value > 0;
  });
  const int64_t groups = (a.d + p.vec - 1) / p.vec;
  unsigned block_x = 1;
  while (static_cast<int64_t>(block_x) < groups && block_x < kThreads) block_x *= 2;
  p.block_x = block_x;
  p.block_y = kThreads / block_x;
  p.grid_x = static_cast<unsigned>((groups + block_x - 1) / block_x);
  const int64_t row_blocks = std::max<int64_t>(1, (a.n + p.block_y - 1) / p.block_y);
  const int64_t wanted = std::max<int64_t>(1, int64_t{kBlocksPerSm} * sm_count / p.grid_x);
  p.grid_y = static_cast<unsigned>(std::min<int64_t>({row_blocks, wanted, 65535}));
  const int64_t row_slots = int64_t{p.grid_y} * p.block_y;
  const int64_t columns = int64_t{p.grid_x} * p.block_x;
  const int width = std::min<int>(static_cast<int>(p.block_x), 32);
  switch (a.logit_reduce) {
    case LogitReduce::kNone: break;
    case LogitReduce::kRows:
      p.partial_shape[0] = row_slots;
      p.partial_shape[1] = a.m;
      p.partial_shape[2] = a.d;
      break;
    case LogitReduce::kDims:
      p.partial_shape[0] = static_experts ? columns / width : 1;
      p.partial_shape[1] = a.m;
      p.partial_shape[2] = a.n;
      break;
    case LogitReduce::kAll:
      p.partial_shape[0] = row_slots;
      p.partial_shape[1] = a.m;
      p.partial_shape[2] = columns;
      break;
  }
  return p;
}

// A launch with a plan for other kernel parameters would index out of bounds: refuse it.
void check_plan(const Plan& p, int vec) {
  TORCH_CHECK(p.vec == vec, "gpoe_fusion: launch plan for ", p.vec, " elements per thread, kernel takes ", vec);
}

void fuse_forward(const FuseArgs& a, const ForwardOut& out, const Plan& p, cudaStream_t stream) {
  const Alignment al = alignment(a, nullptr, p.vec);
  dispatch_cuda(a, [&](auto scalar, auto experts, auto logits, auto width) {
    using T = decltype(scalar);
    constexpr int kVec = decltype(width)::value;
    check_plan(p, kVec);
    dispatch_bool(out.weights != nullptr, [&](auto weights) {
      forward_kernel<T, decltype(experts)::value, decltype(logits)::value, decltype(weights)::value, kVec>
          <<<dim3(p.grid_x, p.grid_y), dim3(p.block_x, p.block_y), 0, stream>>>(a, out, al);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void fuse_backward(const FuseArgs& a, const BackwardArgs& grads, void* partial, const Plan& p, cudaStream_t stream) {
  const Alignment al = alignment(a, &grads, p.vec);
  const bool reduce = partial != nullptr && a.logit_reduce != LogitReduce::kNone;
  dispatch_cuda(a, [&](auto scalar, auto experts, auto logits, auto width) {
    using T = decltype(scalar);
    constexpr int kM = decltype(experts)::value;
    constexpr bool kLogits = decltype(logits)::value;
    constexpr int kVec = decltype(width)::value;
    check_plan(p, kVec);
    const dim3 grid(p.grid_x, p.grid_y), block(p.block_x, p.block_y);
    auto* sums = static_cast<acc_t<T>*>(partial);
    dispatch_bool(grads.grad_weights.data != nullptr, [&](auto weight_grad) {
      constexpr bool kWeightGrad = decltype(weight_grad)::value;
      if (kLogits && reduce) {
        backward_kernel<T, kM, kLogits, kLogits, kWeightGrad, kVec><<<grid, block, 0, stream>>>(a, grads, al, sums);
      } else {
        backward_kernel<T, kM, kLogits, false, kWeightGrad, kVec><<<grid, block, 0, stream>>>(a, grads, al, nullptr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

unsigned mopoe_blocks(const FuseArgs& a, int sm_count) {
  const int64_t points = a.n * a.d;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((points + kThreads - 1) / kThreads, int64_t{kBlocksPerSm} * sm_count)));
}

void mopoe_forward(const FuseArgs& a, const ForwardOut& out, int sm_count, cudaStream_t stream) {
  dispatch<__half, __nv_bfloat16>(a, [&](auto scalar, auto experts, auto logits) {
    mopoe_forward_kernel<decltype(scalar), decltype(experts)::value, decltype(logits)::value>
        <<<mopoe_blocks(a, sm_count), kThreads, 0, stream>>>(a, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mopoe_backward(const FuseArgs& a, const BackwardArgs& grads, int sm_count, cudaStream_t stream) {
  dispatch<__half, __nv_bfloat16>(a, [&](auto scalar, auto experts, auto logits) {
    mopoe_backward_kernel<decltype(scalar), decltype(experts)::value, decltype(logits)::value>
        <<<mopoe_blocks(a, sm_count), kThreads, 0, stream>>>(a, grads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gpoe::cuda
