// x86 SIMD for the CPU kernels: the ISA attributes of the per-ISA copies (FD_AVX512, FD_AVX2,
// FD_FLATTEN; used by noise_cpu_simd.h and step_cpu_loops.h), and the vector types of the noise
// code -- 16 lanes (AVX-512F) and 8 lanes (AVX2 + FMA) of float / int32 with the primitive
// names the generic math of step_math.h and noise_cpu_math.h uses (fma_, fnma_, sqrt_, as_int,
// as_float, to_float, sra_, lookup32, operators). Every function carries its
// ISA's target attribute, so this header compiles with the default flags; the callers are ISA
// entry points marked FD_FLATTEN, which inlines the generic templates and these primitives
// into one function of that ISA.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FD_HAVE_X86_SIMD 1
#include <immintrin.h>
#include <stdint.h>

// For the whole translation unit (the warnings are reported where the inlined helpers are
// instantiated): vector arguments of inlined helpers, and GCC 12's false "may be used
// uninitialized" in its own AVX-512 intrinsics headers.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define FD_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c,bmi2,popcnt")))
#define FD_AVX2 __attribute__((target("avx2,fma,f16c,bmi2,popcnt")))
#define FD_FLATTEN __attribute__((flatten))

namespace fused_ddpm {
namespace simd {

// ------------------------------------------------------------------------------ AVX-512
struct F16 {
  __m512 v;
  FD_AVX512 F16() = default;
  FD_AVX512 explicit F16(__m512 x) : v(x) {}
  FD_AVX512 F16(float x) : v(_mm512_set1_ps(x)) {}
};
struct I16 {
  __m512i v;
  FD_AVX512 I16() = default;
  FD_AVX512 explicit I16(__m512i x) : v(x) {}
  FD_AVX512 I16(int32_t x) : v(_mm512_set1_epi32(x)) {}
};
FD_AVX512 inline F16 operator+(F16 a, F16 b) { return F16(_mm512_add_ps(a.v, b.v)); }
FD_AVX512 inline F16 operator-(F16 a, F16 b) { return F16(_mm512_sub_ps(a.v, b.v)); }
FD_AVX512 inline F16 operator*(F16 a, F16 b) { return F16(_mm512_mul_ps(a.v, b.v)); }
FD_AVX512 inline F16 fma_(F16 a, F16 b, F16 c) { return F16(_mm512_fmadd_ps(a.v, b.v, c.v)); }
FD_AVX512 inline F16 fnma_(F16 a, F16 b, F16 c) { return F16(_mm512_fnmadd_ps(a.v, b.v, c.v)); }
FD_AVX512 inline F16 sqrt_(F16 a) { return F16(_mm512_sqrt_ps(a.v)); }
FD_AVX512 inline I16 as_int(F16 a) { return I16(_mm512_castps_si512(a.v)); }
FD_AVX512 inline F16 as_float(I16 a) { return F16(_mm512_castsi512_ps(a.v)); }
FD_AVX512 inline F16 to_float(I16 a) { return F16(_mm512_cvtepi32_ps(a.v)); }
FD_AVX512 inline I16 operator+(I16 a, I16 b) { return I16(_mm512_add_epi32(a.v, b.v)); }
FD_AVX512 inline I16 operator-(I16 a, I16 b) { return I16(_mm512_sub_epi32(a.v, b.v)); }
FD_AVX512 inline I16 operator&(I16 a, I16 b) { return I16(_mm512_and_si512(a.v, b.v)); }
FD_AVX512 inline I16 sra_(I16 a, int n) { return I16(_mm512_srai_epi32(a.v, n)); }
// lut[i mod 32] per lane (a 32-entry table in two registers: one vpermt2ps).
FD_AVX512 inline F16 lookup32(const float* lut, I16 i) {
  return F16(_mm512_permutex2var_ps(_mm512_load_ps(lut), i.v, _mm512_load_ps(lut + 16)));
}

// ------------------------------------------------------------------------------ AVX2
struct F8 {
  __m256 v;
  FD_AVX2 F8() = default;
  FD_AVX2 explicit F8(__m256 x) : v(x) {}
  FD_AVX2 F8(float x) : v(_mm256_set1_ps(x)) {}
};
struct I8 {
  __m256i v;
  FD_AVX2 I8() = default;
  FD_AVX2 explicit I8(__m256i x) : v(x) {}
  FD_AVX2 I8(int32_t x) : v(_mm256_set1_epi32(x)) {}
};
FD_AVX2 inline F8 operator+(F8 a, F8 b) { return F8(_mm256_add_ps(a.v, b.v)); }
FD_AVX2 inline F8 operator-(F8 a, F8 b) { return F8(_mm256_sub_ps(a.v, b.v)); }
FD_AVX2 inline F8 operator*(F8 a, F8 b) { return F8(_mm256_mul_ps(a.v, b.v)); }
FD_AVX2 inline F8 fma_(F8 a, F8 b, F8 c) { return F8(_mm256_fmadd_ps(a.v, b.v, c.v)); }
FD_AVX2 inline F8 fnma_(F8 a, F8 b, F8 c) { return F8(_mm256_fnmadd_ps(a.v, b.v, c.v)); }
FD_AVX2 inline F8 sqrt_(F8 a) { return F8(_mm256_sqrt_ps(a.v)); }
FD_AVX2 inline I8 as_int(F8 a) { return I8(_mm256_castps_si256(a.v)); }
FD_AVX2 inline F8 as_float(I8 a) { return F8(_mm256_castsi256_ps(a.v)); }
FD_AVX2 inline F8 to_float(I8 a) { return F8(_mm256_cvtepi32_ps(a.v)); }
FD_AVX2 inline I8 operator+(I8 a, I8 b) { return I8(_mm256_add_epi32(a.v, b.v)); }
FD_AVX2 inline I8 operator-(I8 a, I8 b) { return I8(_mm256_sub_epi32(a.v, b.v)); }
FD_AVX2 inline I8 operator&(I8 a, I8 b) { return I8(_mm256_and_si256(a.v, b.v)); }
FD_AVX2 inline I8 sra_(I8 a, int n) { return I8(_mm256_srai_epi32(a.v, n)); }
// lut[i mod 32] per lane: the four 8-entry quarters, then bits 3 and 4 of i (moved to the
// sign) pick.
FD_AVX2 inline F8 lookup32(const float* lut, I8 i) {
  __m256 q[4];
  for (int k = 0; k < 4; ++k) q[k] = _mm256_permutevar8x32_ps(_mm256_load_ps(lut + 8 * k), i.v);
  const __m256 b3 = _mm256_castsi256_ps(_mm256_slli_epi32(i.v, 28));
  const __m256 b4 = _mm256_castsi256_ps(_mm256_slli_epi32(i.v, 27));
  return F8(_mm256_blendv_ps(_mm256_blendv_ps(q[0], q[1], b3), _mm256_blendv_ps(q[2], q[3], b3),
                             b4));
}

}  // namespace simd
}  // namespace fused_ddpm

#endif  // x86-64 with GCC or clang
