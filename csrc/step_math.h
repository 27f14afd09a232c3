// The math of the fused step, shared by the C++ CPU kernel (step_cpu.cpp) and the CUDA
// kernels (step_kernels.cu): Philox4x32-10, the uniform and Box–Muller transforms of the noise
// spec, the per-sample coefficients and the per-element forward and backward of
// docs/kernels.md. Every function is host+device under nvcc (FD_HD), plain inline otherwise.
// No torch headers here.
//
// Noise spec (docs/kernels.md, "Noise"; oracle fused_ddpm/philox.py): Philox4x32-10 with
// key = (seed lo, seed hi), counter = (g lo, g hi, t, stream), g = logical index / 4;
// u_j = ((o_j >> 8) + 1/2) 2^-24 in float32; rho = sqrt(-2 ln u0), theta = 2 pi u1 (float32 2 pi);
// z0 = rho cos theta, z1 = rho sin theta, likewise (u2, u3) -> (z2, z3).
#pragma once

#include <stdint.h>

#include "contract.h"
#include "step_params.h"

#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fused_ddpm {

// ----------------------------------------------------------------------------- scalar helpers

FD_HD uint32_t fd_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
FD_HD float fd_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
// a*b + c with one rounding (every backend, so the result does not depend on contraction).
FD_HD float fd_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FD_HD double fd_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
// min / max that return `a` itself when it is NaN (as torch.clamp in the reference): a
// comparison with NaN is false.
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
// exp(a) in float32 (within 3 ulp). Host: a polynomial the CPU loops vectorise (std::exp is
// a call per element): a = k ln 2 + r, |r| <= ln 2 / 2, exp(r) by a degree-6 Taylor
// polynomial, times 2^(k-1) from the exponent bits, times 2 (so k = 128 overflows to inf
// only where exp does). a is clamped to [-86, 89]: exp of anything lower is 2e-38 instead of
// a denormal or 0; NaN stays NaN.
FD_HD float fd_exp(float a) {
#if defined(__CUDA_ARCH__)
  return __expf(a);
#else
  const float x = fd_min(fd_max(a, -86.0f), 89.0f);
  const float kb = fd_fma(x, 1.44269504088896341f, 12582912.0f);  // 1.5 2^23 + round(x / ln 2)
  const float k = kb - 12582912.0f;
  const float r = fd_fma(k, -1.42860677e-06f, fd_fma(k, -0.693145752f, x));
  float p = 1.0f / 720;
  p = fd_fma(p, r, 1.0f / 120);
  p = fd_fma(p, r, 1.0f / 24);
  p = fd_fma(p, r, 1.0f / 6);
  p = fd_fma(p, r, 0.5f);
  p = fd_fma(p, r, 1.0f);
  p = fd_fma(p, r, 1.0f);
  return (p * fd_float((fd_bits(kb) - 0x4B400000u + 126u) << 23)) * 2.0f;
#endif
}

FD_HD double fd_exp(double a) {
#if defined(__CUDA_ARCH__)
  return exp(a);
#else
  return std::exp(a);
#endif
}

// ----------------------------------------------------------------------------- Philox4x32-10

constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;
constexpr int PHILOX_ROUNDS = 10;

struct U32x4 {
  uint32_t v[4];
};

// hi:lo = a * b, one 32x32 -> 64 multiply.
FD_HD void mul_wide(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  // mul.wide.u32 is one IMAD.WIDE.U32 writing a register pair; a 64-bit C++ product of
  // zero-extended operands also adds a zero high word (an IADD3 per multiply).
  asm("{\n\t.reg .u64 p;\n\tmul.wide.u32 p, %2, %3;\n\tmov.b64 {%1, %0}, p;\n\t}"
      : "=r"(hi), "=r"(lo)
      : "r"(a), "r"(b));
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// One round.
FD_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                        uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mul_wide(PHILOX_M0, c0, hi0, lo0);
  mul_wide(PHILOX_M1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c1 = lo1;
  c3 = lo0;
  c0 = n0;
  c2 = n2;
}

// The four output words of counter (c0, c1, c2, c3) under key (k0, k1). Round r uses key
// (k0 + r W0, k1 + r W1): constants per sample, so a loop over one sample's elements computes
// them once.
FD_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                          uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < PHILOX_ROUNDS; ++r)
    philox_round(c0, c1, c2, c3, k0 + static_cast<uint32_t>(r) * PHILOX_W0,
                 k1 + static_cast<uint32_t>(r) * PHILOX_W1);
  U32x4 o;
  o.v[0] = c0;
  o.v[1] = c1;
  o.v[2] = c2;
  o.v[3] = c3;
  return o;
}

// Philox words of group g (logical elements 4g .. 4g + 3) of one sample.
FD_HD U32x4 philox_group(uint64_t g, uint32_t t, uint32_t stream, uint64_t seed) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), t, stream,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ----------------------------------------------------------------------------- uniforms, logs

// uint32 -> uniform in (0, 1]: fma(o >> 8, 2^-24, 2^-25) rounds k 2^-24 + 2^-25 once, which is
// the spec's fl32(fl32(k) + 1/2) 2^-24 (scaling by a power of two commutes with rounding):
// the same bits as the oracle, one FFMA on the GPU.
FD_HD float uint32_to_uniform(uint32_t o) {
  return fd_fma(static_cast<float>(o >> 8), 5.9604644775390625e-08f, 2.98023223876953125e-08f);
}

// Scalar forms of the primitives the generic (scalar or SIMD) code below uses; the CPU vector
// types (step_cpu_simd.h) define the same names. Integer lanes are int32_t; shifts go through
// uint32_t (no signed-shift overflow).
FD_HD int32_t as_int(float f) { return static_cast<int32_t>(fd_bits(f)); }
FD_HD float as_float(int32_t i) { return fd_float(static_cast<uint32_t>(i)); }
FD_HD float to_float(int32_t i) { return static_cast<float>(i); }
FD_HD float fma_(float a, float b, float c) { return fd_fma(a, b, c); }
FD_HD float fms_(float a, float b, float c) { return fd_fma(a, b, -c); }   // a b - c
FD_HD float sqrt_(float a) { return fd_sqrt(a); }

FD_HD int32_t sra_(int32_t i, int n) { return i >> n; }  // arithmetic (two's complement)
FD_HD int32_t shl_(int32_t i, int n) {
  return static_cast<int32_t>(static_cast<uint32_t>(i) << n);
}

// Range reduction shared by the log approximations: u = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)),
// f exact. Generic over the value type V (float, or a SIMD vector of floats with its integer
// vector type VI; see step_cpu_simd.h) so the CPU vector code runs the same operations.
constexpr uint32_t LOG_REDUCE_C = 0x3f3504f3u;  // bits of float32 sqrt(1/2)

template <typename V, typename VI>
FD_HD void log_reduce(const V& u, V& e, V& f) {
  const VI ix = as_int(u) - VI(static_cast<int32_t>(LOG_REDUCE_C));
  e = to_float(sra_(ix, 23));  // arithmetic shift: the exponent, e <= 0 for u <= 1
  f = as_float((ix & VI(0x7fffff)) + VI(static_cast<int32_t>(LOG_REDUCE_C))) - V(1.0f);
}

// -2 ln u for u in (0, 1], fast (GPU fast math): -2 ln(1 + f) = f (-2 + f P(f)) with a degree-7
// minimax P (relative error 3e-8 before rounding; about 1e-7 in float32), no branch.
FD_HD float neg2_log_fast(float u) {
  float e, f;
  log_reduce<float, int32_t>(u, e, f);
  float p = -0.1746951937675476f;
  p = fd_fma(p, f, 0.2861499488353729f);
  p = fd_fma(p, f, -0.29835984110832214f);
  p = fd_fma(p, f, 0.3314102590084076f);
  p = fd_fma(p, f, -0.3992414176464081f);
  p = fd_fma(p, f, 0.5000351071357727f);
  p = fd_fma(p, f, -0.6666790246963501f);
  p = fd_fma(p, f, 0.9999998211860657f);
  p = fd_fma(p, f, -2.0f);
  return fd_fma(e, -1.3862943611198906f, f * p);
}

// ln u for u in (0, 1], accurate to 0.63 ulp (exhaustively checked against float64): it
// agrees with PyTorch's float32 log on 99.4 % of the uniforms and is within one ulp on all,
// which keeps the CPU normals within 1e-6 of the oracle. ln(1 + f) = f - f^2/2 + f^3 P(f)
// (degree-8 minimax P) with the leading terms summed exactly, plus e ln 2 split hi + lo.
template <typename V, typename VI>
FD_HD V log_accurate(const V& u) {
  V e, f;
  log_reduce<V, VI>(u, e, f);
  const V f2 = f * f;
  V p = V(0.06746608018875122f);
  p = fma_(p, f, V(-0.11675652861595154f));
  p = fma_(p, f, V(0.11888178437948227f));
  p = fma_(p, f, V(-0.1240558996796608f));
  p = fma_(p, f, V(0.14219550788402557f));
  p = fma_(p, f, V(-0.1666799634695053f));
  p = fma_(p, f, V(0.2000211924314499f));
  p = fma_(p, f, V(-0.25000008940696716f));
  p = fma_(p, f, V(0.3333331346511841f));
  const V hf_2 = V(0.5f) * f;
  const V hf = hf_2 * f;                   // f^2/2 rounded ...
  const V hf_lo = fms_(hf_2, f, hf);       // ... and its exact rounding error
  const V s = f - hf;                      // |hf| < |f|: Fast2Sum
  const V s_err = (f - s) - hf;
  const V tail = fma_(f2 * f, p, s_err - hf_lo);
  const V hi = fma_(e, V(0.693145751953125f), s);           // ln 2 hi: e * hi is exact
  const V hi_err = fms_(e, V(0.693145751953125f), hi) + s;  // Fast2Sum error of hi
  return hi + (hi_err + fma_(e, V(1.428606765330187e-06f), tail));
}

// sin and cos of theta in [0, 2 pi + 1], accurate (abs error <= 5.2e-8, within one float32 ulp of
// PyTorch's): quadrant k = round(theta 2/pi), r = theta - k pi/2 in three parts (the first
// exact), odd/even minimax polynomials on [-pi/4, pi/4], then swap and sign by k's bits.
template <typename V, typename VI>
FD_HD void sincos_accurate(const V& theta, V& sn, V& cs) {
  const V magic = V(12582912.0f);  // 1.5 2^23: adding it rounds to an integer
  const V kb = fma_(theta, V(0.6366197723675814f), magic);
  const V nk = magic - kb;  // -k
  const VI q = as_int(kb);  // low bits: k mod 4
  const V r1 = fma_(nk, V(1.5707963705062866f), theta);  // exact
  const V rh = fma_(nk, V(-4.371139000186241e-08f), r1);
  V rl = fma_(nk, V(-4.371139000186241e-08f), r1 - rh);
  rl = fma_(nk, V(-1.7151245100059164e-15f), rl);
  const V y = rh * rh;
  // sin r = r + r^3 S(r^2)
  V ps = V(2.7181140467291698e-06f);
  ps = fma_(ps, y, V(-0.00019839311426039785f));
  ps = fma_(ps, y, V(0.008333329111337662f));
  ps = fma_(ps, y, V(-0.1666666716337204f));
  const V s = rh + fma_(rh * y, ps, rl);
  // cos r = 1 - r^2/2 + r^4 C(r^2), with 1 - r^2/2 summed exactly
  V pc = V(-2.7210168696001347e-07f);
  pc = fma_(pc, y, V(2.4799519451335073e-05f));
  pc = fma_(pc, y, V(-0.0013888883404433727f));
  pc = fma_(pc, y, V(0.0416666679084301f));
  const V hr = V(0.5f) * y;
  const V hr_lo = fms_(V(0.5f) * rh, rh, hr);
  const V w = V(1.0f) - hr;
  const V w_err = (V(1.0f) - w) - hr;
  const V c = w + (w_err + fms_(y * y, pc, fma_(rh, rl, hr_lo)));
  // quadrant: odd k swaps sin and cos; sin < 0 for k mod 4 in {2, 3}, cos < 0 for {1, 2}
  const VI swap = VI(0) - (q & VI(1));
  const VI si = as_int(s), ci = as_int(c);
  const VI sw = (si & ~swap) | (ci & swap);
  const VI cw = (ci & ~swap) | (si & swap);
  sn = as_float(sw ^ shl_(q & VI(2), 30));
  cs = as_float(cw ^ shl_((q + VI(1)) & VI(2), 30));
}

// Box–Muller of two raw Philox words, CPU accuracy (the same operations for every CPU vector
// width, so a logical element gets the same bits whatever the machine's SIMD support).
template <typename V, typename VI>
FD_HD void box_muller_accurate(const V& u0, const V& u1, V& z0, V& z1) {
  const V rho = sqrt_(V(-2.0f) * log_accurate<V, VI>(u0));
  V sn, cs;
  sincos_accurate<V, VI>(u1 * V(6.2831854820251465f), sn, cs);
  z0 = rho * cs;
  z1 = rho * sn;
}

#if defined(__CUDACC__)
// Box–Muller of two raw words, GPU fast math (within 1e-5 of the oracle): the log polynomial
// above, sqrt, and __sincosf on theta reduced into [-pi, pi] (its accurate range) without a
// branch: theta - 2 pi (float32 2 pi, exact for theta >= pi) differs from the angle by
// 2 pi - fl32(2 pi) = 1.7e-7 only.
__device__ __forceinline__ void box_muller_fast(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float u0 = uint32_to_uniform(a);
  const float u1 = uint32_to_uniform(b);
  const float rho = sqrtf(neg2_log_fast(u0));
  const float theta = __fmul_rn(u1, 6.2831854820251465f);  // the spec's float32 theta (no FMA)
  float s, c;
  __sincosf(theta > 3.1415927410125732f ? theta - 6.2831854820251465f : theta, &s, &c);
  z0 = rho * c;
  z1 = rho * s;
}
#endif

// ----------------------------------------------------------------------------- per sample

// Everything a kernel needs of sample b besides the streams, in the compute type A (float;
// double for the CPU fp64 kernel).
template <typename A>
struct SampleCoef {
  A c[NUM_COLS];  // the table row of sample b
  A lo, hi, inv;  // x̂0 = min(max(xr, lo), hi) inv: STATIC (-clip, clip, 1), DYNAMIC (-s, s, 1/s)
  A ga, gb;       // guided: m = ga M + gb MC, ga = k_b (1 - g), gb = k_b g
};

// Row index of sample b: t[b] clamped into the table.
FD_HD int64_t row_of(const StepParams& p, int64_t b) {
  const int64_t t = p.t.data[b * p.t.stride];
  return t < 0 ? 0 : (t > p.rows - 1 ? p.rows - 1 : t);
}

template <typename A>
FD_HD SampleCoef<A> sample_coef(const StepParams& p, int64_t b) {
  SampleCoef<A> k;
  const A* row = static_cast<const A*>(p.table) + row_of(p, b) * NUM_COLS;
  for (int i = 0; i < NUM_COLS; ++i) k.c[i] = row[i];
  k.lo = A(0);
  k.hi = A(0);
  k.inv = A(1);
  if (p.clip == Clip::STATIC) {
    k.lo = static_cast<A>(-p.clip_value);
    k.hi = static_cast<A>(p.clip_value);
  } else if (p.clip == Clip::DYNAMIC) {
    const A s = static_cast<A>(p.thresh.data[b * p.thresh.stride]);
    k.lo = -s;
    k.hi = s;
    k.inv = A(1) / s;
  }
  const A kb = p.gscale.data ? static_cast<A>(p.gscale.data[b * p.gscale.stride]) : A(1);
  k.ga = kb * static_cast<A>(1.0 - p.guidance);
  k.gb = kb * static_cast<A>(p.guidance);
  return k;
}

// ----------------------------------------------------------------------------- features

// What a launch computes, as the per-element functions below ask it: a runtime description
// (RuntimeFeatures, decided once per launch) or compile-time constants (LeanFeatures), for
// which the compiler removes every absent term.
//
// The functions below choose terms without branches: both candidates are computed and one is
// selected (fd_select).
struct RuntimeFeatures {
  int terms, clip, var;
  bool guided, need_xh;
  FD_HD bool has(int col) const { return (terms >> col) & 1; }
};

FD_HD RuntimeFeatures runtime_features(const StepParams& p) {
  RuntimeFeatures f;
  f.terms = p.terms;
  f.clip = p.clip;
  f.var = p.var;
  f.guided = p.guided;
  f.need_xh = p.need_xh;
  return f;
}

// The step the lean kernels are specialised for (DDPM/DDIM without clipping, fixed variance,
// no guidance, no x̂0 output): y = Q x + R m (+ S z). NOISE: does the launch have z.
template <bool NOISE>
struct LeanFeatures {
  static constexpr int terms = (1 << Col::Q) | (1 << Col::R) | (NOISE ? (1 << Col::S) : 0);
  static constexpr int clip = Clip::NONE, var = Var::FIXED;
  static constexpr bool guided = false, need_xh = false;
  FD_HD static constexpr bool has(int col) { return (terms >> col) & 1; }
};

// c ? a : b for a launch-wide c. On the host a bit blend: the compilers' vectorisers turn it
// into vector ands and ors, where a conditional would stop them (they do not speculate the
// float operations of the other side). On the GPU a select or predicated instruction.
FD_HD float fd_select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return fd_float((fd_bits(a) & m) | (fd_bits(b) & ~m));
#endif
}
FD_HD double fd_select(bool c, double a, double b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint64_t m = 0ull - static_cast<uint64_t>(c);
  uint64_t ua, ub;
  std::memcpy(&ua, &a, 8);
  std::memcpy(&ub, &b, 8);
  const uint64_t r = (ua & m) | (ub & ~m);
  double d;
  std::memcpy(&d, &r, 8);
  return d;
#endif
}

// The streams a backward launch reads besides grad_y / grad_x0 (docs/kernels.md, "Backward"):
// x, m and z only for the clip's d x̂0 / d xr, v for sigma, z also for the variance gradient.
struct BackwardReads {
  bool x, m, v, z;
};
FD_HD BackwardReads backward_reads(const RuntimeFeatures& f, bool want_grad_v, bool want_grad_z) {
  const bool xr = f.need_xh && f.clip != Clip::NONE;
  const bool s_term = f.has(Col::S) && f.var != Var::FIXED;
  BackwardReads r;
  r.x = xr && f.has(Col::U);
  r.m = xr && f.has(Col::W);
  r.v = s_term && (want_grad_v || want_grad_z);
  r.z = (xr && f.has(Col::E)) || (s_term && want_grad_v);
  return r;
}

// Is a forward launch exactly the lean step y = Q x + R m (+ S z) (LeanFeatures<*noise>):
// no x̂0, no guidance, fixed variance, no H term? Decided on the host, once per launch.
inline bool is_lean_forward(const StepParams& p, bool* noise) {
  const int qr = (1 << Col::Q) | (1 << Col::R);
  *noise = p.noise != Noise::NONE && ((p.terms >> Col::S) & 1);
  const int want = qr | (*noise ? (1 << Col::S) : 0);
  return !p.need_xh && !p.guided && p.var == Var::FIXED && p.out[Out::X0].data == nullptr &&
         (p.terms & (qr | (1 << Col::S) | (1 << Col::H))) == want;
}

// Is a backward launch the lean one: grad x = Q gy and grad m = R gy wanted, nothing else?
inline bool is_lean_backward(const StepParams& p) {
  const int qr = (1 << Col::Q) | (1 << Col::R);
  if (p.need_xh || p.guided || p.var != Var::FIXED || (p.terms & qr) != qr) return false;
  if (p.grad[In::X].data == nullptr || p.grad[In::M].data == nullptr) return false;
  return p.grad[In::MC].data == nullptr && p.grad[In::V].data == nullptr &&
         p.grad[In::Z].data == nullptr && p.grad[In::H].data == nullptr;
}

// The model output m of one element.
template <typename F, typename A>
FD_HD A model_m(const F& f, const SampleCoef<A>& k, A M, A MC) {
  return fd_select(f.guided, k.ga * M + k.gb * MC, M);
}

// sigma of one element (Var mode).
template <typename F, typename A>
FD_HD A sigma_of(const F& f, const SampleCoef<A>& k, A v) {
  if (f.var == Var::SQRT) return k.c[Col::S] * fd_sqrt(v);
  if (f.var == Var::EXP) return k.c[Col::S] * fd_exp(k.c[Col::VA] + k.c[Col::VB] * v);
  return k.c[Col::S];
}

// The empty sum the terms are added to: -0 + t == t exactly (also for t = -0), so a sum of
// terms is the same whichever term comes first and a compiler may drop the addition.
template <typename A>
FD_HD constexpr A empty_sum() { return A(-0.0); }

// acc + c v if the launch computes the col-term, else acc (the term is left out).
template <typename F, typename A>
FD_HD A add_term(const F& f, int col, A acc, A c, A v) {
  return fd_select(f.has(col), acc + c * v, acc);
}

// x̂0 before clipping: U x + W m + E z.
template <typename F, typename A>
FD_HD A step_xr(const F& f, const SampleCoef<A>& k, A x, A m, A z) {
  A xr = empty_sum<A>();
  xr = add_term(f, Col::U, xr, k.c[Col::U], x);
  xr = add_term(f, Col::W, xr, k.c[Col::W], m);
  xr = add_term(f, Col::E, xr, k.c[Col::E], z);
  return xr;
}

// Clip mode applied to xr.
template <typename F, typename A>
FD_HD A step_clip(const F& f, const SampleCoef<A>& k, A xr) {
  return fd_select(f.clip == Clip::NONE, xr, fd_min(fd_max(xr, k.lo), k.hi) * k.inv);
}

// d x̂0 / d xr.
template <typename F, typename A>
FD_HD A step_dclip(const F& f, const SampleCoef<A>& k, A xr) {
  const A inside = ((xr >= k.lo) & (xr <= k.hi)) ? k.inv : A(0);  // & : no branch
  return fd_select(f.clip == Clip::NONE, A(1), inside);
}

// One element forward: returns y; *xh receives x̂0 (only meaningful when f.need_xh).
template <typename F, typename A>
FD_HD A step_forward_elem(const F& f, const SampleCoef<A>& k, A x, A m, A v, A z, A h, A* xh) {
  A y = empty_sum<A>();
  if (f.need_xh) {
    *xh = step_clip(f, k, step_xr(f, k, x, m, z));
    y = add_term(f, Col::P, y, k.c[Col::P], *xh);
  }
  y = add_term(f, Col::Q, y, k.c[Col::Q], x);
  y = add_term(f, Col::R, y, k.c[Col::R], m);
  y = add_term(f, Col::H, y, k.c[Col::H], h);
  y = add_term(f, Col::S, y, sigma_of(f, k, v), z);
  return y;
}

// One element backward (docs/kernels.md, "Backward"). gy, g0: dL/dy, dL/dx0. Writes the
// gradients of x, m (before the guidance split), z, h, v.
template <typename A>
struct ElemGrads {
  A x, m, z, h, v;
};
template <typename F, typename A>
FD_HD ElemGrads<A> step_backward_elem(const F& f, const SampleCoef<A>& k, A gy, A g0, A x,
                                      A m, A v, A z) {
  ElemGrads<A> g;
  A a = A(0);
  if (f.need_xh)  // a = (gy P + g0) dh; dh = 1 without clipping
    a = add_term(f, Col::P, g0, k.c[Col::P], gy) * step_dclip(f, k, step_xr(f, k, x, m, z));
  g.x = add_term(f, Col::U, add_term(f, Col::Q, empty_sum<A>(), k.c[Col::Q], gy), k.c[Col::U], a);
  g.m = add_term(f, Col::W, add_term(f, Col::R, empty_sum<A>(), k.c[Col::R], gy), k.c[Col::W], a);
  const A sigma = sigma_of(f, k, v);
  g.z = add_term(f, Col::E, add_term(f, Col::S, empty_sum<A>(), sigma, gy), k.c[Col::E], a);
  g.h = add_term(f, Col::H, empty_sum<A>(), k.c[Col::H], gy);
  A gv = A(0);
  if (f.var == Var::SQRT) gv = gy * z * k.c[Col::S] / (A(2) * fd_sqrt(v));
  if (f.var == Var::EXP) gv = gy * z * sigma * k.c[Col::VB];
  g.v = fd_select(f.has(Col::S), gv, A(0));
  return g;
}

}  // namespace fused_ddpm
