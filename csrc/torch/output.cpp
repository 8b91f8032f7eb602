// Large CPU outputs on transparent huge pages.
//
// glibc's malloc serves blocks of 32 MiB and more (its largest mmap threshold on 64-bit) with a
// fresh mmap and gives them back with munmap when freed, so every such output of an op is new
// memory that the kernel must fault in and zero on first touch, 4 KiB at a time. For a 59 MB
// SwiGLU output (2048 tokens x 14336 bf16) that is 14336 faults and took longer than the op's
// own reading and writing (measured: first touch of 59 MB by two threads 21 ms with 4 KiB pages,
// 4 ms with 2 MiB pages; the op itself moves 176 MB in about 6 ms).
//
// Alternatives considered: raising glibc's mmap / trim thresholds with mallopt would remove the
// faults altogether, but it changes the allocation policy of the whole process (memory freed by
// any library stays in the heap); a cache of freed outputs inside the package would hold memory
// the user has released. Both are process-wide policy, not an op's business. Pre-faulting in
// parallel gains nothing here: the kernels already write their outputs from every thread
// (at::parallel_for over rows), so the faults are already spread over the threads.
//
// So an output this large gets its own 2 MiB-aligned anonymous mapping marked MADV_HUGEPAGE
// before anything touches it: the first touch, which happens in the kernel's parallel loop, then
// faults 2 MiB at a time (512x fewer faults; the kernel still zeroes the pages), and munmap
// returns it to the system when the tensor is freed, exactly as glibc would have. Where the
// system's THP mode is "never" the advice is ignored and the behaviour is glibc's. Where the user
// has raised glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_), large blocks are reused from the heap
// without faults, so the outputs are left to at::empty. The tensors' storage is resizable: a resize
// moves the data into memory from torch's CPU allocator.
#include "torch/output.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace exaone_ext {
namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(32) << 20;

struct Mapping {
  void* base;
  size_t len;
};

void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  munmap(m->base, m->len);
  delete m;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n >= kMinBytes) {
      const size_t len = (n + kHugePage - 1) / kHugePage * kHugePage;
      void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (raw != MAP_FAILED) {
        // keep the 2 MiB-aligned part; the unaligned head and tail go back at once
        const auto start = reinterpret_cast<uintptr_t>(raw);
        const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
        if (aligned > start) munmap(raw, aligned - start);
        const size_t tail = (start + len + kHugePage) - (aligned + len);
        if (tail) munmap(reinterpret_cast<void*>(aligned + len), tail);
        void* p = reinterpret_cast<void*>(aligned);
        madvise(p, len, MADV_HUGEPAGE);  // advice only: without THP the pages are 4 KiB
        return {p, new Mapping{p, len}, &unmap, c10::Device(c10::DeviceType::CPU)};
      }
    }
    return c10::GetCPUAllocator()->allocate(n);  // small, or no mapping available
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

bool use_huge_pages() {
  static const bool use = std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr;
  return use;
}

#endif

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (options.device().is_cpu() && use_huge_pages()) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace exaone_ext
