// The pybind11 module exaone_ext._C. Importing it runs the static operator registrations of
// every csrc/torch/ops_*.cpp (and csrc/torch/cuda/*.cpp in a CUDA build); the functions here are
// the few non-tensor things Python needs from C++.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstring>
#include <locale>
#include <string>

#include "common/attention.h"
#include "cpu/isa.h"
#include "torch/attention.h"
#include "torch/linear.h"
#include "torch/quant.h"
#include "torch/text_module.h"
#if EXAONE_EXT_WITH_CUDA
#include "cuda/attention/flash_attn.h"
#endif

namespace py = pybind11;

namespace {

#if defined(__linux__)
// Whether the loaded object `path` lists a NEEDED library whose name contains `lib`.
bool object_needs(const char* path, const char* lib) {
  struct Query { const char* path; const char* lib; bool found; } q{path, lib, false};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* q = static_cast<Query*>(data);
        if (!info->dlpi_name || std::strcmp(info->dlpi_name, q->path) != 0) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type != PT_DYNAMIC) continue;
          const auto* dyn = reinterpret_cast<const ElfW(Dyn)*>(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
          const char* strtab = nullptr;
          for (const ElfW(Dyn)* e = dyn; e->d_tag != DT_NULL; ++e)
            if (e->d_tag == DT_STRTAB) strtab = reinterpret_cast<const char*>(e->d_un.d_ptr);
          for (const ElfW(Dyn)* e = dyn; strtab && e->d_tag != DT_NULL; ++e)
            if (e->d_tag == DT_NEEDED && std::strstr(strtab + e->d_un.d_val, q->lib)) q->found = true;
        }
        return 1;
      },
      &q);
  return q.found;
}
#endif

// How this module gets its C++ runtime. A static libstdc++ inside the module (beside the shared one
// torch loads) breaks number formatting in error messages; the build refuses to produce one
// (cmake/ExaoneExtCxxRuntime.cmake), and this reports what the loaded module actually uses: the
// object that defines std::locale::classic, and whether the module lists libstdc++ as NEEDED.
py::dict cxx_runtime() {
  py::dict d;
#if defined(__linux__) && defined(__GLIBCXX__)
  Dl_info self{}, lib{};
  const auto classic = static_cast<const std::locale& (*)()>(&std::locale::classic);
  const bool have_self = dladdr(reinterpret_cast<void*>(&cxx_runtime), &self) != 0 && self.dli_fname;
  const bool have_lib = dladdr(reinterpret_cast<void*>(classic), &lib) != 0 && lib.dli_fname;
  const bool needed = have_self && object_needs(self.dli_fname, "libstdc++.so");
  const bool inside = have_self && have_lib && std::strcmp(self.dli_fname, lib.dli_fname) == 0;
  d["libstdc++"] = !have_self || !have_lib ? "unknown" : (needed && !inside ? "shared" : "static");
  d["path"] = have_lib ? py::object(py::str(lib.dli_fname)) : py::object(py::none());
  d["needed"] = needed;
#else
  d["libstdc++"] = "unknown";
  d["path"] = py::none();
#endif
  d["glibcxx"] =
#if defined(__GLIBCXX__)
      int64_t(__GLIBCXX__);
#else
      py::none();
#endif
  return d;
}

// Checks of the model's one-call plan (python/exaone_ext/model/decode_layers.py), run on every
// forward that may take it: a few thousand dict lookups and identity comparisons, at C speed (some
// 100 ns each from Python's map / all). Lists only; a dict given is read, never changed.
PyObject* list_item(const py::list& l, Py_ssize_t i) { return PyList_GET_ITEM(l.ptr(), i); }

void same_length(const py::list& a, const py::list& b, const char* fn) {
  if (PyList_GET_SIZE(a.ptr()) != PyList_GET_SIZE(b.ptr()))
    throw py::value_error(std::string(fn) + ": the lists must be as long as each other, got " +
                          std::to_string(PyList_GET_SIZE(a.ptr())) + " and " + std::to_string(PyList_GET_SIZE(b.ptr())));
}

PyObject* dict_entry(PyObject* d, PyObject* key, const char* fn) {  // borrowed, or null where missing
  if (!PyDict_Check(d)) throw py::type_error(std::string(fn) + ": expected dicts, got a " + Py_TYPE(d)->tp_name);
  PyObject* v = PyDict_GetItemWithError(d, key);
  if (!v && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

// Whether dicts[i][keys[i]] is objs[i] for every i (a missing key: False).
bool same_entries(const py::list& dicts, const py::list& keys, const py::list& objs) {
  same_length(dicts, keys, "_same_entries");
  same_length(dicts, objs, "_same_entries");
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(dicts.ptr()); i < n; ++i)
    if (dict_entry(list_item(dicts, i), list_item(keys, i), "_same_entries") != list_item(objs, i)) return false;
  return true;
}

// Whether type(objs[i]) is types[i] for every i.
bool same_types(const py::list& objs, const py::list& types) {
  same_length(objs, types, "_same_types");
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(objs.ptr()); i < n; ++i)
    if (reinterpret_cast<PyObject*>(Py_TYPE(list_item(objs, i))) != list_item(types, i)) return false;
  return true;
}

// Whether every dict of the list is empty.
bool all_empty(const py::list& dicts) {
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(dicts.ptr()); i < n; ++i) {
    PyObject* d = list_item(dicts, i);
    if (!PyDict_Check(d)) throw py::type_error(std::string("_all_empty: expected dicts, got a ") + Py_TYPE(d)->tp_name);
    if (PyDict_GET_SIZE(d) != 0) return false;
  }
  return true;
}

// Whether every dict of the list holds `key` with a true value.
bool all_true(const py::list& dicts, const py::str& key) {
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(dicts.ptr()); i < n; ++i) {
    PyObject* v = dict_entry(list_item(dicts, i), key.ptr(), "_all_true");
    if (!v) return false;
    const int t = PyObject_IsTrue(v);
    if (t < 0) throw py::error_already_set();
    if (t == 0) return false;
  }
  return true;
}

// Whether no dict of the list holds `key`.
bool none_holds(const py::list& dicts, const py::str& key) {
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(dicts.ptr()); i < n; ++i)
    if (dict_entry(list_item(dicts, i), key.ptr(), "_none_holds")) return false;
  return true;
}

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
#if defined(EXAONE_HAVE_AVX512VNNI)
  extra.append("avx512vnni");
#endif
  d["cpu_extra_kernels"] = extra;
  d["cpu_avx512bf16_active"] = exaone_ext::cpu::avx512bf16_active();
  d["cpu_avx512vnni_active"] = exaone_ext::cpu::avx512vnni_active();  // the quantized linear's integer paths
  d["cpu_attention_decode"] = exaone_ext::attn_decode_kernels();
  // the engine of bfloat16 flash attention's tile products (forward and backward): oneDNN brgemm
  // (AMX) or the kernels' own vdpbf16ps (both take P and dS rounded to bfloat16), or float32 tiles
  d["cpu_attention_bf16_products"] = exaone_ext::attn_bf16_products();
  d["cpu_linear_bf16_rows"] = exaone_ext::linear_bf16_rows_engine();
  d["cpu_quant_prefetch_ahead"] = py::dict(py::arg("int8") = exaone_ext::quant_prefetch_ahead(8),
                                           py::arg("int4") = exaone_ext::quant_prefetch_ahead(4));
  // the rows of bfloat16 x that take that engine in ops.linear (first, last) where it is brgemm
  d["cpu_linear_brgemm_rows"] = py::make_tuple(exaone_ext::linear_brgemm_min_rows(), exaone_ext::kBrgemmMaxRows);
  d["cpu_isa_best"] = exaone_ext::cpu::isa_name(exaone_ext::cpu::best_isa());
  d["cpu_isa"] = exaone_ext::cpu::isa_name(exaone_ext::cpu::active_isa());
  d["cpu_features"] = exaone_ext::cpu::cpu_features();
  d["threads"] = at::get_num_threads();
  d["cxx_runtime"] = cxx_runtime();
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
  m.def("_set_linear_bf16_pairs", &exaone_ext::set_linear_bf16_pairs, py::arg("enabled"),
        "Allow (True) or forbid several rows of x against bfloat16 weights on the AVX2 variant to take the "
        "pair-order tiles (even / odd weights split by a shift and an AND); returns the previous setting.");
  m.def("_set_quant_int_dot", &exaone_ext::set_quant_int_dot, py::arg("enabled"),
        "Allow (True) or forbid linear_int4 on CPU to multiply 16-bit x as integers with the weight's nibbles "
        "(integer multiply-adds); returns the previous setting.");
  m.def("_set_quant_row_stream", &exaone_ext::set_quant_row_stream, py::arg("enabled"),
        "Allow (True) or forbid one row of x on the quantized linear's integer paths to take the features one "
        "after the other (the weight read as one stream) in place of blocks side by side; returns the previous "
        "setting.");
  m.def("_set_quant_prefetch_ahead", &exaone_ext::set_quant_prefetch_ahead, py::arg("bits"), py::arg("bytes"),
        "How far ahead of its loads one row of x on the quantized linear's integer paths prefetches the weight, "
        "in bytes (0: none; -1: this CPU's default), for int8 (bits=8) or int4 (bits=4); returns the previous value.");
  m.def("_set_cpu_avx512vnni", &exaone_ext::cpu::set_avx512vnni, py::arg("enabled"),
        "Allow (True) or forbid the AVX512-VNNI variant of the quantized linear's integer paths in place of avx512; "
        "returns the previous setting.");
  m.def("_set_attn_poison_scratch", &exaone_ext::set_attn_poison_scratch, py::arg("enabled"),
        "Fill CPU attention's scratch with NaN bytes before the kernels run (tests: reads of scratch no kernel "
        "wrote show as NaN); returns the previous setting.");
  m.def("_set_attn_brgemm", &exaone_ext::set_attn_brgemm, py::arg("mode"),
        "CPU bfloat16 attention's tile products through oneDNN's brgemm: -1 where the CPU has AMX-BF16 (the "
        "default), 0 never, 1 wherever brgemm works (AVX-512); returns the previous mode.");
  m.def("_set_linear_brgemm", &exaone_ext::set_linear_brgemm, py::arg("mode"),
        "16-64 rows of CPU bfloat16 linear (and of the quantized linears' dequantised tiles) through oneDNN's "
        "brgemm (weight rows as A, read in place): 1 wherever brgemm works (AVX-512, the default), -1 where the "
        "CPU has AMX-BF16, 0 never; returns the previous mode.");
  m.def("_set_attn_decode_thread_ranges", &exaone_ext::set_attn_decode_thread_ranges, py::arg("enabled"),
        "Allow (True) or forbid the CPU decode-attention kernels to cut a short cache into one key range per "
        "thread (else one range of up to 256 keys per item); returns the previous setting.");
  m.def("_set_attn_decode", &exaone_ext::set_attn_decode, py::arg("enabled"),
        "Allow (True) or forbid the CPU decode-attention kernels (one pass over the KV cache for all kv heads); "
        "forbidden, decode calls take the general kernel. Returns the previous setting.");
  m.def(
      "_set_cuda_attn_key_split",
      [](bool enabled) {
#if EXAONE_EXT_WITH_CUDA
        return exaone_ext::cuda::flash_attn_set_key_split(enabled);
#else
        (void)enabled;
        return false;
#endif
      },
      py::arg("enabled"),
      "Allow (True, the default) or forbid the CUDA tensor-core attention forward's 16-row blocks, whose four "
      "warps split each key tile, for sequences of at most 16 packed query rows (decode); forbidden, they take "
      "the 64-row blocks. Returns the previous setting (False, doing nothing, in a build without CUDA).");
  m.def(
      "_set_cuda_attn_wide_rows",
      [](int mode) {
#if EXAONE_EXT_WITH_CUDA
        return exaone_ext::cuda::flash_attn_set_wide_rows(mode);
#else
        exaone_ext::checked_wide_rows_mode(mode);
        return -1;
#endif
      },
      py::arg("mode"),
      "The CUDA tensor-core attention forward's 128-row blocks (each warp two 16-row groups, 32-key tiles): -1 "
      "where they still give every SM a block (the default), 0 never (64-row blocks), 1 for every call of more "
      "than 16 packed rows. Returns the previous mode (-1, doing nothing, in a build without CUDA).");
  m.def("_set_cpu_avx512bf16", &exaone_ext::cpu::set_avx512bf16, py::arg("enabled"),
        "Allow (True) or forbid the AVX512-BF16 variants of the CPU kernels in place of avx512 (SwiGLU, RMSNorm, "
        "attention's bfloat16 tile products, the bfloat16 decode kernel); returns the previous setting.");
  m.def("_advise_hugepages", &advise_hugepages, py::arg("addr"), py::arg("nbytes"),
        "Advise transparent huge pages for the whole 2 MiB pages of a CPU buffer not yet touched; returns the bytes advised.");
  exaone_ext::register_text_bindings(m);
  m.def("_same_entries", &same_entries, py::arg("dicts"), py::arg("keys"), py::arg("objs"),
        "Whether dicts[i][keys[i]] is objs[i] for every i (lists; a missing key: False).");
  m.def("_same_types", &same_types, py::arg("objs"), py::arg("types"),
        "Whether type(objs[i]) is types[i] for every i (lists).");
  m.def("_all_empty", &all_empty, py::arg("dicts"), "Whether every dict of the list is empty.");
  m.def("_all_true", &all_true, py::arg("dicts"), py::arg("key"),
        "Whether every dict of the list holds key with a true value.");
  m.def("_none_holds", &none_holds, py::arg("dicts"), py::arg("key"), "Whether no dict of the list holds key.");
  m.def("get_cpu_isa", []() { return std::string(exaone_ext::cpu::isa_name(exaone_ext::cpu::active_isa())); });
}
