// The per-block loops of the CPU kernels (step_cpu.cpp), in copies for the machine's vector
// width. Only included by step_cpu.cpp.
//
// Each loop exists as plain C++ (the baseline, and the copy for every non-x86 machine) and,
// on x86, as copies compiled for AVX-512 and for AVX2 + FMA + F16C, picked per call by
// cpu_isa_level() (the choice the noise path made). The lean step and the dtype conversions
// are explicit vector code; the general loops are the per-element math of step_math.h,
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
FD_AVX512 inline void vstore16(c10::BFloat16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
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
template <typename T, typename Z>
FD_AVX512 inline void lean_forward16(const T* x, const T* m, const Z* z, T* y, __m512 Q,
                                     __m512 R, __m512 S) {
  __m512 v = _mm512_add_ps(_mm512_mul_ps(Q, vload16(x)), _mm512_mul_ps(R, vload16(m)));
  if constexpr (!std::is_same<Z, void>::value) v = _mm512_add_ps(v, _mm512_mul_ps(S, vload16(z)));
  vstore16(y, v);
}
template <typename T, typename Z>
FD_AVX2 inline void lean_forward8(const T* x, const T* m, const Z* z, T* y, __m256 Q, __m256 R,
                                  __m256 S) {
  __m256 v = _mm256_add_ps(_mm256_mul_ps(Q, vload8(x)), _mm256_mul_ps(R, vload8(m)));
  if constexpr (!std::is_same<Z, void>::value) v = _mm256_add_ps(v, _mm256_mul_ps(S, vload8(z)));
  vstore8(y, v);
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
