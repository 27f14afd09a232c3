// Box–Muller of the CPU backends (docs/kernels.md, "Noise"): -2 ln u and sin / cos of
// theta to within about one float32 ulp of PyTorch's float32 log / sin / cos, so that every
// normal is within 1e-6 of the oracle (fused_ddpm/philox.py). Generic over the value type V
// (float, or a SIMD vector of floats with its integer vector type VI; step_cpu_simd.h): the
// scalar, AVX2 and AVX-512 paths run the same operations and give the same bits.
//
// Primitives V and VI provide besides those of step_math.h: fnma_(a, b, c) = c - a b with one
// rounding, and lookup32(lut, i) = lut[i mod 32] per lane (a 32-entry table of floats).
#pragma once

#include <stdint.h>

#include "step_math.h"

namespace fused_ddpm {

FD_HD float fnma_(float a, float b, float c) { return fd_fma(-a, b, c); }
inline float lookup32(const float* lut, int32_t i) { return lut[i & 31]; }

// -2 ln u for u in (0, 1]. With u = 2^e m, m in [sqrt(1/2), sqrt(2)), f = m - 1:
// -2 ln m = g + f^2 (1 + f P(f)) with g = -2 f (exact) and P = -2 (a degree-6 minimax fit of
// (ln(1 + f) - f + f^2 / 2) / f^3 on [sqrt(1/2) - 1, sqrt(2) - 1]), evaluated in g: the
// coefficients are scaled by powers of two (exactly), so that f^2 (1 + f P) = g^2 Q(g) with
// one multiply less. e (-2 ln 2)_hi is exact; e (-2 ln 2)_lo joins the small part. Within one
// ulp of -2 x PyTorch's logf on every uniform (checked exhaustively).
template <typename V, typename VI>
inline V neg2_log_cpu(const V& u) {
  constexpr float P[] = {0.3333390951156616f,  -0.2500133812427521f, 0.19963061809539795f,
                         -0.1657758504152298f, 0.1491478979587555f,  -0.14267489314079285f,
                         0.0870036780834198f};
  // Q(g) = 1/4 + g Σ_i P'_i g^i with P'_i = -2 P_i (-1/2)^(i + 1) / 4 (f = -g / 2)
  constexpr float Q6 = -2 * P[6] / -512, Q5 = -2 * P[5] / 256, Q4 = -2 * P[4] / -128,
                  Q3 = -2 * P[3] / 64, Q2 = -2 * P[2] / -32, Q1 = -2 * P[1] / 16,
                  Q0 = -2 * P[0] / -8;
  constexpr float N2LN2_HI = -2 * 0.693145751953125f;      // 16 bits: e N2LN2_HI is exact
  constexpr float N2LN2_LO = -2 * 1.428606765330187e-06f;  // ln 2 - ln2_hi
  const VI ix = as_int(u) - VI(static_cast<int32_t>(LOG_REDUCE_C));
  const V e = to_float(sra_(ix, 23));
  const V m = as_float((ix & VI(0x7fffff)) + VI(static_cast<int32_t>(LOG_REDUCE_C)));
  const V g = fma_(m, V(-2.0f), V(2.0f));  // -2 f, exact
  V q = V(Q6);
  for (const float c : {Q5, Q4, Q3, Q2, Q1, Q0}) q = fma_(q, g, V(c));
  q = fma_(q, g, V(0.25f));
  return fma_(e, V(N2LN2_HI), g) + fma_(g * g, q, e * V(N2LN2_LO));
}

// sin(j pi / 16) and cos(j pi / 16), j = 0 .. 31, each as float32 hi + lo, from the quarter wave.
namespace sincos_table {
struct Table32 {
  float v[32];
};
// sin((j + shift) pi / 16) from q[i] = sin(i pi / 16), i = 0 .. 8.
constexpr Table32 from_quarter(const float (&q)[9], int shift) {
  Table32 t{};
  for (int j = 0; j < 32; ++j) {
    const int k = (j + shift) & 31, i = k & 15;
    const float a = q[i <= 8 ? i : 16 - i];
    t.v[j] = (k < 16 || a == 0) ? a : -a;
  }
  return t;
}
constexpr float Q_HI[9] = {0,
                           0.19509032368659973f,
                           0.3826834261417389f,
                           0.5555702447891235f,
                           0.7071067690849304f,
                           0.8314695954322815f,
                           0.9238795042037964f,
                           0.9807852506637573f,
                           1};
constexpr float Q_LO[9] = {0,
                           -1.670471427850373e-09f,
                           6.2233507236442165e-09f,
                           -1.1769521357507529e-08f,
                           1.2101617485882343e-08f,
                           1.687026340846387e-08f,
                           2.830748968563057e-08f,
                           2.9739473106360492e-08f,
                           0};
alignas(64) constexpr Table32 SIN_HI = from_quarter(Q_HI, 0), SIN_LO = from_quarter(Q_LO, 0);
alignas(64) constexpr Table32 COS_HI = from_quarter(Q_HI, 8), COS_LO = from_quarter(Q_LO, 8);
}  // namespace sincos_table

// sin and cos of theta in [0, 2 pi]: j = round(theta 16 / pi), r = theta - j pi / 16 (the first
// part exact; |r| <= pi / 32), sin r = r + r^3 S(r^2) and cos r = 1 + r^2 C(r^2) (Taylor, to
// r^5 and r^4), then sin(a + r) = sin a + (cos a r + sin a (cos r - 1) + cos a (sin r - r) +
// sin_lo a), cos likewise. Absolute error below 4e-8 (checked exhaustively against float64).
template <typename V, typename VI>
inline void sincos_cpu(const V& theta, V& sn, V& cs) {
  using namespace sincos_table;
  constexpr float PIO16_HI = 0.1963491439819336f;  // 18 bits: j PIO16_HI is exact
  constexpr float PIO16_LO = 3.968674207044387e-07f;
  const V magic = V(12582912.0f);  // 1.5 2^23: adding it rounds to an integer
  const V jb = fma_(theta, V(5.092957973480225f), magic);
  const V nj = magic - jb;  // -j
  const VI j = as_int(jb);  // low 5 bits: j mod 32
  const V r = fma_(nj, V(PIO16_LO), fma_(nj, V(PIO16_HI), theta));
  const V y = r * r;
  const V s3 = (r * y) * fma_(V(0.008333333767950535f), y, V(-0.1666666716337204f));
  const V c2 = y * fma_(V(0.0416666679084301f), y, V(-0.5f));
  const V sa = lookup32(SIN_HI.v, j), ca = lookup32(COS_HI.v, j);
  sn = sa + fma_(ca, r, fma_(sa, c2, fma_(ca, s3, lookup32(SIN_LO.v, j))));
  cs = ca + fnma_(sa, r, fma_(ca, c2, fnma_(sa, s3, lookup32(COS_LO.v, j))));
}

// The two normals of uniforms u0 and u1 (the spec's operation order: theta = u1 2 pi rounded,
// z0 = rho cos theta, z1 = rho sin theta).
template <typename V, typename VI>
inline void box_muller_cpu(const V& u0, const V& u1, V& z0, V& z1) {
  const V rho = sqrt_(neg2_log_cpu<V, VI>(u0));
  V sn, cs;
  sincos_cpu<V, VI>(u1 * V(6.2831854820251465f), sn, cs);
  z0 = rho * cs;
  z1 = rho * sn;
}

}  // namespace fused_ddpm
