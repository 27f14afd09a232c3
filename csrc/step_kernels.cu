// The CUDA kernels of the fused step (docs/kernels.md). Pure CUDA: compiles with nvcc alone
// (.ci/nvcc_check.sh, .ci/sass_budget.py); the torch binding is step_cuda.cpp.
//
// Geometry. Blocks walk the samples along grid.y (b = blockIdx.y, += gridDim.y), so all of a
// sample's scalars (table row, clip and guidance factors, seed, Philox key schedule, base
// pointers) are loaded once per sample; along grid.x a grid-stride loop walks the sample's
// tiles with 32-bit offsets (the IDX64 instantiations serve samples of >= 2^31 elements).
//  * Contiguous layout, and every launch without in-kernel noise (those do not depend on the
//    layout): a tile is E consecutive storage elements, moved with 128-bit accesses when every
//    stream is 16-byte aligned; each group of 4 elements is one Philox call.
//  * channels_last with in-kernel noise: a tile is 4 consecutive positions x all C channels;
//    channel c's 4 elements are the logical elements c S + 4j .. c S + 4j + 3, one Philox
//    call (two when S % 4 != 0).
// Variants (selected by launch_step_forward / _backward with static switches):
//  * LEAN: the step y = Q x + R m (+ S z) (no clip, fixed variance, no guidance, no x̂0
//    output: DDPM/DDIM sampling), every feature fixed at compile time, 16 elements per thread,
//    128-bit accesses only, a sample's partial last tile outside the loop. Their backward:
//    grad x = Q gy, grad m = R gy.
//  * GENERAL: any launch; the features are read at run time (uniform branches), 4 elements per
//    thread, scalar accesses when a stream is misaligned.
//  * NORMAL: philox_normal_kernel (z itself).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "static_switch.h"
#include "step_launch.h"
#include "step_math.h"
#include "step_params.h"

namespace fused_ddpm {
namespace {

constexpr int THREADS = 256;

enum Mode : int { LEAN = 0, GENERAL = 1, NORMAL = 2 };

// philox_normal_kernel as a step: y = 1 * z.
struct NormalFeatures {
  static constexpr int terms = 1 << Col::S;
  static constexpr int clip = Clip::NONE, var = Var::FIXED;
  static constexpr bool guided = false, need_xh = false;
  __device__ static constexpr bool has(int col) { return (terms >> col) & 1; }
};

// ------------------------------------------------------------------------------ elements

template <int KIND> struct Elem;
template <> struct Elem<KIND_F32> {
  using T = float;
  static constexpr int PER_WORD = 1;  // elements per 32-bit word
  static __device__ __forceinline__ float to(T v) { return v; }
  static __device__ __forceinline__ T from(float f) { return f; }
  static __device__ __forceinline__ void unpack(uint32_t w, float* o) { o[0] = __uint_as_float(w); }
  static __device__ __forceinline__ uint32_t pack(const float* i) { return __float_as_uint(i[0]); }
};
template <> struct Elem<KIND_F16> {
  using T = __half;
  static constexpr int PER_WORD = 2;
  static __device__ __forceinline__ float to(T v) { return __half2float(v); }
  static __device__ __forceinline__ T from(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ void unpack(uint32_t w, float* o) {
    __half2 h;
    *reinterpret_cast<uint32_t*>(&h) = w;
    const float2 f = __half22float2(h);
    o[0] = f.x;
    o[1] = f.y;
  }
  static __device__ __forceinline__ uint32_t pack(const float* i) {
    const __half2 h = __floats2half2_rn(i[0], i[1]);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <> struct Elem<KIND_BF16> {
  using T = __nv_bfloat16;
  static constexpr int PER_WORD = 2;
  static __device__ __forceinline__ float to(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T from(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ void unpack(uint32_t w, float* o) {  // bf16 -> f32: a shift
    o[0] = __uint_as_float(w << 16);
    o[1] = __uint_as_float(w & 0xFFFF0000u);
  }
  static __device__ __forceinline__ uint32_t pack(const float* i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(i[0], i[1]);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// A tile: n <= E elements of one sample at storage offsets off + k * step (k < n), holding
// the logical elements i0 + k (i0 % 4 == 0, except channels_last chunks when S % 4 != 0).
// Contiguous tiles have step 1 (STRIDED = false) and are moved with 128-bit accesses when
// VEC (off 16-byte aligned and n == E).
template <typename I>
struct Tile {
  I off, step, i0;
  int n;
};

// Vector accesses of a tile: E elements as 16-byte (uint4) or, for 8-byte tiles, uint2 words.
template <int KIND, int E>
struct TileWords {
  static constexpr int WORDS = E / Elem<KIND>::PER_WORD;  // 32-bit words
  static_assert(WORDS % 4 == 0 || WORDS == 2, "a vector tile is a multiple of 16 bytes, or 8");
};

template <int KIND, int E, bool VEC, bool STRIDED, typename I>
__device__ __forceinline__ void load_tile(const typename Elem<KIND>::T* ptr, const Tile<I>& t,
                                          float* v) {
  using El = Elem<KIND>;
  constexpr int W = El::PER_WORD;
  if (VEC) {
    constexpr int WORDS = TileWords<KIND, E>::WORDS;
    if (WORDS % 4 == 0) {
      const uint4* p4 = reinterpret_cast<const uint4*>(ptr + t.off);
#pragma unroll
      for (int q = 0; q < WORDS / 4; ++q) {
        const uint4 r = p4[q];
        El::unpack(r.x, v + (4 * q) * W);
        El::unpack(r.y, v + (4 * q + 1) * W);
        El::unpack(r.z, v + (4 * q + 2) * W);
        El::unpack(r.w, v + (4 * q + 3) * W);
      }
    } else {
      const uint2 r = *reinterpret_cast<const uint2*>(ptr + t.off);
      El::unpack(r.x, v);
      El::unpack(r.y, v + W);
    }
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k)
      v[k] = (k < t.n) ? El::to(ptr[t.off + (STRIDED ? k * t.step : k)]) : 0.0f;
  }
}

template <int KIND, int E, bool VEC, bool STRIDED, typename I>
__device__ __forceinline__ void store_tile(typename Elem<KIND>::T* ptr, const Tile<I>& t,
                                           const float* v) {
  using El = Elem<KIND>;
  constexpr int W = El::PER_WORD;
  if (VEC) {
    constexpr int WORDS = TileWords<KIND, E>::WORDS;
    if (WORDS % 4 == 0) {
      uint4* p4 = reinterpret_cast<uint4*>(ptr + t.off);
#pragma unroll
      for (int q = 0; q < WORDS / 4; ++q)
        p4[q] = make_uint4(El::pack(v + (4 * q) * W), El::pack(v + (4 * q + 1) * W),
                           El::pack(v + (4 * q + 2) * W), El::pack(v + (4 * q + 3) * W));
    } else {
      *reinterpret_cast<uint2*>(ptr + t.off) = make_uint2(El::pack(v), El::pack(v + W));
    }
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k)
      if (k < t.n) ptr[t.off + (STRIDED ? k * t.step : k)] = El::from(v[k]);
  }
}

// ------------------------------------------------------------------------------ per sample

// Which streams a forward launch reads (F: its features).
template <typename F> __device__ __forceinline__ bool reads_x(const F& f) {
  return f.has(Col::Q) || (f.need_xh && f.has(Col::U));
}
template <typename F> __device__ __forceinline__ bool reads_m(const F& f) {
  return f.has(Col::R) || (f.need_xh && f.has(Col::W));
}
template <typename F> __device__ __forceinline__ bool reads_z(const F& f) {
  return f.has(Col::S) || (f.need_xh && f.has(Col::E));
}

// Everything of sample b a kernel needs besides the per-element values.
template <int KIND>
struct Sample {
  using T = typename Elem<KIND>::T;
  SampleCoef<float> k;
  const T* in[NUM_IN];  // element 0 of this sample, per stream (nullptr: absent)
  T* out[NUM_OUT];
  const T* gy;          // backward
  const T* g0;
  T* grad[NUM_IN];
  uint32_t t, k0, k1;   // Philox counter word 2 and key
};

template <typename T>
__device__ __forceinline__ T* sample_ptr(const Stream& s, int64_t b) {
  return s.data ? static_cast<T*>(s.data) + b * s.batch_stride : nullptr;
}

template <int KIND, int MODE, bool BACKWARD>
__device__ __forceinline__ Sample<KIND> load_sample(const StepParams& p, int64_t b) {
  using T = typename Elem<KIND>::T;
  Sample<KIND> s;
  if (MODE == NORMAL) {
    s.k.c[Col::S] = 1.0f;
  } else {
    s.k = sample_coef<float>(p, b);
  }
#pragma unroll
  for (int i = 0; i < NUM_IN; ++i) s.in[i] = sample_ptr<const T>(p.in[i], b);
  if (BACKWARD) {
    s.gy = sample_ptr<const T>(p.grad_y, b);
    s.g0 = sample_ptr<const T>(p.grad_x0, b);
#pragma unroll
    for (int i = 0; i < NUM_IN; ++i) s.grad[i] = sample_ptr<T>(p.grad[i], b);
  } else {
#pragma unroll
    for (int i = 0; i < NUM_OUT; ++i) s.out[i] = sample_ptr<T>(p.out[i], b);
  }
  s.t = static_cast<uint32_t>(p.t.data[b * p.t.stride]);
  const uint64_t seed = p.seeds.data ? static_cast<uint64_t>(p.seeds.data[b * p.seeds.stride]) : 0;
  s.k0 = static_cast<uint32_t>(seed);
  s.k1 = static_cast<uint32_t>(seed >> 32);
  return s;
}

// The four normals of Philox group g of the sample.
template <int KIND>
__device__ __forceinline__ void group_normals(const Sample<KIND>& s, uint64_t g, uint32_t stream,
                                              float* z) {
  const U32x4 o = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), s.t,
                                stream, s.k0, s.k1);
  box_muller_fast(o.v[0], o.v[1], z[0], z[1]);
  box_muller_fast(o.v[2], o.v[3], z[2], z[3]);
}

// The normals of a tile's logical elements i0 .. i0 + E - 1. A 4-element channels_last chunk
// starts off a Philox group boundary when S % 4 != 0 (ALIGNED = false: GENERAL kernels
// only); that offset is the same for every thread of a warp (same sample and channel), so
// the branch does not diverge.
template <int KIND, int E, bool ALIGNED, typename I>
__device__ __forceinline__ void tile_normals(const Sample<KIND>& s, I i0, uint32_t stream,
                                             float* z) {
#pragma unroll
  for (int q = 0; q < E / 4; ++q)
    group_normals(s, static_cast<uint64_t>(i0 >> 2) + q, stream, z + 4 * q);
  if (!ALIGNED) {
    const int off = static_cast<int>(i0 & 3);
    if (off != 0) {
      float z2[4];
      group_normals(s, static_cast<uint64_t>(i0 >> 2) + 1, stream, z2);
      const float all[8] = {z[0], z[1], z[2], z[3], z2[0], z2[1], z2[2], z2[3]};
#pragma unroll
      for (int q = 0; q < 4; ++q)
        z[q] = off == 1 ? all[q + 1] : (off == 2 ? all[q + 2] : all[q + 3]);
    }
  }
}

// ------------------------------------------------------------------------------ tiles

template <int KIND, int NZ, int E, bool VEC, bool STRIDED, bool ALIGNED, typename F, typename I>
__device__ __forceinline__ void forward_tile(const StepParams& p, const F& f,
                                             const Sample<KIND>& s, const Tile<I>& t) {
  float x[E], M[E], MC[E], v[E], z[E], h[E];
#pragma unroll
  for (int k = 0; k < E; ++k) x[k] = M[k] = MC[k] = v[k] = z[k] = h[k] = 0.0f;
  if (reads_x(f)) load_tile<KIND, E, VEC, STRIDED>(s.in[In::X], t, x);
  if (reads_m(f)) {
    load_tile<KIND, E, VEC, STRIDED>(s.in[In::M], t, M);
    if (f.guided) load_tile<KIND, E, VEC, STRIDED>(s.in[In::MC], t, MC);
  }
  if (f.var != Var::FIXED && f.has(Col::S)) load_tile<KIND, E, VEC, STRIDED>(s.in[In::V], t, v);
  if (f.has(Col::H)) load_tile<KIND, E, VEC, STRIDED>(s.in[In::H], t, h);
  if (reads_z(f)) {
    if (NZ == NZ_EXTERNAL) load_tile<KIND, E, VEC, STRIDED>(s.in[In::Z], t, z);
    if (NZ == NZ_PHILOX || NZ == NZ_PHILOX_CL)
      tile_normals<KIND, E, ALIGNED>(s, t.i0, p.noise_stream, z);
  }
  float y[E], xh[E];
#pragma unroll
  for (int k = 0; k < E; ++k) {
    xh[k] = 0.0f;
    const float m = model_m(f, s.k, M[k], MC[k]);
    y[k] = step_forward_elem(f, s.k, x[k], m, v[k], z[k], h[k], &xh[k]);
  }
  store_tile<KIND, E, VEC, STRIDED>(s.out[Out::Y], t, y);
  if (f.need_xh && s.out[Out::X0] != nullptr)
    store_tile<KIND, E, VEC, STRIDED>(s.out[Out::X0], t, xh);
}

template <int KIND, int NZ, int E, bool VEC, bool STRIDED, bool ALIGNED, typename I>
__device__ __forceinline__ void backward_tile(const StepParams& p, const RuntimeFeatures& f,
                                              const Sample<KIND>& s, const Tile<I>& t) {
  const BackwardReads reads =
      backward_reads(f, s.grad[In::V] != nullptr, s.grad[In::Z] != nullptr);
  float gy[E], g0[E], x[E], M[E], MC[E], v[E], z[E];
#pragma unroll
  for (int k = 0; k < E; ++k) gy[k] = g0[k] = x[k] = M[k] = MC[k] = v[k] = z[k] = 0.0f;
  load_tile<KIND, E, VEC, STRIDED>(s.gy, t, gy);
  if (s.g0 != nullptr) load_tile<KIND, E, VEC, STRIDED>(s.g0, t, g0);
  if (reads.x) load_tile<KIND, E, VEC, STRIDED>(s.in[In::X], t, x);
  if (reads.m) {
    load_tile<KIND, E, VEC, STRIDED>(s.in[In::M], t, M);
    if (f.guided) load_tile<KIND, E, VEC, STRIDED>(s.in[In::MC], t, MC);
  }
  if (reads.v) load_tile<KIND, E, VEC, STRIDED>(s.in[In::V], t, v);
  if (reads.z) {
    if (NZ == NZ_EXTERNAL) load_tile<KIND, E, VEC, STRIDED>(s.in[In::Z], t, z);
    if (NZ == NZ_PHILOX || NZ == NZ_PHILOX_CL)
      tile_normals<KIND, E, ALIGNED>(s, t.i0, p.noise_stream, z);
  }
  float gx[E], gM[E], gMC[E], gv[E], gz[E], gh[E];
  const float ga = f.guided ? s.k.ga : 1.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const float m = model_m(f, s.k, M[k], MC[k]);
    const ElemGrads<float> g = step_backward_elem(f, s.k, gy[k], g0[k], x[k], m, v[k], z[k]);
    gx[k] = g.x;
    gM[k] = g.m * ga;
    gMC[k] = g.m * s.k.gb;
    gv[k] = g.v;
    gz[k] = g.z;
    gh[k] = g.h;
  }
  const float* vals[NUM_IN] = {gx, gM, gMC, gv, gz, gh};
#pragma unroll
  for (int i = 0; i < NUM_IN; ++i)
    if (s.grad[i] != nullptr) store_tile<KIND, E, VEC, STRIDED>(s.grad[i], t, vals[i]);
}

// grad x = Q gy, grad m = R gy: the backward of the lean step.
template <int KIND, int E, bool VEC, typename I>
__device__ __forceinline__ void backward_tile_lean(const Sample<KIND>& s, const Tile<I>& t) {
  float gy[E], gx[E], gm[E];
  load_tile<KIND, E, VEC, false>(s.gy, t, gy);
#pragma unroll
  for (int k = 0; k < E; ++k) {
    gx[k] = s.k.c[Col::Q] * gy[k];
    gm[k] = s.k.c[Col::R] * gy[k];
  }
  store_tile<KIND, E, VEC, false>(s.grad[In::X], t, gx);
  store_tile<KIND, E, VEC, false>(s.grad[In::M], t, gm);
}

// ------------------------------------------------------------------------------ walks

// Calls full(j) for every full tile j of a sample with `count` elements (positions) in the
// grid-stride loop (the main path), then part(j, n) for a partial last tile, by one thread.
template <int E, typename I, typename Full, typename Part>
__device__ __forceinline__ void walk_tiles(I count, Full&& full, Part&& part) {
  const I nfull = count / E, rest = count % E;
  const I first = static_cast<I>(blockIdx.x) * THREADS + static_cast<I>(threadIdx.x);
  const I stride = static_cast<I>(gridDim.x) * THREADS;
  for (I j = first; j < nfull; j += stride) full(j);
  if (rest != 0 && first == nfull % stride) part(nfull, static_cast<int>(rest));
}

// Contiguous tile j of E elements (n valid).
template <int E, typename I>
__device__ __forceinline__ Tile<I> flat_tile(I j, int n) {
  Tile<I> t;
  t.off = j * E;
  t.step = 1;
  t.i0 = j * E;
  t.n = n;
  return t;
}

// channels_last: channel c of positions 4j .. 4j + np - 1.
template <typename I>
__device__ __forceinline__ Tile<I> cl_chunk(I j, I c, I C, I S, int np) {
  Tile<I> t;
  t.off = 4 * j * C + c;
  t.step = C;
  t.i0 = c * S + 4 * j;
  t.n = np;
  return t;
}

template <typename F>
struct FeaturesOf {
  static __device__ __forceinline__ F get(const StepParams&) { return F(); }
};
template <>
struct FeaturesOf<RuntimeFeatures> {
  static __device__ __forceinline__ RuntimeFeatures get(const StepParams& p) {
    return runtime_features(p);
  }
};

template <int MODE, int NZ>
struct FwdFeatures {
  using type = RuntimeFeatures;
};
template <int NZ>
struct FwdFeatures<LEAN, NZ> {
  using type = LeanFeatures<NZ != NZ_NONE>;
};
template <int NZ>
struct FwdFeatures<NORMAL, NZ> {
  using type = NormalFeatures;
};

template <bool IDX64>
using Index = typename std::conditional<IDX64, int64_t, uint32_t>::type;

// ------------------------------------------------------------------------------ kernels

// Register budget: LEAN kernels stay small by themselves; without a minimum of resident
// blocks ptxas picked an occupancy target for the GENERAL ones that made it spill.
template <int KIND, int NZ, int MODE, bool IDX64>
__global__ void __launch_bounds__(THREADS, 1)
    fd_step_forward(const __grid_constant__ StepParams p, const bool vec) {
  using F = typename FwdFeatures<MODE, NZ>::type;
  using I = Index<IDX64>;
  constexpr int E = MODE == LEAN ? 16 : 4;
  const F f = FeaturesOf<F>::get(p);
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const Sample<KIND> s = load_sample<KIND, MODE, false>(p, b);
    if (NZ == NZ_PHILOX_CL) {
      // LEAN launches have S % 4 == 0: every chunk starts a Philox group
      constexpr bool ALIGNED = MODE == LEAN;
      const I C = static_cast<I>(p.C), S = static_cast<I>(p.S);
      auto cl = [&](I j, int np) {
#pragma unroll 1
        for (I c = 0; c < C; ++c)
          forward_tile<KIND, NZ, 4, false, true, ALIGNED>(p, f, s, cl_chunk<I>(j, c, C, S, np));
      };
      walk_tiles<4, I>(S, [&](I j) { cl(j, 4); }, cl);
    } else {
      auto part = [&](I j, int n) {
        forward_tile<KIND, NZ, E, false, false, true>(p, f, s, flat_tile<E>(j, n));
      };
      if (MODE == LEAN || vec) {
        walk_tiles<E, I>(static_cast<I>(p.N), [&](I j) {
          forward_tile<KIND, NZ, E, true, false, true>(p, f, s, flat_tile<E>(j, E));
        }, part);
      } else {
        walk_tiles<E, I>(static_cast<I>(p.N), [&](I j) {
          forward_tile<KIND, NZ, E, false, false, true>(p, f, s, flat_tile<E>(j, E));
        }, part);
      }
    }
  }
}

template <int KIND, int NZ, int MODE, bool IDX64>
__global__ void __launch_bounds__(THREADS, 1)
    fd_step_backward(const __grid_constant__ StepParams p, const bool vec) {
  using I = Index<IDX64>;
  constexpr int E = MODE == LEAN ? 16 : 4;
  const RuntimeFeatures f = FeaturesOf<RuntimeFeatures>::get(p);
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const Sample<KIND> s = load_sample<KIND, MODE, true>(p, b);
    if (MODE == LEAN) {
      walk_tiles<E, I>(static_cast<I>(p.N),
                       [&](I j) { backward_tile_lean<KIND, E, true>(s, flat_tile<E>(j, E)); },
                       [&](I j, int n) {
                         backward_tile_lean<KIND, E, false>(s, flat_tile<E>(j, n));
                       });
    } else if (NZ == NZ_PHILOX_CL) {
      const I C = static_cast<I>(p.C), S = static_cast<I>(p.S);
      auto cl = [&](I j, int np) {
#pragma unroll 1
        for (I c = 0; c < C; ++c)
          backward_tile<KIND, NZ, 4, false, true, false>(p, f, s, cl_chunk<I>(j, c, C, S, np));
      };
      walk_tiles<4, I>(S, [&](I j) { cl(j, 4); }, cl);
    } else {
      auto part = [&](I j, int n) {
        backward_tile<KIND, NZ, E, false, false, true>(p, f, s, flat_tile<E>(j, n));
      };
      if (vec) {
        walk_tiles<E, I>(static_cast<I>(p.N), [&](I j) {
          backward_tile<KIND, NZ, E, true, false, true>(p, f, s, flat_tile<E>(j, E));
        }, part);
      } else {
        walk_tiles<E, I>(static_cast<I>(p.N), [&](I j) {
          backward_tile<KIND, NZ, E, false, false, true>(p, f, s, flat_tile<E>(j, E));
        }, part);
      }
    }
  }
}

__global__ void __launch_bounds__(THREADS)
    fd_philox_uint32(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                     int64_t t_stride, uint32_t stream, int64_t B, int64_t numel, int64_t* out) {
  const int64_t G = (numel + 3) / 4;
  const int64_t total = B * G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / G, g = idx - b * G;
    const U32x4 r = philox_group(static_cast<uint64_t>(g), static_cast<uint32_t>(t[b * t_stride]),
                                 stream, static_cast<uint64_t>(seeds[b * seeds_stride]));
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

// Resident blocks per SM of `kernel` (cached per instantiation by the caller).
template <typename K>
int blocks_per_sm(K kernel, int* cache) {
  if (*cache <= 0) {
    int nb = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, THREADS, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // a fallback size, not a launch failure
      nb = 4;
    }
    *cache = nb < 1 ? 4 : nb;
  }
  return *cache;
}

// Grid: samples along y (at most 65535; the kernels loop over the rest), and along x enough
// blocks for every tile of a sample, capped so that the whole grid is resident at once.
dim3 step_grid(int64_t B, int64_t tiles_per_sample, int per_sm) {
  const int64_t gy = B < 65535 ? B : 65535;
  const int64_t cap = static_cast<int64_t>(per_sm) * sm_count();
  int64_t gx = (tiles_per_sample + THREADS - 1) / THREADS;
  const int64_t room = cap / gy > 1 ? cap / gy : 1;
  gx = gx < room ? gx : room;
  return dim3(static_cast<unsigned>(gx < 1 ? 1 : gx), static_cast<unsigned>(gy < 1 ? 1 : gy), 1);
}

bool aligned16(const Stream& s, int64_t elem_size, int64_t B) {
  if (s.data == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(s.data) % 16 != 0) return false;
  return B <= 1 || (s.batch_stride * elem_size) % 16 == 0;
}

// Every stream 16-byte aligned at every sample: the 128-bit path can be used.
bool streams_aligned(const StepParams& p) {
  const int64_t es = p.kind == KIND_F32 ? 4 : 2;
  bool ok = aligned16(p.grad_y, es, p.B) && aligned16(p.grad_x0, es, p.B);
  for (int i = 0; i < NUM_IN; ++i)
    ok = ok && aligned16(p.in[i], es, p.B) && aligned16(p.grad[i], es, p.B);
  for (int i = 0; i < NUM_OUT; ++i) ok = ok && aligned16(p.out[i], es, p.B);
  return ok;
}

template <typename K>
cudaError_t launch(K kernel, int* per_sm, const StepParams& p, int64_t tiles, bool vec,
                   cudaStream_t stream) {
  kernel<<<step_grid(p.B, tiles, blocks_per_sm(kernel, per_sm)), THREADS, 0, stream>>>(p, vec);
  return cudaGetLastError();
}

// Tiles per sample of a variant (channels_last noise: groups of 4 positions).
int64_t tiles_of(const StepParams& p, int nz, int e) {
  if (nz == NZ_PHILOX_CL) return (p.S + 3) / 4;
  return (p.N + e - 1) / e;
}

template <bool FWD, int KIND, int NZ, int MODE, bool IDX64>
cudaError_t launch_variant(const StepParams& p, bool vec, cudaStream_t stream) {
  static int per_sm = 0;  // one per instantiation
  const int e = MODE == LEAN ? 16 : 4;
  if constexpr (FWD) {
    return launch(fd_step_forward<KIND, NZ, MODE, IDX64>, &per_sm, p, tiles_of(p, NZ, e), vec,
                  stream);
  } else {
    return launch(fd_step_backward<KIND, NZ, MODE, IDX64>, &per_sm, p, tiles_of(p, NZ, e), vec,
                  stream);
  }
}

// Variant selection: dtype, noise source, mode, index width. LEAN needs aligned streams and
// 32-bit offsets; its channels_last noise needs S % 4 == 0 (every channel's chunk of 4
// positions is one Philox group); its backward reads no noise.
template <bool FWD>
cudaError_t launch_step(const StepParams& p, int nz, bool lean, cudaStream_t stream) {
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  const bool vec = streams_aligned(p);
  const bool idx64 = p.N >= (int64_t(1) << 31);
  lean = lean && vec && !idx64 && (nz != NZ_PHILOX_CL || p.S % 4 == 0);
  cudaError_t err = cudaErrorInvalidValue;
  const bool known = FD_GPU_KIND_SWITCH(p.kind, KIND, [&] {
    if constexpr (!FWD) {
      if (lean) {
        err = launch_variant<FWD, KIND, NZ_NONE, LEAN, false>(p, vec, stream);
        return true;
      }
    }
    return FD_NOISE_SWITCH(nz, NZ, [&] {
      if constexpr (FWD) {
        if (lean) {
          err = launch_variant<FWD, KIND, NZ, LEAN, false>(p, vec, stream);
          return true;
        }
      }
      return FD_BOOL_SWITCH(idx64, IDX64, [&] {
        err = launch_variant<FWD, KIND, NZ, GENERAL, IDX64>(p, vec, stream);
        return true;
      });
    });
  });
  return known ? err : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_step_forward(const StepParams& p, cudaStream_t stream) {
  bool noise = false;
  return launch_step<true>(p, noise_src(p.noise, p.layout), is_lean_forward(p, &noise), stream);
}

cudaError_t launch_step_backward(const StepParams& p, cudaStream_t stream) {
  // z is read (or regenerated) only for a clipped E term or a variance gradient.
  const bool need_z = backward_reads(runtime_features(p), p.grad[In::V].data != nullptr,
                                     p.grad[In::Z].data != nullptr).z;
  const int nz = need_z ? noise_src(p.noise, p.layout)
                        : (p.noise == Noise::EXTERNAL ? NZ_EXTERNAL : NZ_NONE);
  return launch_step<false>(p, nz, is_lean_backward(p), stream);
}

cudaError_t launch_philox_normal(const StepParams& p, const Stream& out, cudaStream_t stream) {
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  StepParams q = p;
  q.out[Out::Y] = out;
  const bool vec = streams_aligned(q);
  const bool idx64 = q.N >= (int64_t(1) << 31);
  const int nz = noise_src(Noise::PHILOX, q.layout);
  cudaError_t err = cudaErrorInvalidValue;
  const bool known = FD_GPU_KIND_SWITCH(q.kind, KIND, [&] {
    return FD_BOOL_SWITCH(nz == NZ_PHILOX_CL, CL, [&] {
      return FD_BOOL_SWITCH(idx64, IDX64, [&] {
        constexpr int NZ = CL ? NZ_PHILOX_CL : NZ_PHILOX;
        err = launch_variant<true, KIND, NZ, NORMAL, IDX64>(q, vec, stream);
        return true;
      });
    });
  });
  return known ? err : cudaErrorInvalidValue;
}

cudaError_t launch_philox_uint32(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                                 int64_t t_stride, uint32_t noise_stream, int64_t B,
                                 int64_t numel, int64_t* out, cudaStream_t stream) {
  if (B == 0 || numel == 0) return cudaSuccess;
  static int per_sm = 0;
  const int64_t units = B * ((numel + 3) / 4);
  const int64_t cap = static_cast<int64_t>(blocks_per_sm(fd_philox_uint32, &per_sm)) * sm_count();
  int64_t grid = (units + THREADS - 1) / THREADS;
  grid = grid < cap ? grid : cap;
  fd_philox_uint32<<<static_cast<unsigned>(grid < 1 ? 1 : grid), THREADS, 0, stream>>>(
      seeds, seeds_stride, t, t_stride, noise_stream, B, numel, out);
  return cudaGetLastError();
}

}  // namespace fused_ddpm
