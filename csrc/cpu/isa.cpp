#include "cpu/isa.h"

#include <atomic>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <cstdlib>
#include <stdexcept>

namespace exaone_ext::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

Isa parse(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  throw std::invalid_argument("CPU kernel variant must be one of 'auto', 'avx512', 'avx2', 'scalar', got '" + name + "'");
}

Isa compute_best() {
#if defined(EXAONE_HAVE_AVX512)
  if (has_avx512()) return Isa::kAvx512;
#endif
#if defined(EXAONE_HAVE_AVX2)
  if (has_avx2()) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa initial_active() {
  Isa best = compute_best();
  if (const char* env = std::getenv("EXAONE_EXT_CPU_ISA")) {
    std::string name(env);
    if (name.empty() || name == "auto") return best;
    Isa wanted = parse(name);  // an unknown name fails loudly at first use
    return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
  }
  return best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_active())};
  return slot;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
  }
  return "?";
}

Isa best_isa() {
  static const Isa best = compute_best();
  return best;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) {
  if (name == "auto") {
    active_slot().store(static_cast<int>(best_isa()));
    return;
  }
  Isa wanted = parse(name);
  if (static_cast<int>(wanted) > static_cast<int>(best_isa())) {
    throw std::invalid_argument(std::string("CPU kernel variant '") + name +
                                "' is not available on this CPU/build; the widest available is '" +
                                isa_name(best_isa()) + "'");
  }
  active_slot().store(static_cast<int>(wanted));
}

bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  const std::string f(feature);
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "f16c") return __builtin_cpu_supports("f16c");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (f == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
  if (f == "avx512fp16") return __builtin_cpu_supports("avx512fp16");
  if (f == "avx512vnni") return __builtin_cpu_supports("avx512vnni");
  if (f == "amx_tile") return __builtin_cpu_supports("amx-tile");
  if (f == "amx_bf16") return __builtin_cpu_supports("amx-bf16");
#else
  (void)feature;
#endif
  return false;
}

int cpu_x86_family() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const int base = int((eax >> 8) & 0xf);
  return base == 0xf ? base + int((eax >> 20) & 0xff) : base;
#else
  return 0;
#endif
}

bool cpu_is_amd() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

namespace {
// Switches of the variants compiled on top of avx512 with one more extension (tests turn them off).
std::atomic<bool> g_avx512bf16{true};
std::atomic<bool> g_avx512vnni{true};

// Such a variant runs when the build has it, the CPU reports the feature (and avx512 is its best
// variant), avx512 is active and the switch is on.
bool extension_active(bool built, bool cpu, const std::atomic<bool>& on) {
  return built && cpu && best_isa() == Isa::kAvx512 && active_isa() == Isa::kAvx512 &&
         on.load(std::memory_order_relaxed);
}

#if defined(EXAONE_HAVE_AVX512BF16)
constexpr bool kBuiltBf16 = true;
#else
constexpr bool kBuiltBf16 = false;
#endif
#if defined(EXAONE_HAVE_AVX512VNNI)
constexpr bool kBuiltVnni = true;
#else
constexpr bool kBuiltVnni = false;
#endif
}  // namespace

bool avx512bf16_active() {
  static const bool cpu = cpu_has("avx512bf16");
  return extension_active(kBuiltBf16, cpu, g_avx512bf16);
}

bool avx512bf16_allowed() {
  static const bool cpu = cpu_has("avx512bf16");
  return cpu && g_avx512bf16.load(std::memory_order_relaxed);
}

bool set_avx512bf16(bool enabled) { return g_avx512bf16.exchange(enabled); }

bool avx512vnni_active() {
  static const bool cpu = cpu_has("avx512vnni");
  return extension_active(kBuiltVnni, cpu, g_avx512vnni);
}

bool set_avx512vnni(bool enabled) { return g_avx512vnni.exchange(enabled); }

std::vector<std::string> cpu_features() {
  std::vector<std::string> out;
  for (const char* f : {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512bf16",
                        "avx512fp16", "avx512vnni", "amx_tile", "amx_bf16"}) {
    if (cpu_has(f)) out.emplace_back(f);
  }
  return out;
}

}  // namespace exaone_ext::cpu
