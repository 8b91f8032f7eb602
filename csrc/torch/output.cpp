// Large CPU outputs: huge pages, and a small cache of freed blocks.
//
// Every output of an elementwise op at real sizes (10 to 60 MB at 2048 tokens) is written once,
// read by the next op and freed. glibc's malloc hands blocks of this size out by mmap (always from
// 32 MiB, its largest mmap threshold; below that depending on what was freed before, even for a
// block of the very size just freed) and gives them back with munmap, so the next call's output is
// new memory that the kernel faults in and zeroes 4 KiB at a time. That costs more than the op:
// measured here, the first touch of 59 MB by two threads took 21 ms with 4 KiB pages (the SwiGLU
// that writes it moves 176 MB in about 7 ms), and add_rms_norm at 2048 x 2560 bf16 ran at 5.6 GB/s
// on one thread when its outputs were fresh mappings against 24 GB/s when they were not.
//
// What is done instead, for outputs of kMinBytes and more:
// - each block is its own 2 MiB-aligned anonymous mapping advised MADV_HUGEPAGE before anything
//   touches it, so a first touch faults 2 MiB at a time (512x fewer faults; the pages are still
//   zeroed by the kernel); where the system's THP mode is "never" the advice is ignored;
// - a freed block is kept for reuse by the next output of the same (2 MiB-rounded) size, up to
//   kCacheBytes in all (EXAONE_EXT_CPU_OUTPUT_CACHE_MB overrides; 0 keeps nothing); beyond that the
//   oldest kept blocks are unmapped. An op called again at the same shape, the pattern of every
//   layer and every step, then writes to pages that are already mapped: no faults at all.
// The first touch happens in the kernels' own parallel loops (at::parallel_for over rows), so the
// faults that remain are spread over the threads.
//
// Considered and not done: raising glibc's mmap / trim thresholds with mallopt removes the faults
// as well, but changes the allocation policy of the whole process (every library's freed memory
// would stay in the heap), which is not an op library's business; this cache holds at most
// kCacheBytes, and only blocks of our own outputs. The tensors' storage is resizable: a resize
// moves the data into memory from torch's CPU allocator and returns the block here.
#include "torch/output.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace exaone_ext {
namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(4) << 20;
constexpr size_t kCacheBytes = size_t(256) << 20;

struct Block {
  void* base;
  size_t len;  // a multiple of kHugePage
};

class BlockCache {
 public:
  BlockCache() : limit_(kCacheBytes) {
    if (const char* env = std::getenv("EXAONE_EXT_CPU_OUTPUT_CACHE_MB")) limit_ = size_t(std::strtoull(env, nullptr, 10)) << 20;
  }

  // a kept block of exactly len bytes, or a new mapping (nullptr if none can be made)
  void* take(size_t len) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if (it->len == len) {
          void* p = it->base;
          kept_bytes_ -= len;
          kept_.erase(it);
          return p;
        }
      }
    }
    return map(len);
  }

  void give_back(Block b) {
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b.len <= limit_) {
        while (kept_bytes_ + b.len > limit_) {  // oldest first
          evicted.push_back(kept_.front());
          kept_bytes_ -= kept_.front().len;
          kept_.pop_front();
        }
        kept_.push_back(b);
        kept_bytes_ += b.len;
      } else {
        evicted.push_back(b);
      }
    }
    for (const Block& e : evicted) munmap(e.base, e.len);
  }

 private:
  static void* map(size_t len) {
    void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    // keep the 2 MiB-aligned part; the unaligned head and tail go back at once
    const auto start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = start + len + kHugePage;
    if (end > aligned + len) munmap(reinterpret_cast<void*>(aligned + len), end - (aligned + len));
    void* p = reinterpret_cast<void*>(aligned);
    madvise(p, len, MADV_HUGEPAGE);  // advice only: without THP the pages are 4 KiB
    return p;
  }

  std::mutex mu_;
  std::deque<Block> kept_;
  size_t kept_bytes_ = 0;
  size_t limit_;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

void release(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  cache().give_back(*b);
  delete b;
}

class LargeOutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n >= kMinBytes) {
      const size_t len = (n + kHugePage - 1) / kHugePage * kHugePage;
      if (void* p = cache().take(len)) return {p, new Block{p, len}, &release, c10::Device(c10::DeviceType::CPU)};
    }
    return c10::GetCPUAllocator()->allocate(n);  // small, or no mapping to be had
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

#endif

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (options.device().is_cpu()) {
    static LargeOutputAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace exaone_ext
