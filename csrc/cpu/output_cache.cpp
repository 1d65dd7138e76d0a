#include "cpu/output_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <utility>

namespace gpoe::cpu {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;

size_t limit_bytes() {
  static const size_t limit = [] {
    const char* value = std::getenv("GPOE_FUSION_CPU_CACHE_MB");
    long long mib = 512;
    if (value != nullptr && *value != '\0') {
      try {
        mib = std::stoll(value);
      } catch (const std::exception&) {
        TORCH_CHECK_VALUE(false, "GPOE_FUSION_CPU_CACHE_MB: expected a whole number of MiB, got '", value, "'");
      }
      TORCH_CHECK_VALUE(mib >= 0, "GPOE_FUSION_CPU_CACHE_MB: expected >= 0, got ", mib);
    }
    return static_cast<size_t>(mib) << 20;
  }();
  return limit;
}

struct Cache {
  std::mutex mutex;
  std::list<std::pair<size_t, void*>> blocks;  // (bytes, data), oldest first
  size_t bytes = 0;
};

// Never destroyed: outputs may be freed (and come back here) during static destruction.
Cache& cache() {
  static Cache* instance = new Cache;
  return *instance;
}

void* acquire(size_t bytes) {
  {
    Cache& c = cache();
    const std::lock_guard<std::mutex> lock(c.mutex);
    for (auto it = c.blocks.begin(); it != c.blocks.end(); ++it) {
      if (it->first == bytes) {
        void* data = it->second;
        c.blocks.erase(it);
        c.bytes -= bytes;
        return data;
      }
    }
  }
  return c10::alloc_cpu(bytes);
}

void release(void* data, size_t bytes) {
  const size_t limit = limit_bytes();
  std::list<std::pair<size_t, void*>> evicted;
  {
    Cache& c = cache();
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (bytes <= limit) {
      c.blocks.emplace_back(bytes, data);
      c.bytes += bytes;
      data = nullptr;
      while (c.bytes > limit) {
        c.bytes -= c.blocks.front().first;
        evicted.splice(evicted.end(), c.blocks, c.blocks.begin());
      }
    }
  }
  if (data != nullptr) c10::free_cpu(data);
  for (const auto& block : evicted) c10::free_cpu(block.second);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kMinBytes || limit_bytes() == 0) return at::empty(sizes, options);
  void* data = acquire(bytes);
  return at::for_blob(data, sizes)
      .deleter([bytes](void* released) { release(released, bytes); })
      .options(options)
      .make_tensor();
}

int64_t clear_output_cache() {
  std::list<std::pair<size_t, void*>> blocks;
  int64_t bytes = 0;
  {
    Cache& c = cache();
    const std::lock_guard<std::mutex> lock(c.mutex);
    blocks.swap(c.blocks);
    bytes = static_cast<int64_t>(c.bytes);
    c.bytes = 0;
  }
  for (const auto& block : blocks) c10::free_cpu(block.second);
  return bytes;
}

int64_t output_cache_bytes() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.bytes);
}

}  // namespace gpoe::cpu
