// Run-time choice of the CPU kernel variant. Each op's kernels are compiled for AVX-512, AVX2 and
// portable C++ (see cmake/ExaoneExtCpuIsa.cmake); active_isa() picks the widest one this CPU and
// this build support, which a user may lower (never raise) with EXAONE_EXT_CPU_ISA=avx2|scalar or
// exaone_ext.set_cpu_isa(), e.g. to compare variants or to test every variant on one machine.
#pragma once
#include <string>
#include <vector>

namespace exaone_ext::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
Isa best_isa();                 // widest variant both compiled in and supported by this CPU
Isa active_isa();               // what the kernels use now
void set_isa(const std::string& name);  // "avx512" | "avx2" | "scalar" | "auto"; throws if unsupported
std::vector<std::string> cpu_features();  // the relevant features this CPU reports
bool cpu_has(const char* feature);        // e.g. "avx512bf16", "amx_tile"
bool cpu_is_amd();                        // the vendor (tuning choices that differ between AMD and Intel)
int cpu_x86_family();                     // CPUID's family (base + extended; 0 off x86): AMD Zen 4 25, Zen 5 26

// Kernels declared with EXAONE_DECLARE_ISA_KERNEL_BF16 (the elementwise ops) also have a variant
// compiled with AVX512-BF16 (csrc/cpu/<op>_avx512bf16.cpp: the avx512 code whose bf16 stores use
// vcvtneps2bf16). It runs in place of the avx512 one when that is active, the build has it and the
// CPU reports avx512bf16, unless turned off with set_avx512bf16(false) (tests, comparisons).
bool avx512bf16_active();
bool set_avx512bf16(bool enabled);  // returns the previous setting
// The same switch for the kernels that carry the avx512bf16 target attribute themselves (attention's
// bf16 tile products, the bf16 decode kernel): the CPU reports avx512bf16 and the switch is on.
bool avx512bf16_allowed();
// The integer paths of the quantized linear also have a variant compiled with AVX512-VNNI
// (csrc/cpu/quant_linear_avx512vnni.cpp), run in place of avx512 when that is active, the build has it
// and the CPU reports avx512vnni, unless turned off with set_avx512vnni(false) (tests, comparisons).
bool avx512vnni_active();
bool set_avx512vnni(bool enabled);  // returns the previous setting

}  // namespace exaone_ext::cpu

// Calls EXAONE_ISA_NS::fn(args...) for the active variant.
#if defined(EXAONE_HAVE_AVX512)
#define EXAONE_CASE_AVX512(fn, ...) \
  case ::exaone_ext::cpu::Isa::kAvx512: return ::exaone_ext::cpu::avx512::fn(__VA_ARGS__);
#else
#define EXAONE_CASE_AVX512(fn, ...)
#endif
#if defined(EXAONE_HAVE_AVX2)
#define EXAONE_CASE_AVX2(fn, ...) \
  case ::exaone_ext::cpu::Isa::kAvx2: return ::exaone_ext::cpu::avx2::fn(__VA_ARGS__);
#else
#define EXAONE_CASE_AVX2(fn, ...)
#endif
#define EXAONE_CPU_DISPATCH(fn, ...)                          \
  [&]() {                                                     \
    switch (::exaone_ext::cpu::active_isa()) {                \
      EXAONE_CASE_AVX512(fn, __VA_ARGS__)                     \
      EXAONE_CASE_AVX2(fn, __VA_ARGS__)                       \
      default: return ::exaone_ext::cpu::scalar::fn(__VA_ARGS__); \
    }                                                         \
  }()

// Declares fn with the given parameter list in each ISA namespace.
#define EXAONE_DECLARE_ISA_KERNEL(ret, fn, params)        \
  namespace exaone_ext::cpu::avx512 { ret fn params; }    \
  namespace exaone_ext::cpu::avx2 { ret fn params; }      \
  namespace exaone_ext::cpu::scalar { ret fn params; }

// As EXAONE_DECLARE_ISA_KERNEL, plus the AVX512-BF16 variant.
#define EXAONE_DECLARE_ISA_KERNEL_BF16(ret, fn, params) \
  EXAONE_DECLARE_ISA_KERNEL(ret, fn, params)            \
  namespace exaone_ext::cpu::avx512bf16 { ret fn params; }

// As EXAONE_CPU_DISPATCH for kernels declared with EXAONE_DECLARE_ISA_KERNEL_BF16.
#if defined(EXAONE_HAVE_AVX512BF16)
#define EXAONE_CPU_DISPATCH_BF16(fn, ...)                                                         \
  [&]() {                                                                                        \
    if (::exaone_ext::cpu::avx512bf16_active()) return ::exaone_ext::cpu::avx512bf16::fn(__VA_ARGS__); \
    return EXAONE_CPU_DISPATCH(fn, __VA_ARGS__);                                                 \
  }()
#else
#define EXAONE_CPU_DISPATCH_BF16(fn, ...) EXAONE_CPU_DISPATCH(fn, __VA_ARGS__)
#endif
