// The C++ CPU kernels of the fused step (docs/kernels.md).
//
// Work is split with at::parallel_for over (sample, block) pairs. A block is BLOCK storage
// elements of one sample (contiguous layout) or P spatial positions × all C channels
// (channels_last). Per block: in-kernel noise is generated first into a small buffer (one
// Philox call per four logical elements, then Box–Muller), then one straight loop does the
// affine step. fp16/bf16 compute in float, fp32 in float, fp64 in double with a float64 table.
// Build with -fno-math-errno (setup.py) so the noise loops vectorise.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "step_cpu.h"
#include "step_math.h"

namespace fused_ddpm {
namespace {

constexpr int64_t BLOCK = 1024;  // storage elements per block (a multiple of 4)
// Elements per parallel task at least: smaller steps run on one thread, since waking
// threads costs more than the work (and stalls whole steps on a busy machine).
constexpr int64_t PARALLEL_GRAIN = 1 << 16;

template <typename A> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// ---- host Box–Muller that the compiler can vectorise (needs -fno-math-errno for sqrt).
// ln u and sin/cos θ are evaluated in double with short polynomials and rounded to float, so
// they agree with libm's / PyTorch's float functions to about an ulp (the oracle's tolerance
// is 1e-6); the rest follows the spec's float32 operation order. Every CPU path (block and
// edge groups) uses these, so a logical element gets the same bits whatever the layout/split.
inline double bits_as_double(uint64_t b) { double d; std::memcpy(&d, &b, 8); return d; }
inline uint64_t double_as_bits(double d) { uint64_t b; std::memcpy(&b, &d, 8); return b; }

// ln u for u in (0, 1]: u = 2^e · mant with mant in [√½, √2), ln mant = 2 atanh(s), s = (mant−1)/(mant+1).
inline float log_unit(float u) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  const uint32_t ix = bits - 0x3f3504f3u;
  const int32_t e = static_cast<int32_t>(ix) >> 23;
  const uint32_t mb = (ix & 0x7fffffu) + 0x3f3504f3u;
  float mant;
  std::memcpy(&mant, &mb, 4);
  const double m = mant;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  const double p = s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 * (1.0 / 13))))));
  return static_cast<float>(e * 0.6931471805599453 + 2.0 * s * (1.0 + p));
}

// sin θ, cos θ for θ in [0, 2π]: quadrant by round-to-nearest (magic-number trick), Taylor on
// [−π/4, π/4], quadrant swap/sign by bit masks (no branches).
inline void sincos_unit(float theta, float* sn, float* cs) {
  const double x = theta;
  const double kk = x * 0.6366197723675814 + 6755399441055744.0;  // + 1.5·2^52
  const uint64_t q = double_as_bits(kk);                            // low bits: the quadrant
  const double k = kk - 6755399441055744.0;
  const double r = (x - k * 1.5707963267948966) - k * 6.123233995736766e-17;
  const double r2 = r * r;
  const double sr = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 + r2 * (-1.0 / 39916800)))));
  const double cr = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800 + r2 * (1.0 / 479001600))))));
  const uint64_t swap = 0 - (q & 1);
  const uint64_t su = double_as_bits(sr), cu = double_as_bits(cr);
  const uint64_t sv = ((su & ~swap) | (cu & swap)) ^ ((q & 2) << 62);
  const uint64_t cv = ((cu & ~swap) | (su & swap)) ^ (((q + 1) & 2) << 62);
  *sn = static_cast<float>(bits_as_double(sv));
  *cs = static_cast<float>(bits_as_double(cv));
}

// npairs Box–Muller pairs from raw Philox words: (raw[2k], raw[2k+1]) → (z[2k], z[2k+1]).
inline void normals_from_raw(const uint32_t* raw, float* z, int64_t npairs) {
  for (int64_t k = 0; k < npairs; ++k) {
    const float u0 = uint32_to_uniform(raw[2 * k]), u1 = uint32_to_uniform(raw[2 * k + 1]);
    const float rho = std::sqrt(-2.0f * log_unit(u0));
    float sn, cs;
    sincos_unit(u1 * TWO_PI_F32, &sn, &cs);
    z[2 * k] = rho * cs;
    z[2 * k + 1] = rho * sn;
  }
}

inline void normal4_cpu(uint64_t group, uint32_t t, uint64_t seed, float z[4]) {
  const U32x4 o = philox4x32_10(group, t, seed);
  normals_from_raw(o.v, z, 2);
}

// Normals of logical indices [i0, i0 + n) into z[0 .. n): one Philox call per group of four.
// x86-64 Linux: AVX-512 and AVX2 clones picked at load time (ifunc) when the CPU has them.
// Built with -ffp-contract=off (setup.py): no FMA, so every clone gives the same bits.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FD_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_CPU_CLONES
#endif

FD_CPU_CLONES void gen_normals(uint64_t seed, uint32_t t, int64_t i0, int64_t n, float* z) {
  int64_t i = i0;
  const int64_t end = i0 + n;
  float tmp[4];
  if ((i & 3) && i < end) {
    normal4_cpu(static_cast<uint64_t>(i >> 2), t, seed, tmp);
    for (; i < end && (i & 3); ++i) z[i - i0] = tmp[i & 3];
  }
  const int64_t ng = (end - i) >> 2;
  if (ng > 0) {
    // Raw Philox words first (a loop of integer ops the compiler can vectorise), then the
    // uniforms and Box–Muller.
    uint32_t raw[BLOCK + 4];
    float* out = z + (i - i0);
    const uint64_t g0 = static_cast<uint64_t>(i >> 2);
    for (int64_t gb = 0; gb < ng; gb += BLOCK / 4) {
      const int64_t gn = std::min<int64_t>(BLOCK / 4, ng - gb);
      for (int64_t g = 0; g < gn; ++g) {
        const U32x4 o = philox4x32_10(g0 + static_cast<uint64_t>(gb + g), t, seed);
        raw[4 * g + 0] = o.v[0];
        raw[4 * g + 1] = o.v[1];
        raw[4 * g + 2] = o.v[2];
        raw[4 * g + 3] = o.v[3];
      }
      normals_from_raw(raw, out + 4 * gb, 2 * gn);
    }
    i += 4 * ng;
  }
  if (i < end) {
    normal4_cpu(static_cast<uint64_t>(i >> 2), t, seed, tmp);
    for (; i < end; ++i) z[i - i0] = tmp[i & 3];
  }
}

struct BlockGeom {
  int64_t nblk;     // blocks per sample
  int64_t P;        // channels_last: spatial positions per block
  int64_t elems;    // max storage elements per block
};

BlockGeom block_geom(const StepParams& p) {
  BlockGeom g;
  if (p.channels_last) {
    g.P = std::max<int64_t>(1, BLOCK / std::max<int64_t>(p.C, 1));
    g.nblk = (p.S + g.P - 1) / g.P;
    g.elems = g.P * p.C;
  } else {
    g.P = 0;
    g.nblk = (p.N + BLOCK - 1) / BLOCK;
    g.elems = BLOCK;
  }
  return g;
}

// In-kernel noise of one block of sample b: storage range [s0, s0 + n) → zbuf[0 .. n).
void block_noise(const StepParams& p, const BlockGeom& g, int64_t b, int64_t blk, int64_t s0,
                 int64_t n, float* zbuf, float* tmp) {
  const uint64_t seed = static_cast<uint64_t>(p.seeds[b * p.seeds_stride]);
  const uint32_t t = static_cast<uint32_t>(p.t[b * p.t_stride]);
  if (!p.channels_last) {
    gen_normals(seed, t, s0, n, zbuf);
    return;
  }
  // storage s = pos * C + c  ↔  logical i = c * S + pos
  const int64_t C = p.C, pos0 = blk * g.P, np = n / C;
  for (int64_t c = 0; c < C; ++c) {
    gen_normals(seed, t, c * p.S + pos0, np, tmp);
    for (int64_t k = 0; k < np; ++k) zbuf[k * C + c] = tmp[k];
  }
}

template <typename A>
ClipParams<A> clip_params(const StepParams& p, int64_t b) {
  ClipParams<A> cp{A(0), A(0), A(1)};
  if (p.clip_mode == CLIP_STATIC) {
    cp.lo = static_cast<A>(-p.clip);
    cp.hi = static_cast<A>(p.clip);
  } else if (p.clip_mode == CLIP_DYNAMIC) {
    const A s = static_cast<A>(p.thresh[b * p.thresh_stride]);
    cp.lo = -s;
    cp.hi = s;
    cp.div = s;
  }
  return cp;
}

template <typename T>
inline T* at_sample(const TensorArg& a, int64_t b, int64_t s0) {
  return a.data ? static_cast<T*>(a.data) + b * a.batch_stride + s0 : nullptr;
}

template <typename T, int CLIP, int VAR, bool EXT>
void forward_impl(const StepParams& p) {
  using A = typename AccOf<T>::type;
  const BlockGeom g = block_geom(p);
  const A* table = static_cast<const A*>(p.table);
  at::parallel_for(0, p.B * g.nblk, std::max<int64_t>(1, PARALLEL_GRAIN / g.elems),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(EXT ? 0 : g.elems), tmp(EXT ? 0 : std::max<int64_t>(g.P, 1));
    std::vector<A> xbuf(p.x0.data ? g.elems : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / g.nblk, blk = idx % g.nblk;
      const int64_t s0 = p.channels_last ? blk * g.P * p.C : blk * BLOCK;
      const int64_t n = std::min(g.elems, p.N - s0);
      const Row<A> c = load_row<A>(table, p.T, p.t[b * p.t_stride]);
      const ClipParams<A> cp = clip_params<A>(p, b);
      const T* x = at_sample<const T>(p.x, b, s0);
      const T* m = at_sample<const T>(p.m, b, s0);
      const T* v = at_sample<const T>(p.v, b, s0);
      T* y = at_sample<T>(p.y, b, s0);
      T* x0 = at_sample<T>(p.x0, b, s0);
      const T* ze = EXT ? at_sample<const T>(p.noise, b, s0) : nullptr;
      const float* zi = nullptr;
      if (!EXT) {
        block_noise(p, g, b, blk, s0, n, zbuf.data(), tmp.data());
        zi = zbuf.data();
      }
      // Two straight loops (no conditional store inside) so that they vectorise.
      if (x0) {
        A* xb = xbuf.data();
        for (int64_t j = 0; j < n; ++j)
          xb[j] = step_xh<CLIP>(c, cp, static_cast<A>(x[j]), static_cast<A>(m[j]));
        for (int64_t j = 0; j < n; ++j) {
          const A vv = VAR != VAR_FIXED ? static_cast<A>(v[j]) : A(0);
          const A z = EXT ? static_cast<A>(ze[j]) : static_cast<A>(zi[j]);
          y[j] = static_cast<T>(step_y(c, xb[j], static_cast<A>(x[j]), static_cast<A>(m[j]),
                                       sigma_value<VAR>(c, vv), z));
        }
        for (int64_t j = 0; j < n; ++j) x0[j] = static_cast<T>(xb[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const A xx = static_cast<A>(x[j]), mm = static_cast<A>(m[j]);
          const A vv = VAR != VAR_FIXED ? static_cast<A>(v[j]) : A(0);
          const A z = EXT ? static_cast<A>(ze[j]) : static_cast<A>(zi[j]);
          const A xh = step_xh<CLIP>(c, cp, xx, mm);
          y[j] = static_cast<T>(step_y(c, xh, xx, mm, sigma_value<VAR>(c, vv), z));
        }
      }
    }
  });
}

template <typename T, int CLIP, int VAR, bool EXT>
void backward_impl(const StepParams& p) {
  using A = typename AccOf<T>::type;
  const BlockGeom g = block_geom(p);
  const A* table = static_cast<const A*>(p.table);
  const bool need_z = VAR != VAR_FIXED && p.grad_v.data != nullptr;
  at::parallel_for(0, p.B * g.nblk, std::max<int64_t>(1, PARALLEL_GRAIN / g.elems),
                   [&](int64_t begin, int64_t end) {
    const bool gen = !EXT && need_z;
    std::vector<float> zbuf(gen ? g.elems : 0), tmp(gen ? std::max<int64_t>(g.P, 1) : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / g.nblk, blk = idx % g.nblk;
      const int64_t s0 = p.channels_last ? blk * g.P * p.C : blk * BLOCK;
      const int64_t n = std::min(g.elems, p.N - s0);
      const Row<A> c = load_row<A>(table, p.T, p.t[b * p.t_stride]);
      const ClipParams<A> cp = clip_params<A>(p, b);
      const T* gy = at_sample<const T>(p.grad_y, b, s0);
      const T* gx0 = at_sample<const T>(p.grad_x0, b, s0);
      const T* x = at_sample<const T>(p.x, b, s0);
      const T* m = at_sample<const T>(p.m, b, s0);
      const T* v = at_sample<const T>(p.v, b, s0);
      T* gx = at_sample<T>(p.grad_x, b, s0);
      T* gm = at_sample<T>(p.grad_m, b, s0);
      T* gv = at_sample<T>(p.grad_v, b, s0);
      T* gn = at_sample<T>(p.grad_noise, b, s0);
      const T* ze = EXT ? at_sample<const T>(p.noise, b, s0) : nullptr;
      const float* zi = nullptr;
      if (gen) {
        block_noise(p, g, b, blk, s0, n, zbuf.data(), tmp.data());
        zi = zbuf.data();
      }
      for (int64_t j = 0; j < n; ++j) {
        const A vv = VAR != VAR_FIXED ? static_cast<A>(v[j]) : A(0);
        A z = A(0);
        if (VAR != VAR_FIXED) z = EXT ? static_cast<A>(ze[j]) : (zi ? static_cast<A>(zi[j]) : A(0));
        const A g0 = gx0 ? static_cast<A>(gx0[j]) : A(0);
        A dx, dm, dv, dn;
        step_backward_elem<CLIP, VAR, A>(c, cp, static_cast<A>(gy[j]), g0, static_cast<A>(x[j]),
                                         static_cast<A>(m[j]), vv, z, &dx, &dm, &dv, &dn);
        gx[j] = static_cast<T>(dx);
        gm[j] = static_cast<T>(dm);
        if (gv) gv[j] = static_cast<T>(dv);
        if (gn) gn[j] = static_cast<T>(dn);
      }
    }
  });
}

template <typename T, int CLIP, int VAR>
void forward_ext(const StepParams& p) {
  if (p.noise.data) forward_impl<T, CLIP, VAR, true>(p);
  else forward_impl<T, CLIP, VAR, false>(p);
}
template <typename T, int CLIP, int VAR>
void backward_ext(const StepParams& p) {
  if (p.noise.data) backward_impl<T, CLIP, VAR, true>(p);
  else backward_impl<T, CLIP, VAR, false>(p);
}

template <typename T, int CLIP>
void forward_var(const StepParams& p) {
  switch (p.var_mode) {
    case VAR_FIXED: return forward_ext<T, CLIP, VAR_FIXED>(p);
    case VAR_LEARNED: return forward_ext<T, CLIP, VAR_LEARNED>(p);
    default: return forward_ext<T, CLIP, VAR_LEARNED_RANGE>(p);
  }
}
template <typename T, int CLIP>
void backward_var(const StepParams& p) {
  switch (p.var_mode) {
    case VAR_FIXED: return backward_ext<T, CLIP, VAR_FIXED>(p);
    case VAR_LEARNED: return backward_ext<T, CLIP, VAR_LEARNED>(p);
    default: return backward_ext<T, CLIP, VAR_LEARNED_RANGE>(p);
  }
}

template <typename T>
void forward_clip(const StepParams& p) {
  switch (p.clip_mode) {
    case CLIP_NONE: return forward_var<T, CLIP_NONE>(p);
    case CLIP_STATIC: return forward_var<T, CLIP_STATIC>(p);
    default: return forward_var<T, CLIP_DYNAMIC>(p);
  }
}
template <typename T>
void backward_clip(const StepParams& p) {
  switch (p.clip_mode) {
    case CLIP_NONE: return backward_var<T, CLIP_NONE>(p);
    case CLIP_STATIC: return backward_var<T, CLIP_STATIC>(p);
    default: return backward_var<T, CLIP_DYNAMIC>(p);
  }
}

}  // namespace

void step_forward_cpu(const StepParams& p) {
  if (p.B == 0 || p.N == 0) return;
  switch (p.kind) {
    case KIND_F32: return forward_clip<float>(p);
    case KIND_F64: return forward_clip<double>(p);
    case KIND_F16: return forward_clip<c10::Half>(p);
    case KIND_BF16: return forward_clip<c10::BFloat16>(p);
  }
  TORCH_CHECK(false, "step_forward_kernel: unsupported dtype");
}

void step_backward_cpu(const StepParams& p) {
  if (p.B == 0 || p.N == 0) return;
  switch (p.kind) {
    case KIND_F32: return backward_clip<float>(p);
    case KIND_F64: return backward_clip<double>(p);
    case KIND_F16: return backward_clip<c10::Half>(p);
    case KIND_BF16: return backward_clip<c10::BFloat16>(p);
  }
  TORCH_CHECK(false, "step_backward_kernel: unsupported dtype");
}

void philox_uint32_cpu(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                       int64_t t_stride, int64_t B, int64_t numel, int64_t* out) {
  if (B == 0 || numel == 0) return;
  const int64_t groups = (numel + 3) / 4;
  const int64_t chunk = 4096;
  const int64_t nchunk = (groups + chunk - 1) / chunk;
  at::parallel_for(0, B * nchunk, std::max<int64_t>(1, PARALLEL_GRAIN / (4 * chunk)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / nchunk, ch = idx % nchunk;
      const uint64_t seed = static_cast<uint64_t>(seeds[b * seeds_stride]);
      const uint32_t tt = static_cast<uint32_t>(t[b * t_stride]);
      int64_t* o = out + b * numel;
      const int64_t g1 = std::min(groups, (ch + 1) * chunk);
      for (int64_t g = ch * chunk; g < g1; ++g) {
        const U32x4 r = philox4x32_10(static_cast<uint64_t>(g), tt, seed);
        for (int k = 0; k < 4; ++k) {
          const int64_t i = 4 * g + k;
          if (i < numel) o[i] = static_cast<int64_t>(r.v[k]);
        }
      }
    }
  });
}

}  // namespace fused_ddpm
