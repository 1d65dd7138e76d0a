// Output tensors for the CPU kernels, backed by a small cache of blocks that earlier outputs
// released.
//
// Large allocations are mmap'ed afresh by malloc on every call and unmapped when freed, so each
// call's outputs fault in every 4 KiB page on first write. On the machines this was measured on
// that costs more than the kernels themselves (docs/kernels.md); a training loop asks for the
// same sizes every step, so reusing the released blocks removes the cost. This is what PyTorch's
// CUDA caching allocator does for GPU tensors, limited to this library's own outputs.
//
// The cache holds at most GPOE_FUSION_CPU_CACHE_MB MiB (default 1024; 0 turns it off), evicting
// the oldest blocks first; outputs under 1 MiB come from the ordinary allocator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace gpoe::cpu {

// An uninitialised contiguous CPU tensor of `sizes`, with `options`' dtype.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the bytes released.
int64_t clear_output_cache();

// Bytes held by the cache now.
int64_t output_cache_bytes();

}  // namespace gpoe::cpu
