// Per-element math of the fused DDPM/DDIM step, Philox4x32-10 and Box–Muller.
//
// Shared by the C++ CPU kernel (step_cpu.cpp) and the CUDA kernels (step_kernels.cu):
// every function is `FD_HD` = __host__ __device__ under nvcc, plain inline otherwise.
// No torch headers here.
//
// Table columns (fused_ddpm/coefficients.py): u w p q r s lb lt.
//   xr = u x + w m;  xh = clip(xr);  y = p xh + q x + r m + sigma z
// Noise spec (fused_ddpm/philox.py, DESIGN.md §3): Philox4x32-10 with
//   key = (seed lo, seed hi), counter = (g lo, g hi, t lo, 0), g = logical index / 4;
//   u_j = ((o_j >> 8) + 0.5f) * 2^-24 (float32 arithmetic), Box–Muller in float32:
//   rho = sqrt(-2 ln u0), theta = u1 * float32(2π), z0 = rho cos, z1 = rho sin (same for u2, u3).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define FD_HD inline
#endif

namespace fused_ddpm {

// Codes shared with fused_ddpm/coefficients.py.
enum : int { CLIP_NONE = 0, CLIP_STATIC = 1, CLIP_DYNAMIC = 2 };
enum : int { VAR_FIXED = 0, VAR_LEARNED = 1, VAR_LEARNED_RANGE = 2 };
enum : int { COL_U = 0, COL_W, COL_P, COL_Q, COL_R, COL_S, COL_LB, COL_LT, NUM_COLS };

constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;
constexpr float TWO_PI_F32 = 6.2831854820251465f;   // float32(2π), as philox.py
constexpr float PI_F32 = 3.1415927410125732f;       // float32(π)

struct U32x4 {
  uint32_t v[4];
};

FD_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
#endif
}

// Philox4x32-10 of counter (group lo, group hi, t, 0) under key (seed lo, seed hi).
FD_HD U32x4 philox4x32_10(uint64_t group, uint32_t t, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = t, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(PHILOX_M0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(PHILOX_M1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// uint32 → float32 uniform in (0, 1]: ((o >> 8) + 0.5f) · 2^-24, float32 rounding as the oracle.
FD_HD float uint32_to_uniform(uint32_t o) {
  return (static_cast<float>(o >> 8) + 0.5f) * 5.9604644775390625e-08f;
}

// Box–Muller of two uniforms → (z0, z1). Host: libm float functions (a plain scalar
// version; the CPU kernel uses its own vectorisable equivalent, step_cpu.cpp, with the same
// operation order; both match the PyTorch oracle within 1e-6). Device: fast math, with ln u accurate near u = 1 (log1pf; __logf has
// an absolute error ~1e-7 there that would blow up rho = sqrt(-2 ln u)) and __sincosf
// evaluated on [-π, π] (its accurate range).
FD_HD void box_muller(float u0, float u1, float* z0, float* z1) {
#if defined(__CUDA_ARCH__)
  const float l = (u0 < 0.5f) ? __logf(u0) : log1pf(u0 - 1.0f);
  const float rho = sqrtf(fmaxf(-2.0f * l, 0.0f));
  float theta = u1 * TWO_PI_F32;
  theta = (theta > PI_F32) ? theta - TWO_PI_F32 : theta;
  float s, c;
  __sincosf(theta, &s, &c);
  *z0 = rho * c;
  *z1 = rho * s;
#else
  const float rho = std::sqrt(-2.0f * std::log(u0));
  const float theta = u1 * TWO_PI_F32;
  *z0 = rho * std::cos(theta);
  *z1 = rho * std::sin(theta);
#endif
}

// The four normals of group `group` (logical elements 4·group … 4·group+3).
FD_HD void philox_normal4(uint64_t group, uint32_t t, uint64_t seed, float z[4]) {
  const U32x4 o = philox4x32_10(group, t, seed);
  box_muller(uint32_to_uniform(o.v[0]), uint32_to_uniform(o.v[1]), &z[0], &z[1]);
  box_muller(uint32_to_uniform(o.v[2]), uint32_to_uniform(o.v[3]), &z[2], &z[3]);
}

// The single normal of logical element i (one Philox call for one element: only for
// layouts where neighbouring storage elements are not neighbouring logical elements).
FD_HD float philox_normal1(uint64_t i, uint32_t t, uint64_t seed) {
  const U32x4 o = philox4x32_10(i >> 2, t, seed);
  const int j = static_cast<int>(i & 3);
  const uint32_t a = (j < 2) ? o.v[0] : o.v[2];
  const uint32_t b = (j < 2) ? o.v[1] : o.v[3];
  float z0, z1;
  box_muller(uint32_to_uniform(a), uint32_to_uniform(b), &z0, &z1);
  return (j & 1) ? z1 : z0;
}

// One table row, in the accumulation type A (float, or double for the CPU fp64 kernel).
template <typename A>
struct Row {
  A u, w, p, q, r, s, lb, lt;
};

template <typename A>
FD_HD Row<A> load_row(const A* table, int64_t T, int64_t t) {
  const int64_t idx = t < 0 ? 0 : (t > T - 1 ? T - 1 : t);
  const A* c = table + idx * NUM_COLS;
  Row<A> r;
  r.u = c[COL_U];
  r.w = c[COL_W];
  r.p = c[COL_P];
  r.q = c[COL_Q];
  r.r = c[COL_R];
  r.s = c[COL_S];
  r.lb = c[COL_LB];
  r.lt = c[COL_LT];
  return r;
}

// NaN in `a` (the value being clipped) is returned unchanged, as torch.clamp in the
// reference and Triton's propagate_nan=ALL: the comparison with a NaN is false.
template <typename A>
FD_HD A fd_min(A a, A b) { return b < a ? b : a; }
template <typename A>
FD_HD A fd_max(A a, A b) { return b > a ? b : a; }

FD_HD float fd_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return sqrtf(a);
#else
  return std::sqrt(a);
#endif
}
FD_HD double fd_sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return sqrt(a);
#else
  return std::sqrt(a);
#endif
}
FD_HD float fd_exp(float a) {
#if defined(__CUDA_ARCH__)
  return __expf(a);
#else
  return std::exp(a);
#endif
}
FD_HD double fd_exp(double a) {
#if defined(__CUDA_ARCH__)
  return exp(a);
#else
  return std::exp(a);
#endif
}

// Clip parameters of one sample: xh = min(max(xr, lo), hi) / div.
//   CLIP_STATIC: lo = -clip, hi = clip, div = 1;  CLIP_DYNAMIC: lo = -s, hi = s, div = s.
template <typename A>
struct ClipParams {
  A lo, hi, div;
};

template <int CLIP, typename A>
FD_HD A clip_value(A xr, const ClipParams<A>& cp) {
  if (CLIP == CLIP_NONE) return xr;
  const A c = fd_min(fd_max(xr, cp.lo), cp.hi);
  if (CLIP == CLIP_STATIC) return c;
  return c / cp.div;
}

// d xh / d xr.
template <int CLIP, typename A>
FD_HD A clip_grad(A xr, const ClipParams<A>& cp) {
  if (CLIP == CLIP_NONE) return A(1);
  const A in = (xr >= cp.lo && xr <= cp.hi) ? A(1) : A(0);
  if (CLIP == CLIP_STATIC) return in;
  return in / cp.div;
}

// Per-element sigma.
template <int VAR, typename A>
FD_HD A sigma_value(const Row<A>& c, A v) {
  if (VAR == VAR_FIXED) return c.s;
  if (VAR == VAR_LEARNED) return c.s * fd_sqrt(v);
  const A f = (v + A(1)) / A(2);
  return c.s * fd_exp(A(0.5) * (f * c.lb + (A(1) - f) * c.lt));
}

// c · v, except that a zero table coefficient drops its term (0 · ±inf would be NaN): the
// reference never forms the terms whose coefficients the table zeroes (u = 0 for "sample"
// prediction, r = 0 for DDPM with clipping, p = 0 in the collapsed unclipped form), so NaN/inf
// inputs propagate as they do there. σ·z keeps IEEE semantics (the reference forms σ·z).
template <typename A>
FD_HD A mul0(A c, A v) {
  return c == A(0) ? A(0) : c * v;
}

// x̂0 after clipping.
template <int CLIP, typename A>
FD_HD A step_xh(const Row<A>& c, const ClipParams<A>& cp, A x, A m) {
  return clip_value<CLIP>(mul0(c.u, x) + mul0(c.w, m), cp);
}

// y from x̂0 (clipped), x, m, σ, z.
template <typename A>
FD_HD A step_y(const Row<A>& c, A xh, A x, A m, A sigma, A z) {
  return mul0(c.p, xh) + mul0(c.q, x) + mul0(c.r, m) + sigma * z;
}

// Forward of one element. Returns y; *x0 receives xh.
template <int CLIP, int VAR, typename A>
FD_HD A step_forward_elem(const Row<A>& c, const ClipParams<A>& cp, A x, A m, A v, A z, A* x0) {
  const A xh = step_xh<CLIP>(c, cp, x, m);
  *x0 = xh;
  return step_y(c, xh, x, m, sigma_value<VAR>(c, v), z);
}

// Backward of one element.
template <int CLIP, int VAR, typename A>
FD_HD void step_backward_elem(const Row<A>& c, const ClipParams<A>& cp, A gy, A gx0, A x, A m,
                              A v, A z, A* gx, A* gm, A* gv, A* gnoise) {
  const A xr = mul0(c.u, x) + mul0(c.w, m);
  const A dh = clip_grad<CLIP>(xr, cp);
  *gx = gy * (c.q + c.p * c.u * dh) + gx0 * c.u * dh;
  *gm = gy * (c.r + c.p * c.w * dh) + gx0 * c.w * dh;
  const A sigma = sigma_value<VAR>(c, v);
  *gnoise = gy * sigma;
  if (VAR == VAR_LEARNED) {
    *gv = gy * z * c.s / (A(2) * fd_sqrt(v));
  } else if (VAR == VAR_LEARNED_RANGE) {
    *gv = gy * z * sigma * (c.lb - c.lt) / A(4);
  } else {
    *gv = A(0);
  }
}

}  // namespace fused_ddpm
