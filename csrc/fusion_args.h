// Plain-old-data descriptions of a fusion call, handed from the ATen host code to the CPU and
// CUDA kernels (which include no ATen tensor headers), and the ONE place where an element's
// address is computed from strides or shapes: the CPU and CUDA kernels address every operand,
// output and partial sum through the helpers below and do no index arithmetic of their own
// (tests/test_kernel_sources.py holds them to it), so an addressing bug cannot hide in the CUDA
// copy where no CPU test reaches.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define GPOE_HD __host__ __device__ __forceinline__
#define GPOE_UNROLL _Pragma("unroll")
#else
#define GPOE_HD inline __attribute__((always_inline))
#define GPOE_UNROLL
#endif

namespace gpoe {

// Element [i, r, c] of a contiguous [*, rows, cols] buffer (the kernels' outputs and partial sums;
// [rows, cols] buffers with i = 0).
GPOE_HD int64_t dense_index(int64_t i, int64_t r, int64_t c, int64_t rows, int64_t cols) {
  return (i * rows + r) * cols + c;
}

// MoPoE: the most experts whose subsets are enumerated (2^8 - 1 = 255 subsets).
inline constexpr int kMaxSubsetExperts = 8;

// The inputs' floating-point type. 16-bit types are computed in float32, float64 in float64.
enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// One row n of an operand: its elements [i, n, d] (Operand::row). A small value kept in registers,
// so that a kernel's loads of one row's experts do not recompute (or reload) the row's address.
template <class T>
struct OperandRow {
  const T* base = nullptr;
  int64_t stride_m = 0;
  int64_t stride_d = 1;
  GPOE_HD const T* at(int64_t i, int64_t d) const { return base + (i * stride_m + d * stride_d); }
  GPOE_HD bool broadcast_d() const { return stride_d == 0; }
};

// A strided operand indexed [m, n, d] (or [n, d] with stride_m unused). stride_d is 1, or 0
// when the operand is broadcast along d; data == nullptr means "absent".
struct Operand {
  const void* data = nullptr;
  int64_t stride_m = 0;
  int64_t stride_n = 0;
  int64_t stride_d = 1;

  GPOE_HD bool present() const { return data != nullptr; }
  // The element [i, n, d]; a vector of consecutive d starts there and is read with stride_d.
  template <class T>
  GPOE_HD const T* at(int64_t i, int64_t n, int64_t d) const {
    return static_cast<const T*>(data) + (i * stride_m + n * stride_n + d * stride_d);
  }
  // Row n (absent stays absent).
  template <class T>
  GPOE_HD OperandRow<T> row(int64_t n) const {
    return {data != nullptr ? at<T>(0, n, 0) : nullptr, stride_m, stride_d};
  }
  // A vector along d is one element repeated (broadcast), else consecutive elements.
  GPOE_HD bool broadcast_d() const { return stride_d == 0; }
  // Whether every vector of `vec` elements (of `element_bytes` each) that starts at a d divisible
  // by `vec` is aligned to its own size, so that it can be one wide load.
  bool vectors_aligned(int64_t vec, size_t element_bytes) const {
    const auto bytes = static_cast<uintptr_t>(vec) * element_bytes;
    return data != nullptr && reinterpret_cast<uintptr_t>(data) % bytes == 0 && stride_m % vec == 0 &&
           stride_n % vec == 0;
  }
};

// Which axes broadcast logits share, i.e. which axes the logits gradient is summed over.
enum class LogitReduce : int {
  kNone = 0,  // logits [M, N, D] (or no logits): one gradient per element
  kRows = 1,  // logits [M, 1, D]: summed over the rows n
  kDims = 2,  // logits [M, N, 1]: summed over the dimensions d
  kAll = 3,   // logits [M, 1, 1]: summed over both
};

struct FuseArgs {
  Dtype dtype = Dtype::kFloat32;  // of mu, logvar, logits, incoming gradients and outputs
  int64_t m = 0;  // experts
  int64_t n = 0;  // batch rows
  int64_t d = 0;  // latent dimensions
  Operand mu;      // [M, N, D], stride_d == 1
  Operand logvar;  // [M, N, D], stride_d == 1
  Operand logits;  // [M, N or 1, D or 1] (stride 0 on broadcast axes), or absent
  const bool* mask = nullptr;  // [M, N], true = present; nullptr = all present
  int64_t mask_stride_m = 0;
  int64_t mask_stride_n = 0;
  bool prior = false;  // add the N(0, I) prior expert
  LogitReduce logit_reduce = LogitReduce::kNone;

  // Whether expert i of row `row` is present.
  GPOE_HD bool present(int64_t i, int64_t row) const {
    return mask == nullptr || mask[i * mask_stride_m + row * mask_stride_n];
  }
  // Element [i, row, dim] of a contiguous [K, N, D] output (the weights, the gradients, MoPoE's
  // components; K = 1 for the joint [N, D]).
  GPOE_HD int64_t out_index(int64_t i, int64_t row, int64_t dim) const { return dense_index(i, row, dim, n, d); }
};

// Forward outputs: joint_mu, joint_logvar contiguous [N, D] in the inputs' dtype; weights, when
// asked for (else nullptr), contiguous [M, N, D] in the inputs' dtype: every expert's weight,
// alpha with logits, the share of the joint precision without (fusion_math.h).
struct ForwardOut {
  void* joint_mu = nullptr;
  void* joint_logvar = nullptr;
  void* weights = nullptr;
};

// Backward inputs and outputs. Incoming gradients are [N, D] operands (absent = zero), and the
// weights' gradient grad_weights an [M, N, D] operand with stride_d 1 (absent = zero). Outputs
// grad_mu and grad_logvar are contiguous [M, N, D] in the inputs' dtype, or nullptr when not
// wanted. grad_logits, when wanted, depends on logit_reduce:
//   kNone: contiguous [M, N, D] in the inputs' dtype;
//   otherwise: partial sums in the accumulation type whose layout each backend documents, and
//   which the host code sums and casts.
struct BackwardArgs {
  Operand grad_joint_mu;
  Operand grad_joint_logvar;
  Operand grad_weights;
  void* grad_mu = nullptr;
  void* grad_logvar = nullptr;
  void* grad_logits = nullptr;
};

}  // namespace gpoe
