// The CUDA kernels of the fused step (docs/kernels.md). Pure CUDA: compiles with nvcc alone
// (see .ci/nvcc_check.sh); the torch binding is step_cuda.cpp.
//
// Each thread walks "units" of W consecutive storage elements of one sample with a
// grid-stride loop over (sample, unit) pairs; the grid is sized from the SM count and the
// kernel's occupancy. Vector path (every pointer and batch stride 16-byte aligned): W = 16 B
// of elements (4 fp32, 8 fp16/bf16) moved with one 128-bit load/store per tensor, scalar
// accesses for a sample's partial last unit. Scalar path (anything misaligned): W = 4, scalar
// accesses. In-kernel noise, contiguous layout: units start at multiples of 4, so one Philox
// call serves four elements. channels_last: neighbouring storage elements are C logical
// elements apart, so each element takes its own Philox call.
// __launch_bounds__(THREADS, 1): without the min-blocks hint ptxas spilled a few bytes in
// some bf16 instantiations at 64–80 registers; with it none spill (≤ ~100 registers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "step_launch.h"
#include "step_math.h"
#include "step_params.h"

namespace fused_ddpm {
namespace {

constexpr int THREADS = 256;

template <int KIND> struct Elem;
template <> struct Elem<KIND_F32> {
  using bits = uint32_t;
  static __device__ __forceinline__ float to(bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ bits from(float f) { return __float_as_uint(f); }
};
template <> struct Elem<KIND_F16> {
  using bits = unsigned short;
  static __device__ __forceinline__ float to(bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ bits from(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
template <> struct Elem<KIND_BF16> {
  using bits = unsigned short;
  static __device__ __forceinline__ float to(bits b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ bits from(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// W elements starting at element s0 of sample b of tensor a, as floats. VEC: one 16-byte
// access (the caller guarantees alignment and a full unit); else scalar, bounds-checked.
template <int KIND, int W, bool VEC>
__device__ __forceinline__ void load_unit(const TensorArg& a, int64_t b, int64_t s0, int64_t n,
                                          float* out) {
  using E = Elem<KIND>;
  using bits = typename E::bits;
  const bits* ptr = static_cast<const bits*>(a.data) + b * a.batch_stride + s0;
  if (VEC) {
    const uint4 r = *reinterpret_cast<const uint4*>(ptr);
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    if (sizeof(bits) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = E::to(static_cast<bits>(w[k]));
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[2 * k] = E::to(static_cast<bits>(w[k] & 0xFFFFu));
        out[2 * k + 1] = E::to(static_cast<bits>(w[k] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = (k < n) ? E::to(ptr[k]) : 0.0f;
  }
}

template <int KIND, int W, bool VEC>
__device__ __forceinline__ void store_unit(const TensorArg& a, int64_t b, int64_t s0, int64_t n,
                                           const float* in) {
  using E = Elem<KIND>;
  using bits = typename E::bits;
  bits* ptr = static_cast<bits*>(a.data) + b * a.batch_stride + s0;
  if (VEC) {
    uint32_t w[4];
    if (sizeof(bits) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = static_cast<uint32_t>(E::from(in[k]));
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = static_cast<uint32_t>(E::from(in[2 * k])) |
               (static_cast<uint32_t>(E::from(in[2 * k + 1])) << 16);
      }
    }
    *reinterpret_cast<uint4*>(ptr) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k)
      if (k < n) ptr[k] = E::from(in[k]);
  }
}

// In-kernel noise of the unit [s0, s0 + W) of one sample.
template <int W>
__device__ __forceinline__ void unit_noise(const StepParams& p, uint64_t seed, uint32_t t,
                                           int64_t s0, int64_t n, float* z) {
  if (!p.channels_last) {
#pragma unroll
    for (int q = 0; q < W / 4; ++q)
      philox_normal4(static_cast<uint64_t>(s0 / 4 + q), t, seed, z + 4 * q);
  } else {
    int64_t pos = s0 / p.C;
    int64_t c = s0 - pos * p.C;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      z[k] = (k < n) ? philox_normal1(static_cast<uint64_t>(c * p.S + pos), t, seed) : 0.0f;
      if (++c == p.C) {
        c = 0;
        ++pos;
      }
    }
  }
}

__device__ __forceinline__ ClipParams<float> clip_params(const StepParams& p, int clip_mode,
                                                         int64_t b) {
  ClipParams<float> cp;
  cp.lo = 0.0f;
  cp.hi = 0.0f;
  cp.div = 1.0f;
  if (clip_mode == CLIP_STATIC) {
    cp.lo = -static_cast<float>(p.clip);
    cp.hi = static_cast<float>(p.clip);
  } else if (clip_mode == CLIP_DYNAMIC) {
    const float s = p.thresh[b * p.thresh_stride];
    cp.lo = -s;
    cp.hi = s;
    cp.div = s;
  }
  return cp;
}

// Grid-stride walk over (sample b, unit j) with W-element units; calls body(b, s0, n).
template <int W, typename Body>
__device__ __forceinline__ void for_each_unit(const StepParams& p, Body&& body) {
  const int64_t U = (p.N + W - 1) / W;
  const int64_t total = p.B * U;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gid >= total) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t db = stride / U, dj = stride - db * U;
  int64_t b = gid / U, j = gid - b * U;
  while (b < p.B) {
    const int64_t s0 = j * W;
    const int64_t rem = p.N - s0;
    body(b, s0, rem < W ? rem : static_cast<int64_t>(W));
    j += dj;
    b += db;
    if (j >= U) {
      j -= U;
      ++b;
    }
  }
}

template <int KIND, int CLIP, int VAR, bool EXT, int W, bool VEC>
__device__ __forceinline__ void forward_body(const StepParams& p) {
  const float* table = static_cast<const float*>(p.table);
  for_each_unit<W>(p, [&](int64_t b, int64_t s0, int64_t n) {
    const Row<float> c = load_row<float>(table, p.T, p.t[b * p.t_stride]);
    const ClipParams<float> cp = clip_params(p, CLIP, b);
    const bool vec = VEC && n == W;
    float x[W], m[W], v[W], z[W];
    if (vec) {
      load_unit<KIND, W, true>(p.x, b, s0, n, x);
      load_unit<KIND, W, true>(p.m, b, s0, n, m);
      if (VAR != VAR_FIXED) load_unit<KIND, W, true>(p.v, b, s0, n, v);
      if (EXT) load_unit<KIND, W, true>(p.noise, b, s0, n, z);
    } else {
      load_unit<KIND, W, false>(p.x, b, s0, n, x);
      load_unit<KIND, W, false>(p.m, b, s0, n, m);
      if (VAR != VAR_FIXED) load_unit<KIND, W, false>(p.v, b, s0, n, v);
      if (EXT) load_unit<KIND, W, false>(p.noise, b, s0, n, z);
    }
    if (!EXT) {
      const uint64_t seed = static_cast<uint64_t>(p.seeds[b * p.seeds_stride]);
      const uint32_t tt = static_cast<uint32_t>(p.t[b * p.t_stride]);
      unit_noise<W>(p, seed, tt, s0, n, z);
    }
    float y[W], x0[W];
#pragma unroll
    for (int k = 0; k < W; ++k)
      y[k] = step_forward_elem<CLIP, VAR, float>(c, cp, x[k], m[k],
                                                 VAR != VAR_FIXED ? v[k] : 0.0f, z[k], &x0[k]);
    if (vec) {
      store_unit<KIND, W, true>(p.y, b, s0, n, y);
      if (p.x0.data) store_unit<KIND, W, true>(p.x0, b, s0, n, x0);
    } else {
      store_unit<KIND, W, false>(p.y, b, s0, n, y);
      if (p.x0.data) store_unit<KIND, W, false>(p.x0, b, s0, n, x0);
    }
  });
}

template <int KIND, int CLIP, int VAR, bool EXT, int W, bool VEC>
__device__ __forceinline__ void backward_body(const StepParams& p) {
  const float* table = static_cast<const float*>(p.table);
  const bool need_z = VAR != VAR_FIXED && p.grad_v.data != nullptr;
  for_each_unit<W>(p, [&](int64_t b, int64_t s0, int64_t n) {
    const Row<float> c = load_row<float>(table, p.T, p.t[b * p.t_stride]);
    const ClipParams<float> cp = clip_params(p, CLIP, b);
    const bool vec = VEC && n == W;
    float gy[W], g0[W], x[W], m[W], v[W], z[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      g0[k] = 0.0f;
      z[k] = 0.0f;
      v[k] = 0.0f;
    }
    if (vec) {
      load_unit<KIND, W, true>(p.grad_y, b, s0, n, gy);
      if (p.grad_x0.data) load_unit<KIND, W, true>(p.grad_x0, b, s0, n, g0);
      load_unit<KIND, W, true>(p.x, b, s0, n, x);
      load_unit<KIND, W, true>(p.m, b, s0, n, m);
      if (VAR != VAR_FIXED) load_unit<KIND, W, true>(p.v, b, s0, n, v);
      if (EXT && need_z) load_unit<KIND, W, true>(p.noise, b, s0, n, z);
    } else {
      load_unit<KIND, W, false>(p.grad_y, b, s0, n, gy);
      if (p.grad_x0.data) load_unit<KIND, W, false>(p.grad_x0, b, s0, n, g0);
      load_unit<KIND, W, false>(p.x, b, s0, n, x);
      load_unit<KIND, W, false>(p.m, b, s0, n, m);
      if (VAR != VAR_FIXED) load_unit<KIND, W, false>(p.v, b, s0, n, v);
      if (EXT && need_z) load_unit<KIND, W, false>(p.noise, b, s0, n, z);
    }
    if (!EXT && need_z) {
      const uint64_t seed = static_cast<uint64_t>(p.seeds[b * p.seeds_stride]);
      const uint32_t tt = static_cast<uint32_t>(p.t[b * p.t_stride]);
      unit_noise<W>(p, seed, tt, s0, n, z);
    }
    float gx[W], gm[W], gv[W], gn[W];
#pragma unroll
    for (int k = 0; k < W; ++k)
      step_backward_elem<CLIP, VAR, float>(c, cp, gy[k], g0[k], x[k], m[k], v[k], z[k], &gx[k],
                                           &gm[k], &gv[k], &gn[k]);
    if (vec) {
      store_unit<KIND, W, true>(p.grad_x, b, s0, n, gx);
      store_unit<KIND, W, true>(p.grad_m, b, s0, n, gm);
      if (VAR != VAR_FIXED && p.grad_v.data) store_unit<KIND, W, true>(p.grad_v, b, s0, n, gv);
      if (p.grad_noise.data) store_unit<KIND, W, true>(p.grad_noise, b, s0, n, gn);
    } else {
      store_unit<KIND, W, false>(p.grad_x, b, s0, n, gx);
      store_unit<KIND, W, false>(p.grad_m, b, s0, n, gm);
      if (VAR != VAR_FIXED && p.grad_v.data) store_unit<KIND, W, false>(p.grad_v, b, s0, n, gv);
      if (p.grad_noise.data) store_unit<KIND, W, false>(p.grad_noise, b, s0, n, gn);
    }
  });
}

template <int KIND>
struct VecWidth {
  static constexpr int value = KIND == KIND_F32 ? 4 : 8;  // 16 bytes of elements
};

template <int KIND, int CLIP, int VAR, bool EXT>
__global__ void __launch_bounds__(THREADS, 1)
    fd_step_forward(const StepParams p, bool vec) {
  if (vec) forward_body<KIND, CLIP, VAR, EXT, VecWidth<KIND>::value, true>(p);
  else forward_body<KIND, CLIP, VAR, EXT, 4, false>(p);
}

template <int KIND, int CLIP, int VAR, bool EXT>
__global__ void __launch_bounds__(THREADS, 1)
    fd_step_backward(const StepParams p, bool vec) {
  if (vec) backward_body<KIND, CLIP, VAR, EXT, VecWidth<KIND>::value, true>(p);
  else backward_body<KIND, CLIP, VAR, EXT, 4, false>(p);
}

__global__ void __launch_bounds__(THREADS, 1)
    fd_philox_uint32(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                     int64_t t_stride, int64_t B, int64_t numel, int64_t* out) {
  const int64_t G = (numel + 3) / 4;
  const int64_t total = B * G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / G, g = idx - b * G;
    const U32x4 r = philox4x32_10(static_cast<uint64_t>(g), static_cast<uint32_t>(t[b * t_stride]),
                                  static_cast<uint64_t>(seeds[b * seeds_stride]));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * g + k;
      if (i < numel) out[b * numel + i] = static_cast<int64_t>(r.v[k]);
    }
  }
}

// ---------------------------------------------------------------------------------- launch

int sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  static int cache[128] = {0};
  if (dev >= 0 && dev < 128 && cache[dev] > 0) return cache[dev];
  int n = 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the launch's own error check must not see it
    n = 1;
  }
  if (n < 1) n = 1;
  if (dev >= 0 && dev < 128) cache[dev] = n;
  return n;
}

// Grid size: enough blocks for every unit, at most what is resident at once (occupancy of
// the kernel × SM count); the kernels are grid-stride loops. `per_sm` caches the occupancy.
template <typename K>
int grid_for(K kernel, int64_t units, int* per_sm) {
  if (*per_sm <= 0) {
    int nb = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, THREADS, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // a fallback size, not a launch failure
      nb = 4;
    }
    if (nb < 1) nb = 4;
    *per_sm = nb;
  }
  const int64_t need = (units + THREADS - 1) / THREADS;
  const int64_t cap = static_cast<int64_t>(*per_sm) * sm_count();
  const int64_t g = need < cap ? need : cap;
  return static_cast<int>(g < 1 ? 1 : g);
}

bool aligned16(const TensorArg& a, int64_t elem_size, int64_t B) {
  if (a.data == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(a.data) % 16 != 0) return false;
  return B <= 1 || (a.batch_stride * elem_size) % 16 == 0;
}

int64_t elem_size(int kind) { return kind == KIND_F32 ? 4 : 2; }

bool can_vectorize(const StepParams& p) {
  const int64_t es = elem_size(p.kind);
  const TensorArg* all[] = {&p.x, &p.m, &p.v, &p.noise, &p.grad_y, &p.grad_x0,
                            &p.y, &p.x0, &p.grad_x, &p.grad_m, &p.grad_v, &p.grad_noise};
  for (const TensorArg* a : all)
    if (!aligned16(*a, es, p.B)) return false;
  return true;
}

template <int KIND, int CLIP, int VAR, bool EXT, bool FWD>
cudaError_t launch4(const StepParams& p, bool vec, cudaStream_t stream) {
  const int64_t W = vec ? VecWidth<KIND>::value : 4;
  const int64_t units = p.B * ((p.N + W - 1) / W);
  static int per_sm = 0;  // one per instantiation
  auto k = FWD ? fd_step_forward<KIND, CLIP, VAR, EXT> : fd_step_backward<KIND, CLIP, VAR, EXT>;
  k<<<grid_for(k, units, &per_sm), THREADS, 0, stream>>>(p, vec);
  return cudaGetLastError();
}

template <int KIND, int CLIP, int VAR, bool FWD>
cudaError_t launch3(const StepParams& p, bool vec, cudaStream_t s) {
  return p.noise.data ? launch4<KIND, CLIP, VAR, true, FWD>(p, vec, s)
                      : launch4<KIND, CLIP, VAR, false, FWD>(p, vec, s);
}

template <int KIND, int CLIP, bool FWD>
cudaError_t launch2(const StepParams& p, bool vec, cudaStream_t s) {
  switch (p.var_mode) {
    case VAR_FIXED: return launch3<KIND, CLIP, VAR_FIXED, FWD>(p, vec, s);
    case VAR_LEARNED: return launch3<KIND, CLIP, VAR_LEARNED, FWD>(p, vec, s);
    default: return launch3<KIND, CLIP, VAR_LEARNED_RANGE, FWD>(p, vec, s);
  }
}

template <int KIND, bool FWD>
cudaError_t launch1(const StepParams& p, bool vec, cudaStream_t s) {
  switch (p.clip_mode) {
    case CLIP_NONE: return launch2<KIND, CLIP_NONE, FWD>(p, vec, s);
    case CLIP_STATIC: return launch2<KIND, CLIP_STATIC, FWD>(p, vec, s);
    default: return launch2<KIND, CLIP_DYNAMIC, FWD>(p, vec, s);
  }
}

template <bool FWD>
cudaError_t launch_step(const StepParams& p, cudaStream_t s) {
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  const bool vec = can_vectorize(p);
  switch (p.kind) {
    case KIND_F32: return launch1<KIND_F32, FWD>(p, vec, s);
    case KIND_F16: return launch1<KIND_F16, FWD>(p, vec, s);
    case KIND_BF16: return launch1<KIND_BF16, FWD>(p, vec, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_step_forward(const StepParams& p, cudaStream_t stream) {
  return launch_step<true>(p, stream);
}

cudaError_t launch_step_backward(const StepParams& p, cudaStream_t stream) {
  return launch_step<false>(p, stream);
}

cudaError_t launch_philox_uint32(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                                 int64_t t_stride, int64_t B, int64_t numel, int64_t* out,
                                 cudaStream_t stream) {
  if (B == 0 || numel == 0) return cudaSuccess;
  const int64_t units = B * ((numel + 3) / 4);
  static int per_sm = 0;
  fd_philox_uint32<<<grid_for(fd_philox_uint32, units, &per_sm), THREADS, 0, stream>>>(
      seeds, seeds_stride, t, t_stride, B, numel, out);
  return cudaGetLastError();
}

}  // namespace fused_ddpm
