// The CUDA kernels' launch interface (plain C++: no ATen), used by cuda/fusion_cuda.cpp.
//
// One thread per (row, group of `vec` consecutive dimensions), 2-D blocks: x over dimension
// groups, y over rows; the grid is sized to the device and loops over the rows.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "fusion_args.h"

namespace gpoe::cuda {

struct Plan {
  int vec = 1;  // dimensions per thread
  unsigned block_x = 1, block_y = 1, grid_x = 1, grid_y = 1;
  // Partial sums of broadcast logits' gradients (logit_reduce != kNone), in the accumulation
  // type (float32; float64 for float64 inputs), zero-initialised by the caller, which then sums
  // them over the axes named below; pass nullptr when that gradient is not wanted:
  //   kRows: [grid_y * block_y, M, D]                 sum over axis 0
  //   kDims: [slices, M, N]                           sum over axis 0
  //   kAll:  [grid_y * block_y, M, grid_x * block_x]  sum over axes 0 and 2
  int64_t partial_shape[3] = {0, 0, 0};
};

// The launch geometry for `a` on a device with `sm_count` multiprocessors.
Plan plan(const FuseArgs& a, int sm_count);

// Launch on `stream`; errors are raised as c10::Error.
void fuse_forward(const FuseArgs& a, const ForwardOut& out, const Plan& plan, cudaStream_t stream);
void fuse_backward(const FuseArgs& a, const BackwardArgs& grads, void* partial, const Plan& plan,
                   cudaStream_t stream);

// MoPoE (csrc/ops.cpp): one thread per (row, dimension) point, every subset in turn; a grid of at
// most 16 blocks per multiprocessor that loops over the points.
void mopoe_forward(const FuseArgs& a, const ForwardOut& out, int sm_count, cudaStream_t stream);
void mopoe_backward(const FuseArgs& a, const BackwardArgs& grads, int sm_count, cudaStream_t stream);

}  // namespace gpoe::cuda
