// Scalar types and conversions shared by the CPU and CUDA kernels. No torch, no CUDA runtime:
// this header compiles as plain C++ and under nvcc (host and device).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define EXAONE_HD __host__ __device__ __forceinline__
#else
#define EXAONE_HD inline
#endif

namespace exaone_ext {

// The element types the kernels accept; the torch layer maps at::ScalarType onto these.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
  }
  return "?";
}

// Storage-only 16-bit floats: arithmetic always happens after conversion to float.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

EXAONE_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

EXAONE_HD uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

EXAONE_HD float to_float(float x) { return x; }
EXAONE_HD double to_float(double x) { return x; }
EXAONE_HD float to_float(bf16 x) { return float_from_bits(uint32_t(x.bits) << 16); }

EXAONE_HD float to_float(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float mag = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float -> bfloat16, round to nearest even; NaN stays a quiet NaN.
EXAONE_HD bf16 to_bf16(float f) {
  const uint32_t u = bits_from_float(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x0040u)};
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(rounded >> 16)};
}

// float -> float16, round to nearest even, overflow to inf, gradual underflow.
EXAONE_HD f16 to_f16(float f) {
  const uint32_t u = bits_from_float(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Scale so that the half subnormal step (2^-24) becomes one unit, round in float (nearest even).
    const float scaled = float_from_bits(abs) * 16777216.0f;  // * 2^24, exact
    // Adding and subtracting 2^23 rounds a float in [0, 2^23) to an integer, ties to even.
    const float r = (scaled + 8388608.0f) - 8388608.0f;
    return f16{uint16_t(sign | uint32_t(r))};
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  const uint32_t rebias = abs - 0x38000000u;  // exponent 127 -> 15
  const uint32_t rounded = rebias + 0xfffu + ((rebias >> 13) & 1u);
  return f16{uint16_t(sign | (rounded >> 13))};
}

template <typename T> EXAONE_HD T from_float(float x);
template <> EXAONE_HD float from_float<float>(float x) { return x; }
template <> EXAONE_HD double from_float<double>(float x) { return x; }
template <> EXAONE_HD bf16 from_float<bf16>(float x) { return to_bf16(x); }
template <> EXAONE_HD f16 from_float<f16>(float x) { return to_f16(x); }

// The type arithmetic is done in: double for double inputs (gradcheck), float otherwise.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

template <typename T> EXAONE_HD acc_t<T> load_acc(const T* p) { return to_float(*p); }
template <typename T> EXAONE_HD void store_acc(T* p, acc_t<T> v) { *p = from_float<T>(v); }
template <> EXAONE_HD void store_acc<double>(double* p, double v) { *p = v; }

// Round a float through the storage type T and back (what an intermediate .to(T) does).
template <typename T> EXAONE_HD acc_t<T> round_to(acc_t<T> v) { return to_float(from_float<T>(v)); }
template <> EXAONE_HD double round_to<double>(double v) { return v; }

}  // namespace exaone_ext
