// The one dispatch table of the kernels: from a call's runtime description (FuseArgs) to the
// compile-time parameters a kernel is instantiated with. The CPU and CUDA backends, their launch
// planning and their launches all go through `dispatch`, so which M get a specialised kernel and
// how wide each kernel's vectors are is written once and cannot differ between two places.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "fusion_args.h"

namespace gpoe {

// Expert counts with a kernel specialised at compile time (experts in registers / fixed arrays).
// Any other M takes the general path, instantiated with kM = 0.
inline constexpr int kStaticExperts[] = {1, 2, 3, 4, 8};

template <int kM>
using ExpertCount = std::integral_constant<int, kM>;

namespace detail {

template <class F, std::size_t... I>
decltype(auto) dispatch_experts(int64_t m, F&& f, std::index_sequence<I...>) {
  using Result = decltype(f(ExpertCount<0>{}));
  if constexpr (std::is_void_v<Result>) {
    const bool found = ((m == kStaticExperts[I] ? (f(ExpertCount<kStaticExperts[I]>{}), true) : false) || ...);
    if (!found) f(ExpertCount<0>{});
  } else {
    Result result{};
    const bool found =
        ((m == kStaticExperts[I] ? (result = f(ExpertCount<kStaticExperts[I]>{}), true) : false) || ...);
    if (!found) result = f(ExpertCount<0>{});
    return result;
  }
}

}  // namespace detail

// f(ExpertCount<kM>{}) with kM = m when m is in kStaticExperts, else kM = 0.
template <class F>
decltype(auto) dispatch_experts(int64_t m, F&& f) {
  return detail::dispatch_experts(m, std::forward<F>(f),
                                  std::make_index_sequence<sizeof(kStaticExperts) / sizeof(int)>{});
}

// f(std::true_type{}) or f(std::false_type{}).
template <class F>
decltype(auto) dispatch_bool(bool value, F&& f) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

// f(T{}) with T the storage type of `dtype`; Half and BFloat16 name each backend's 16-bit types.
template <class Half, class BFloat16, class F>
decltype(auto) dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat64: return f(double{});
    case Dtype::kFloat16: return f(Half{});
    case Dtype::kBFloat16: return f(BFloat16{});
    case Dtype::kFloat32:
    default: return f(float{});
  }
}

// The whole table: f(T{}, ExpertCount<kM>{}, bool_constant<kLogits>{}) for the call described by `a`.
template <class Half, class BFloat16, class F>
decltype(auto) dispatch(const FuseArgs& a, F&& f) {
  return dispatch_dtype<Half, BFloat16>(a.dtype, [&](auto scalar) {
    return dispatch_experts(a.m, [&](auto experts) {
      return dispatch_bool(a.logits.data != nullptr, [&](auto logits) { return f(scalar, experts, logits); });
    });
  });
}

}  // namespace gpoe
