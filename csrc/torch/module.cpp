// The pybind11 module exaone_ext._C. Importing it runs the static operator registrations of
// every csrc/torch/ops_*.cpp (and csrc/torch/cuda/*.cpp in a CUDA build); the functions here are
// the few non-tensor things Python needs from C++.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

#include "common/attention.h"
#include "cpu/isa.h"
#include "torch/linear.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = EXAONE_EXT_VERSION;
  d["torch_version"] = EXAONE_EXT_TORCH_VERSION;
  d["cuda"] = bool(EXAONE_EXT_WITH_CUDA);
  py::list archs;
#if EXAONE_EXT_WITH_CUDA
  std::string s = EXAONE_EXT_CUDA_ARCHS_STR;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) archs.append(s.substr(start, end - start));
    start = end + 1;
  }
#endif
  d["cuda_archs"] = archs;
  py::list head_dims;
  for (int64_t h : exaone_ext::kAttnHeadDims) head_dims.append(h);
  d["attention_head_dims"] = head_dims;
  py::list compiled;
  compiled.append("scalar");
#if defined(EXAONE_HAVE_AVX2)
  compiled.append("avx2");
#endif
#if defined(EXAONE_HAVE_AVX512)
  compiled.append("avx512");
#endif

  d["cpu_isa_compiled"] = compiled;
  // kernels for narrower instruction-set extensions, used on top of the active variant when present
  py::list extra;
#if defined(EXAONE_HAVE_AVX512BF16)
  extra.append("avx512bf16");
#endif
  d["cpu_extra_kernels"] = extra;
  d["cpu_avx512bf16_active"] = exaone_ext::cpu::avx512bf16_active();
  d["cpu_isa_best"] = exaone_ext::cpu::isa_name(exaone_ext::cpu::best_isa());
  d["cpu_isa"] = exaone_ext::cpu::isa_name(exaone_ext::cpu::active_isa());
  d["cpu_features"] = exaone_ext::cpu::cpu_features();
  d["threads"] = at::get_num_threads();
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  return d;
}

// Asks Linux to back the whole 2 MiB pages inside [addr, addr + nbytes) with transparent huge pages
// when they are first touched (MADV_HUGEPAGE; memory already touched keeps its pages). A decode step
// streams every weight once, and with 4 KiB pages that is a TLB miss every 4 KiB. Returns the bytes
// advised: 0 where the kernel says no (THP disabled or not built in, non-Linux); never fails.
int64_t advise_hugepages(uintptr_t addr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (addr + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (addr + uintptr_t(nbytes)) & ~(kHuge - 1);
  if (nbytes <= 0 || end <= begin) return 0;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0 ? int64_t(end - begin) : 0;
#else
  (void)addr;
  (void)nbytes;
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "exaone_ext compiled kernels (operators live in torch.ops.exaone_ext)";
  m.def("build_info", &build_info, "What this build of exaone_ext contains and what it uses on this machine.");
  m.def("set_cpu_isa", [](const std::string& name) { exaone_ext::cpu::set_isa(name); },
        py::arg("name"), "Choose the CPU kernel variant: 'auto', 'avx512', 'avx2' or 'scalar'.");
  m.def("_set_linear_bf16_dot", &exaone_ext::set_linear_bf16_dot, py::arg("enabled"),
        "Allow (True) or forbid bfloat16 linear on CPU to use AVX512-BF16 dot products; returns the previous setting.");
  m.def("_set_cpu_avx512bf16", &exaone_ext::cpu::set_avx512bf16, py::arg("enabled"),
        "Allow (True) or forbid the AVX512-BF16 variant of the elementwise CPU kernels (SwiGLU, RMSNorm) in place of "
        "avx512; returns the previous setting.");
  m.def("_advise_hugepages", &advise_hugepages, py::arg("addr"), py::arg("nbytes"),
        "Advise transparent huge pages for the whole 2 MiB pages of a CPU buffer not yet touched; returns the bytes advised.");
  m.def("get_cpu_isa", []() { return std::string(exaone_ext::cpu::isa_name(exaone_ext::cpu::active_isa())); });
}
