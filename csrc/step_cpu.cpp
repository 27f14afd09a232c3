// The C++ CPU kernels of the fused step (docs/kernels.md).
//
// Work is split with at::parallel_for over (sample, block) pairs. A block is BLOCK storage
// elements of one sample (contiguous layout) or P spatial positions × all C channels
// (channels_last). Per block: in-kernel noise is generated first into a small buffer (one
// Philox call per four logical elements, then Box–Muller), then one straight loop does the
// affine step. fp16/bf16 compute in float, fp32 in float, fp64 in double with a float64 table.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "step_cpu.h"
#include "step_math.h"

namespace fused_ddpm {
namespace {

constexpr int64_t BLOCK = 1024;  // storage elements per block (a multiple of 4)

template <typename A> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Normals of logical indices [i0, i0 + n) into z[0 .. n): one Philox call per group of four.
void gen_normals(uint64_t seed, uint32_t t, int64_t i0, int64_t n, float* z) {
  int64_t i = i0;
  const int64_t end = i0 + n;
  float tmp[4];
  if ((i & 3) && i < end) {
    philox_normal4(static_cast<uint64_t>(i >> 2), t, seed, tmp);
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
      float* zo = out + 4 * gb;
      for (int64_t k = 0; k < 2 * gn; ++k) {
        box_muller(uint32_to_uniform(raw[2 * k]), uint32_to_uniform(raw[2 * k + 1]),
                   &zo[2 * k], &zo[2 * k + 1]);
      }
    }
    i += 4 * ng;
  }
  if (i < end) {
    philox_normal4(static_cast<uint64_t>(i >> 2), t, seed, tmp);
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
  at::parallel_for(0, p.B * g.nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(EXT ? 0 : g.elems), tmp(EXT ? 0 : std::max<int64_t>(g.P, 1));
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / g.nblk, blk = idx % g.nblk;
      const int64_t s0 = p.channels_last ? blk * g.P * p.C : blk * BLOCK;
      const int64_t n = std::min(g.elems, p.N - s0);
      const Row<A> c = load_row<A>(table, p.T, p.t[b * p.t_stride]);
      const ClipParams<A> cp = clip_params<A>(p, b);
      const T* __restrict__ x = at_sample<const T>(p.x, b, s0);
      const T* __restrict__ m = at_sample<const T>(p.m, b, s0);
      const T* __restrict__ v = at_sample<const T>(p.v, b, s0);
      T* __restrict__ y = at_sample<T>(p.y, b, s0);
      T* __restrict__ x0 = at_sample<T>(p.x0, b, s0);
      const T* __restrict__ ze = EXT ? at_sample<const T>(p.noise, b, s0) : nullptr;
      const float* __restrict__ zi = nullptr;
      if (!EXT) {
        block_noise(p, g, b, blk, s0, n, zbuf.data(), tmp.data());
        zi = zbuf.data();
      }
      for (int64_t j = 0; j < n; ++j) {
        const A vv = VAR != VAR_FIXED ? static_cast<A>(v[j]) : A(0);
        const A z = EXT ? static_cast<A>(ze[j]) : static_cast<A>(zi[j]);
        A xh;
        const A yy = step_forward_elem<CLIP, VAR, A>(c, cp, static_cast<A>(x[j]),
                                                     static_cast<A>(m[j]), vv, z, &xh);
        y[j] = static_cast<T>(yy);
        if (x0) x0[j] = static_cast<T>(xh);
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
  at::parallel_for(0, p.B * g.nblk, 1, [&](int64_t begin, int64_t end) {
    const bool gen = !EXT && need_z;
    std::vector<float> zbuf(gen ? g.elems : 0), tmp(gen ? std::max<int64_t>(g.P, 1) : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / g.nblk, blk = idx % g.nblk;
      const int64_t s0 = p.channels_last ? blk * g.P * p.C : blk * BLOCK;
      const int64_t n = std::min(g.elems, p.N - s0);
      const Row<A> c = load_row<A>(table, p.T, p.t[b * p.t_stride]);
      const ClipParams<A> cp = clip_params<A>(p, b);
      const T* __restrict__ gy = at_sample<const T>(p.grad_y, b, s0);
      const T* __restrict__ gx0 = at_sample<const T>(p.grad_x0, b, s0);
      const T* __restrict__ x = at_sample<const T>(p.x, b, s0);
      const T* __restrict__ m = at_sample<const T>(p.m, b, s0);
      const T* __restrict__ v = at_sample<const T>(p.v, b, s0);
      T* __restrict__ gx = at_sample<T>(p.grad_x, b, s0);
      T* __restrict__ gm = at_sample<T>(p.grad_m, b, s0);
      T* __restrict__ gv = at_sample<T>(p.grad_v, b, s0);
      T* __restrict__ gn = at_sample<T>(p.grad_noise, b, s0);
      const T* __restrict__ ze = EXT ? at_sample<const T>(p.noise, b, s0) : nullptr;
      const float* __restrict__ zi = nullptr;
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
  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
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
