// Entry points of the vectorised CPU kernels, compiled once per instruction set.
//
// csrc/cpu/capability/fusion_kernel.cpp is compiled several times by setup.py, each time with
// -DCPU_CAPABILITY=<set> and that set's compiler flags (as ATen compiles its own kernels), so
// each copy lives in its own namespace below; fusion_cpu.cpp picks one at run time.
//
// Each call handles the rows [row_begin, row_end); the caller (fusion_cpu.cpp, compiled for the
// baseline instruction set) splits the rows into chunks and runs them in parallel, so no
// threading code is compiled with the wider instruction sets. The mopoe_* kernels write every
// subset's product, [S = 2^M - 1, N, D] (subset s + 1 holds the experts whose bit is set in
// s + 1), and take the incoming gradients in that layout; their logits are [M, N, D] (never
// broadcast) and their gradients are written per element. Logits-gradient partial sums
// (BackwardArgs::grad_logits when logit_reduce != kNone) are in the accumulation type (float32;
// float64 for float64 inputs), laid out as
//   kRows: [chunks, M, D], zero-initialised, chunk `chunk` adds into its slice
//   kDims: [M, N], written
//   kAll:  [chunks, M], written
#pragma once

#include <cstdint>

#include "fusion_args.h"

#define GPOE_DECLARE_CPU_KERNELS(CAPABILITY)                                                   \
  namespace gpoe::cpu::CAPABILITY {                                                          \
  void fuse_forward_rows(const FuseArgs& args, const ForwardOut& out, int64_t row_begin,       \
                         int64_t row_end);                                                    \
  void fuse_backward_rows(const FuseArgs& args, const BackwardArgs& grads, int64_t chunk,      \
                          int64_t row_begin, int64_t row_end);                                 \
  void mopoe_forward_rows(const FuseArgs& args, const ForwardOut& out, int64_t row_begin,      \
                          int64_t row_end);                                                    \
  void mopoe_backward_rows(const FuseArgs& args, const BackwardArgs& grads, int64_t row_begin,  \
                           int64_t row_end);                                                   \
  }

GPOE_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(GPOE_CPU_AVX2)
GPOE_DECLARE_CPU_KERNELS(AVX2)
#endif
#if defined(GPOE_CPU_AVX512)
GPOE_DECLARE_CPU_KERNELS(AVX512)
#endif

#undef GPOE_DECLARE_CPU_KERNELS
