// The per-block loops of the CPU kernels (step_cpu.cpp), in copies for the machine's vector
// width. Only included by step_cpu.cpp.
//
// Each loop exists as plain C++ (the baseline, and the copy for every non-x86 machine) and,
// on x86, as copies compiled for AVX-512 and for AVX2 + FMA + F16C, picked per call by
// cpu_isa_level() (the choice the noise path made). The lean step (also fused with the
// in-kernel noise of noise_cpu_simd.h) and the dtype conversions are explicit vector code;
// the general loops are the per-element math of step_math.h,
// vectorised by the compiler in each copy. No copy fuses a multiply and an add (setup.py
// builds with -ffp-contract=off, the vector code uses separate multiplies and adds), and a
// block's partial last vector runs through the same vector code on padded copies, so every
// element gets the same bits whatever the machine and wherever the element sits in a block.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "noise_cpu.h"
#include "noise_cpu_simd.h"
#include "step_cpu_simd.h"
#include "step_math.h"

namespace fused_ddpm {
namespace cpu {

template <typename T>
using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Calls LOOP<Ts...>(args...) through its AVX-512, AVX2 or baseline copy.
#if defined(FD_HAVE_X86_SIMD)
#define FD_ISA_COPIES(NAME, LOOP)                                                   \
  template <typename... Ts, typename... Args>                                      \
  FD_AVX512 FD_FLATTEN void NAME##_avx512(Args... args) { LOOP<Ts...>(args...); }   \
  template <typename... Ts, typename... Args>                                      \
  FD_AVX2 FD_FLATTEN void NAME##_avx2(Args... args) { LOOP<Ts...>(args...); }       \
  template <typename... Ts, typename... Args>                                      \
  void NAME(Args... args) {                                                         \
    switch (cpu_isa_level()) {                                                      \
      case 0: return NAME##_avx512<Ts...>(args...);                                 \
      case 1: return NAME##_avx2<Ts...>(args...);                                   \
      default: return LOOP<Ts...>(args...);                                         \
    }                                                                               \
  }
#else
#define FD_ISA_COPIES(NAME, LOOP)              \
  template <typename... Ts, typename... Args> \
  void NAME(Args... args) {                    \
    LOOP<Ts...>(args...);                      \
  }
#endif

// ------------------------------------------------------------------------------ vectors
#if defined(FD_HAVE_X86_SIMD)
// 16 (8) elements of T <-> a vector of floats. fp16 / bf16 round to nearest even; a bf16 NaN
// becomes 0x7FC0, as c10::BFloat16's conversion does.
FD_AVX512 inline __m512 vload16(const float* p) { return _mm512_loadu_ps(p); }
FD_AVX512 inline __m512 vload16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
FD_AVX512 inline __m512 vload16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FD_AVX512 inline void vstore16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// v rounded to bf16 in the high half of each 32-bit lane (a NaN first becomes 0x7FC00000).
FD_AVX512 inline __m512i bf16_round16(__m512 v) {
  const __m512i u = _mm512_mask_mov_epi32(_mm512_castps_si512(v),
                                          _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                          _mm512_set1_epi32(0x7FC00000));
  const __m512i t = _mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF));
  return _mm512_mask_add_epi32(t, _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000)), t,
                               _mm512_set1_epi32(1));  // ties to even
}
FD_AVX512 inline void vstore16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round16(v), 16)));
}
FD_AVX512 inline void vstore16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

FD_AVX2 inline __m256 vload8(const float* p) { return _mm256_loadu_ps(p); }
FD_AVX2 inline __m256 vload8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
FD_AVX2 inline __m256 vload8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FD_AVX2 inline void vstore8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FD_AVX2 inline void vstore8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0),
                         _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
FD_AVX2 inline void vstore8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif  // FD_HAVE_X86_SIMD

// ------------------------------------------------------------------------------ conversions

// dst[0 .. n) = src as compute-type values, and back (T is not the compute type).
template <typename T>
inline void to_acc_loop(const T* src, AccOf<T>* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<AccOf<T>>(src[j]);
}
template <typename T>
inline void from_acc_loop(const AccOf<T>* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

#if defined(FD_HAVE_X86_SIMD)
// The vector copies; their last partial vector goes through padded buffers.
template <typename T>
FD_AVX512 FD_FLATTEN void to_acc_avx512(const T* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, vload16(src + j));
  if (j == n) return;
  T pad[16] = {};
  float out[16];
  std::copy(src + j, src + n, pad);
  _mm512_storeu_ps(out, vload16(pad));
  std::copy(out, out + (n - j), dst + j);
}
template <typename T>
FD_AVX512 FD_FLATTEN void from_acc_avx512(const float* src, T* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vstore16(dst + j, _mm512_loadu_ps(src + j));
  if (j == n) return;
  float pad[16] = {};
  T out[16];
  std::copy(src + j, src + n, pad);
  vstore16(out, _mm512_loadu_ps(pad));
  std::copy(out, out + (n - j), dst + j);
}
template <typename T>
FD_AVX2 FD_FLATTEN void to_acc_avx2(const T* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, vload8(src + j));
  if (j == n) return;
  T pad[8] = {};
  float out[8];
  std::copy(src + j, src + n, pad);
  _mm256_storeu_ps(out, vload8(pad));
  std::copy(out, out + (n - j), dst + j);
}
template <typename T>
FD_AVX2 FD_FLATTEN void from_acc_avx2(const float* src, T* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vstore8(dst + j, _mm256_loadu_ps(src + j));
  if (j == n) return;
  float pad[8] = {};
  T out[8];
  std::copy(src + j, src + n, pad);
  vstore8(out, _mm256_loadu_ps(pad));
  std::copy(out, out + (n - j), dst + j);
}
#endif

template <typename T>
void to_acc(const T* src, AccOf<T>* dst, int64_t n) {
#if defined(FD_HAVE_X86_SIMD)
  if constexpr (std::is_same<AccOf<T>, float>::value) {
    switch (cpu_isa_level()) {
      case 0: return to_acc_avx512(src, dst, n);
      case 1: return to_acc_avx2(src, dst, n);
      default: break;
    }
  }
#endif
  to_acc_loop(src, dst, n);
}
template <typename T>
void from_acc(const AccOf<T>* src, T* dst, int64_t n) {
#if defined(FD_HAVE_X86_SIMD)
  if constexpr (std::is_same<AccOf<T>, float>::value) {
    switch (cpu_isa_level()) {
      case 0: return from_acc_avx512(src, dst, n);
      case 1: return from_acc_avx2(src, dst, n);
      default: break;
    }
  }
#endif
  from_acc_loop(src, dst, n);
}

// ------------------------------------------------------------------------------ lean step

// The Philox stream of one sample: key and counter words (docs/kernels.md, "Noise").
struct NoiseKey {
  uint64_t seed;
  uint32_t t, stream;
};

// y[j] = Q x[j] + R m[j] (+ S z[j]) (Z = void: no noise term).
template <typename T, typename Z>
inline void lean_forward_loop(const T* x, const T* m, const Z* z, T* y, int64_t n,
                              const SampleCoef<AccOf<T>>& k) {
  using A = AccOf<T>;
  constexpr bool NOISE = !std::is_same<Z, void>::value;
  const LeanFeatures<NOISE> f;
  A unused;
  for (int64_t j = 0; j < n; ++j) {
    A zj = A(0);
    if constexpr (NOISE) zj = static_cast<A>(z[j]);
    y[j] = static_cast<T>(step_forward_elem(f, k, static_cast<A>(x[j]), static_cast<A>(m[j]),
                                            A(0), zj, A(0), &unused));
  }
}

// grad x = Q gy, grad m = R gy.
template <typename T>
inline void lean_backward_loop(const T* gy, T* gx, T* gm, int64_t n, AccOf<T> Q, AccOf<T> R) {
  using A = AccOf<T>;
  for (int64_t j = 0; j < n; ++j) {
    const A g = static_cast<A>(gy[j]);
    gx[j] = static_cast<T>(Q * g);
    gm[j] = static_cast<T>(R * g);
  }
}

#if defined(FD_HAVE_X86_SIMD)
// One vector of the lean forward: y = (Q x + R m) + S z, rounded after each operation.
FD_AVX512 inline __m512 lean16(__m512 x, __m512 m, __m512 Q, __m512 R) {
  return _mm512_add_ps(_mm512_mul_ps(Q, x), _mm512_mul_ps(R, m));
}
FD_AVX512 inline __m512 lean16(__m512 x, __m512 m, __m512 z, __m512 Q, __m512 R, __m512 S) {
  return _mm512_add_ps(lean16(x, m, Q, R), _mm512_mul_ps(S, z));
}
template <typename T, typename Z>
FD_AVX512 inline void lean_forward16(const T* x, const T* m, const Z* z, T* y, __m512 Q,
                                     __m512 R, __m512 S) {
  if constexpr (std::is_same<Z, void>::value) vstore16(y, lean16(vload16(x), vload16(m), Q, R));
  else vstore16(y, lean16(vload16(x), vload16(m), vload16(z), Q, R, S));
}
FD_AVX2 inline __m256 lean8(__m256 x, __m256 m, __m256 Q, __m256 R) {
  return _mm256_add_ps(_mm256_mul_ps(Q, x), _mm256_mul_ps(R, m));
}
FD_AVX2 inline __m256 lean8(__m256 x, __m256 m, __m256 z, __m256 Q, __m256 R, __m256 S) {
  return _mm256_add_ps(lean8(x, m, Q, R), _mm256_mul_ps(S, z));
}
template <typename T, typename Z>
FD_AVX2 inline void lean_forward8(const T* x, const T* m, const Z* z, T* y, __m256 Q, __m256 R,
                                  __m256 S) {
  if constexpr (std::is_same<Z, void>::value) vstore8(y, lean8(vload8(x), vload8(m), Q, R));
  else vstore8(y, lean8(vload8(x), vload8(m), vload8(z), Q, R, S));
}

// Runs vec(x, m, z, y) over n elements in vectors of W, the last partial one on padded copies.
template <int W, typename T, typename Z, typename Vec>
inline void lean_forward_vectors(const T* x, const T* m, const Z* z, T* y, int64_t n, Vec&& vec) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    if constexpr (std::is_same<Z, void>::value) vec(x + j, m + j, z, y + j);
    else vec(x + j, m + j, z + j, y + j);
  }
  if (j == n) return;
  using ZS = typename std::conditional<std::is_same<Z, void>::value, float, Z>::type;
  T xb[W] = {}, mb[W] = {}, yb[W];
  ZS zb[W] = {};
  const int64_t r = n - j;
  for (int64_t i = 0; i < r; ++i) {
    xb[i] = x[j + i];
    mb[i] = m[j + i];
    if constexpr (!std::is_same<Z, void>::value) zb[i] = z[j + i];
  }
  if constexpr (std::is_same<Z, void>::value) vec(xb, mb, z, yb);
  else vec(xb, mb, static_cast<const Z*>(zb), yb);
  for (int64_t i = 0; i < r; ++i) y[j + i] = yb[i];
}

template <typename T, typename Z>
FD_AVX512 FD_FLATTEN void lean_forward_avx512(const T* x, const T* m, const Z* z, T* y,
                                              int64_t n, const SampleCoef<float>& k) {
  const __m512 Q = _mm512_set1_ps(k.c[Col::Q]), R = _mm512_set1_ps(k.c[Col::R]),
               S = _mm512_set1_ps(k.c[Col::S]);
  lean_forward_vectors<16>(x, m, z, y, n, [&](const T* xa, const T* ma, const Z* za, T* ya) {
    lean_forward16(xa, ma, za, ya, Q, R, S);
  });
}
template <typename T, typename Z>
FD_AVX2 FD_FLATTEN void lean_forward_avx2(const T* x, const T* m, const Z* z, T* y, int64_t n,
                                          const SampleCoef<float>& k) {
  const __m256 Q = _mm256_set1_ps(k.c[Col::Q]), R = _mm256_set1_ps(k.c[Col::R]),
               S = _mm256_set1_ps(k.c[Col::S]);
  lean_forward_vectors<8>(x, m, z, y, n, [&](const T* xa, const T* ma, const Z* za, T* ya) {
    lean_forward8(xa, ma, za, ya, Q, R, S);
  });
}

template <typename T>
FD_AVX512 FD_FLATTEN void lean_backward_avx512(const T* gy, T* gx, T* gm, int64_t n, float Q,
                                               float R) {
  const __m512 q = _mm512_set1_ps(Q), r = _mm512_set1_ps(R);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 g = vload16(gy + j);
    vstore16(gx + j, _mm512_mul_ps(q, g));
    vstore16(gm + j, _mm512_mul_ps(r, g));
  }
  lean_backward_loop(gy + j, gx + j, gm + j, n - j, Q, R);  // a product rounds alike everywhere
}
template <typename T>
FD_AVX2 FD_FLATTEN void lean_backward_avx2(const T* gy, T* gx, T* gm, int64_t n, float Q,
                                           float R) {
  const __m256 q = _mm256_set1_ps(Q), r = _mm256_set1_ps(R);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 g = vload8(gy + j);
    vstore8(gx + j, _mm256_mul_ps(q, g));
    vstore8(gm + j, _mm256_mul_ps(r, g));
  }
  lean_backward_loop(gy + j, gx + j, gm + j, n - j, Q, R);
}

// The lean forward with in-kernel noise (contiguous layout) of the n elements of one sample
// from logical element 4 g0, the normals straight from registers (noise_cpu_simd.h): NB
// batches of 8 (4) groups per step, and the Philox rounds of the next step issued before the
// Box–Muller of this one, so that the two independent chains overlap. The last partial step
// takes its normals from a buffer through the padded vector path: the same operations, so
// every element gets the same bits as from philox_normals and lean_forward_block.
// The order of the normals for 32 elements of T: the even and the odd elements for the
// 16-bit types (a 32-bit lane holds one of each), else element order.
template <typename T>
constexpr simd::ZOrder z_order() {
  return std::is_same<T, c10::BFloat16>::value ? simd::ZOrder::EVEN_ODD : simd::ZOrder::ELEMENT;
}

// 32 elements of y from the normals z[0], z[1] in z_order<T>().
template <typename T>
FD_AVX512 inline void lean_philox32(const T* x, const T* m, const __m512* z, T* y, __m512 Q,
                                    __m512 R, __m512 S) {
  if constexpr (z_order<T>() == simd::ZOrder::EVEN_ODD) {
    const __m512i xv = _mm512_loadu_si512(x), mv = _mm512_loadu_si512(m);
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    const __m512 ye = lean16(_mm512_castsi512_ps(_mm512_slli_epi32(xv, 16)),
                             _mm512_castsi512_ps(_mm512_slli_epi32(mv, 16)), z[0], Q, R, S);
    const __m512 yo = lean16(_mm512_castsi512_ps(_mm512_and_si512(xv, high)),
                             _mm512_castsi512_ps(_mm512_and_si512(mv, high)), z[1], Q, R, S);
    _mm512_storeu_si512(y, _mm512_mask_blend_epi16(0xAAAAAAAAu,
                                                   _mm512_srli_epi32(bf16_round16(ye), 16),
                                                   bf16_round16(yo)));
  } else {
    for (int h = 0; h < 2; ++h)
      vstore16(y + 16 * h, lean16(vload16(x + 16 * h), vload16(m + 16 * h), z[h], Q, R, S));
  }
}

template <typename T>
FD_AVX512 FD_FLATTEN void lean_forward_philox_avx512(const T* x, const T* m, T* y, int64_t n,
                                                     const SampleCoef<float>& k, NoiseKey nk,
                                                     uint64_t g0) {
  constexpr int NB = 4;
  constexpr int64_t E = 32 * NB;  // elements per step
  const simd::Philox16 key(nk.seed, nk.t, nk.stream);
  const __m512 Q = _mm512_set1_ps(k.c[Col::Q]), R = _mm512_set1_ps(k.c[Col::R]),
               S = _mm512_set1_ps(k.c[Col::S]);
  const int64_t whole = n / E * E;
  __m512i W0[NB], W1[NB], N0[NB], N1[NB];
  if (whole > 0) simd::philox16<NB, z_order<T>()>(key, g0, W0, W1);
  for (int64_t j = 0; j < whole; j += E) {
    if (j + E < whole)
      simd::philox16<NB, z_order<T>()>(key, g0 + static_cast<uint64_t>(j + E) / 4, N0, N1);
    __m512 z[2 * NB];
    simd::box_muller16<NB, z_order<T>()>(W0, W1, z);
    for (int b = 0; b < NB; ++b)
      lean_philox32(x + j + 32 * b, m + j + 32 * b, z + 2 * b, y + j + 32 * b, Q, R, S);
    for (int b = 0; b < NB; ++b) {
      W0[b] = N0[b];
      W1[b] = N1[b];
    }
  }
  if (whole == n) return;
  float zb[E];
  __m512 z[2 * NB];
  simd::philox16<NB, simd::ZOrder::ELEMENT>(key, g0 + static_cast<uint64_t>(whole) / 4, W0, W1);
  simd::box_muller16<NB, simd::ZOrder::ELEMENT>(W0, W1, z);
  for (int q = 0; q < 2 * NB; ++q) _mm512_storeu_ps(zb + 16 * q, z[q]);
  lean_forward_vectors<16>(x + whole, m + whole, static_cast<const float*>(zb), y + whole,
                           n - whole, [&](const T* xa, const T* ma, const float* za, T* ya) {
                             lean_forward16(xa, ma, za, ya, Q, R, S);
                           });
}

template <typename T>
FD_AVX2 FD_FLATTEN void lean_forward_philox_avx2(const T* x, const T* m, T* y, int64_t n,
                                                 const SampleCoef<float>& k, NoiseKey nk,
                                                 uint64_t g0) {
  constexpr int NB = 2;
  constexpr int64_t E = 16 * NB;
  const simd::Philox8 key(nk.seed, nk.t, nk.stream);
  const __m256 Q = _mm256_set1_ps(k.c[Col::Q]), R = _mm256_set1_ps(k.c[Col::R]),
               S = _mm256_set1_ps(k.c[Col::S]);
  const int64_t whole = n / E * E;
  __m256i W0[NB], W1[NB], N0[NB], N1[NB];
  if (whole > 0) simd::philox8<NB>(key, g0, W0, W1);
  for (int64_t j = 0; j < whole; j += E) {
    if (j + E < whole) simd::philox8<NB>(key, g0 + static_cast<uint64_t>(j + E) / 4, N0, N1);
    __m256 z[2 * NB];
    simd::box_muller8<NB>(W0, W1, z);
    for (int q = 0; q < 2 * NB; ++q)
      vstore8(y + j + 8 * q, lean8(vload8(x + j + 8 * q), vload8(m + j + 8 * q), z[q], Q, R, S));
    for (int b = 0; b < NB; ++b) {
      W0[b] = N0[b];
      W1[b] = N1[b];
    }
  }
  if (whole == n) return;
  float zb[E];
  __m256 z[2 * NB];
  simd::philox8<NB>(key, g0 + static_cast<uint64_t>(whole) / 4, W0, W1);
  simd::box_muller8<NB>(W0, W1, z);
  for (int q = 0; q < 2 * NB; ++q) _mm256_storeu_ps(zb + 8 * q, z[q]);
  lean_forward_vectors<8>(x + whole, m + whole, static_cast<const float*>(zb), y + whole,
                          n - whole, [&](const T* xa, const T* ma, const float* za, T* ya) {
                            lean_forward8(xa, ma, za, ya, Q, R, S);
                          });
}
#endif  // FD_HAVE_X86_SIMD

template <typename T, typename Z>
void lean_forward_block(const T* x, const T* m, const Z* z, T* y, int64_t n,
                        const SampleCoef<AccOf<T>>& k) {
#if defined(FD_HAVE_X86_SIMD)
  if constexpr (!std::is_same<T, double>::value) {
    switch (cpu_isa_level()) {
      case 0: return lean_forward_avx512(x, m, z, y, n, k);
      case 1: return lean_forward_avx2(x, m, z, y, n, k);
      default: break;
    }
  }
#endif
  lean_forward_loop(x, m, z, y, n, k);
}

// The lean forward with in-kernel noise, contiguous layout (n elements of one sample from
// logical element 4 g0; z: scratch for n + 4 normals, used by the baseline copy only).
template <typename T>
void lean_forward_philox_block(const T* x, const T* m, T* y, int64_t n,
                               const SampleCoef<AccOf<T>>& k, NoiseKey nk, uint64_t g0,
                               float* z) {
#if defined(FD_HAVE_X86_SIMD)
  if constexpr (!std::is_same<T, double>::value) {
    switch (cpu_isa_level()) {
      case 0: return lean_forward_philox_avx512(x, m, y, n, k, nk, g0);
      case 1: return lean_forward_philox_avx2(x, m, y, n, k, nk, g0);
      default: break;
    }
  }
#endif
  philox_normals(nk.seed, nk.t, nk.stream, g0, (n + 3) / 4, z);
  lean_forward_loop(x, m, static_cast<const float*>(z), y, n, k);
}

template <typename T>
void lean_backward_block(const T* gy, T* gx, T* gm, int64_t n, AccOf<T> Q, AccOf<T> R) {
#if defined(FD_HAVE_X86_SIMD)
  if constexpr (!std::is_same<T, double>::value) {
    switch (cpu_isa_level()) {
      case 0: return lean_backward_avx512(gy, gx, gm, n, Q, R);
      case 1: return lean_backward_avx2(gy, gx, gm, n, Q, R);
      default: break;
    }
  }
#endif
  lean_backward_loop(gy, gx, gm, n, Q, R);
}


// ------------------------------------------------------------------------------ general step

// The launch's features with the variance mode and the x̂0 need fixed at compile time: they
// decide whether the loop calls sqrt / exp and forms x̂0 at all.
template <int VAR, bool NEED_XH>
struct CpuFeatures : RuntimeFeatures {
  static constexpr int var = VAR;
  static constexpr bool need_xh = NEED_XH;
  explicit CpuFeatures(const RuntimeFeatures& rf) : RuntimeFeatures(rf) {}
};

// The general loops take every stream as a __restrict parameter (inputs in the compute type,
// absent ones as zeros; outputs the callers' own buffers, so nothing written aliases what is
// read): without it the compiler's run-time alias checks exceed its limit and it gives up.
// VAR, XH: std::integral_constant of the variance mode and of the x̂0 need.
template <typename A, typename VAR, typename XH>
inline void general_forward_loop(const RuntimeFeatures* rf, const SampleCoef<A>* kp,
                                 const A* __restrict x, const A* __restrict M,
                                 const A* __restrict MC, const A* __restrict v,
                                 const A* __restrict h, const A* __restrict z, A* __restrict y,
                                 A* __restrict xh, int64_t n) {
  const CpuFeatures<VAR::value, XH::value> f(*rf);
  const SampleCoef<A> k = *kp;
  for (int64_t j = 0; j < n; ++j) {
    A xhj = A(0);
    y[j] = step_forward_elem(f, k, x[j], model_m(f, k, M[j], MC[j]), v[j], z[j], h[j], &xhj);
    xh[j] = xhj;
  }
}
FD_ISA_COPIES(general_forward_block, general_forward_loop)

// Gradients go to gx, gM, gMC, gv, gz, gh (all buffers; absent ones are scratch).
template <typename A, typename VAR, typename XH>
inline void general_backward_loop(const RuntimeFeatures* rf, const SampleCoef<A>* kp,
                                  const A* __restrict gy, const A* __restrict g0,
                                  const A* __restrict x, const A* __restrict M,
                                  const A* __restrict MC, const A* __restrict v,
                                  const A* __restrict z, A* __restrict gx, A* __restrict gM,
                                  A* __restrict gMC, A* __restrict gv, A* __restrict gz,
                                  A* __restrict gh, int64_t n) {
  const CpuFeatures<VAR::value, XH::value> f(*rf);
  const SampleCoef<A> k = *kp;
  const A ga = f.guided ? k.ga : A(1), gb = k.gb;
  for (int64_t j = 0; j < n; ++j) {
    const ElemGrads<A> g =
        step_backward_elem(f, k, gy[j], g0[j], x[j], model_m(f, k, M[j], MC[j]), v[j], z[j]);
    gx[j] = g.x;
    gM[j] = g.m * ga;
    gMC[j] = g.m * gb;
    gv[j] = g.v;
    gz[j] = g.z;
    gh[j] = g.h;
  }
}
FD_ISA_COPIES(general_backward_block, general_backward_loop)

}  // namespace cpu
}  // namespace fused_ddpm
