// The C++ CPU kernels of the fused step (docs/kernels.md).
//
// Work is split with at::parallel_for over blocks: a block is a storage range of one sample,
// BLOCK elements (or, channels_last with in-kernel noise, whole positions: P positions x C
// channels, so that each channel's noise is P consecutive logical elements). Per block the
// noise is generated first (noise_cpu.cpp, vectorised), then one loop over the block applies
// the per-element math of step_math.h. The hot step (no clip, fixed variance, y = Q x + R m
// + S z) and its backward have their own loops reading and writing the tensors' dtype
// directly; everything else goes through compute-type buffers (float; double for fp64) and
// the runtime-feature loop, which the compiler unswitches on the launch's features.
#include "step_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "noise_cpu.h"
#include "static_switch.h"
#include "step_cpu_simd.h"
#include "step_math.h"

namespace fused_ddpm {
namespace {

constexpr int64_t BLOCK = 1024;  // storage elements per block (a multiple of 4)
// Elements per parallel task at least: smaller steps run on one thread, since waking
// threads costs more than the work (and stalls whole steps on a busy machine).
constexpr int64_t PARALLEL_GRAIN = 1 << 16;

template <typename T>
using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// ------------------------------------------------------------------------------ blocks

struct Blocks {
  int64_t len;         // storage elements per block (the last one of a sample may be shorter)
  int64_t per_sample;  // blocks per sample
  Blocks(const StepParams& p, bool cl_noise) {
    if (cl_noise) {
      const int64_t P = std::max<int64_t>(4, (BLOCK / std::max<int64_t>(p.C, 1)) & ~int64_t(3));
      len = P * p.C;
    } else {
      len = BLOCK;
    }
    per_sample = p.N ? (p.N + len - 1) / len : 0;
  }
};

// Runs body(b, s0, n, scratch) over every block, in parallel; scratch = make_scratch(), one
// per task.
template <typename MakeScratch, typename Body>
void for_each_block(const StepParams& p, const Blocks& bl, MakeScratch&& make_scratch,
                    Body&& body) {
  const int64_t total = p.B * bl.per_sample;
  at::parallel_for(0, total, std::max<int64_t>(1, PARALLEL_GRAIN / bl.len),
                   [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / bl.per_sample, s0 = (idx - b * bl.per_sample) * bl.len;
      body(b, s0, std::min(bl.len, p.N - s0), scratch);
    }
  });
}

// In-kernel normals of storage range [s0, s0 + n) of sample b into z[0 .. n) (z holds n + 4).
// s0 is a multiple of 4 (contiguous) or of C (channels_last, n a multiple of C).
void block_noise(const StepParams& p, int64_t b, int64_t s0, int64_t n, float* z,
                 std::vector<float>& tmp) {
  const uint64_t seed = static_cast<uint64_t>(p.seeds.data[b * p.seeds.stride]);
  const uint32_t t = static_cast<uint32_t>(p.t.data[b * p.t.stride]);
  if (p.layout == Layout::CONTIGUOUS) {
    philox_normals(seed, t, p.noise_stream, static_cast<uint64_t>(s0 / 4), (n + 3) / 4, z);
    return;
  }
  // storage s = pos C + c  <->  logical i = c S + pos
  const int64_t C = p.C, pos0 = s0 / C, np = n / C;
  tmp.resize(np);
  for (int64_t c = 0; c < C; ++c) {
    philox_normals_range(seed, t, p.noise_stream, c * p.S + pos0, np, tmp.data());
    for (int64_t k = 0; k < np; ++k) z[k * C + c] = tmp[k];
  }
}

template <typename T>
T* at_sample(const Stream& s, int64_t b, int64_t s0) {
  return s.data ? static_cast<T*>(s.data) + b * s.batch_stride + s0 : nullptr;
}

// Stream s of block (b, s0, n) as compute-type values: the data itself when T is the compute
// type, else converted into buf; an absent stream reads as zeros.
template <typename T, typename A>
const A* load_block(const Stream& s, int64_t b, int64_t s0, int64_t n, A* buf, const A* zeros) {
  const T* src = at_sample<const T>(s, b, s0);
  if (src == nullptr) return zeros;
  if (std::is_same<T, A>::value) return reinterpret_cast<const A*>(src);
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(src[j]);
  return buf;
}

// Where a block's values of output stream s go: straight into the tensor when T is the
// compute type, else into buf (then store_block); an absent stream into scratch.
template <typename T, typename A>
A* out_block(const Stream& s, int64_t b, int64_t s0, A* buf, A* scratch) {
  T* dst = at_sample<T>(s, b, s0);
  if (dst == nullptr) return scratch;
  if (std::is_same<T, A>::value) return reinterpret_cast<A*>(dst);
  return buf;
}

template <typename T, typename A>
void store_block(const Stream& s, int64_t b, int64_t s0, int64_t n, const A* buf) {
  T* dst = at_sample<T>(s, b, s0);
  if (dst == nullptr || std::is_same<T, A>::value) return;
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(buf[j]);
}

// Per-thread block buffers of the general loops.
template <typename A>
struct Scratch {
  std::vector<A> v;
  std::vector<float> zf, tmp;
  int64_t len;
  Scratch(int64_t len_, int nbuf) : v(static_cast<size_t>(len_) * nbuf, A(0)), zf(len_ + 4),
                                    len(len_) {}
  A* buf(int i) { return v.data() + static_cast<size_t>(i) * len; }
};

// The launch's features with the variance mode fixed at compile time (it decides whether
// the loop calls sqrt / exp).
template <int VAR>
struct CpuFeatures : RuntimeFeatures {
  static constexpr int var = VAR;
  explicit CpuFeatures(const RuntimeFeatures& rf) : RuntimeFeatures(rf) {}
};

RuntimeFeatures runtime_features(const StepParams& p) {
  RuntimeFeatures rf;
  rf.terms = p.terms;
  rf.clip = p.clip;
  rf.var = p.var;
  rf.guided = p.guided;
  rf.need_xh = p.need_xh;
  return rf;
}

// The z of a block as compute-type values: in-kernel normals, the Z stream, or zeros.
template <typename T, typename A>
const A* block_z(const StepParams& p, int64_t b, int64_t s0, int64_t n, Scratch<A>& w,
                 int zbuf, const A* zeros) {
  if (p.noise == Noise::EXTERNAL) return load_block<T, A>(p.in[In::Z], b, s0, n, w.buf(zbuf), zeros);
  if (p.noise != Noise::PHILOX) return zeros;
  block_noise(p, b, s0, n, w.zf.data(), w.tmp);
  if (std::is_same<A, float>::value) return reinterpret_cast<const A*>(w.zf.data());
  A* z = w.buf(zbuf);
  for (int64_t j = 0; j < n; ++j) z[j] = static_cast<A>(w.zf[j]);
  return z;
}

// ------------------------------------------------------------------------------ forward

// ------------------------------------------------------------------------------ lean loops
// The lean step y = Q x + R m (+ S z) and its backward, per block. The generic loop is the
// baseline; on x86 with AVX-512 or AVX2 + F16C (cpu_isa_level(), the choice of the noise
// path) explicit vector loops convert fp16 / bf16 in registers. They compute the same
// operations in the same order (no FMA), and a block's partial last vector goes through the
// vector code via a padded copy, so every element gets the same bits.

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
// W elements of T <-> W floats in a vector (V: __m512 with W = 16, __m256 with W = 8).
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
  // round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's conversion)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
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
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0),
                         _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
FD_AVX2 inline void vstore8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

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

// y = Q x + R m (+ S z): the step of the benchmarks and of most samplers.
template <typename T, bool NOISE>
void forward_lean(const StepParams& p) {
  using A = AccOf<T>;
  const Blocks bl(p, NOISE && p.noise == Noise::PHILOX && p.layout == Layout::CHANNELS_LAST);
  auto scratch = [&] { return Scratch<A>(bl.len, 0); };
  for_each_block(p, bl, scratch, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>& w) {
    const SampleCoef<A> k = sample_coef<A>(p, b);
    const T* x = at_sample<const T>(p.in[In::X], b, s0);
    const T* m = at_sample<const T>(p.in[In::M], b, s0);
    T* y = at_sample<T>(p.out[Out::Y], b, s0);
    if (NOISE && p.noise == Noise::EXTERNAL) {
      lean_forward_block<T, T>(x, m, at_sample<const T>(p.in[In::Z], b, s0), y, n, k);
    } else if (NOISE) {
      block_noise(p, b, s0, n, w.zf.data(), w.tmp);
      lean_forward_block<T, float>(x, m, w.zf.data(), y, n, k);
    } else {
      lean_forward_block<T, void>(x, m, nullptr, y, n, k);
    }
  });
}

template <typename T, int VAR>
void forward_general(const StepParams& p) {
  using A = AccOf<T>;
  const Blocks bl(p, p.noise == Noise::PHILOX && p.layout == Layout::CHANNELS_LAST);
  const CpuFeatures<VAR> f(runtime_features(p));
  enum { BX, BM, BMC, BV, BZ, BH, BY, BXH, BZERO, NBUF };
  auto scratch = [&] { return Scratch<A>(bl.len, NBUF); };
  for_each_block(p, bl, scratch, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>& w) {
    const A* zeros = w.buf(BZERO);
    const SampleCoef<A> k = sample_coef<A>(p, b);
    const A* x = load_block<T, A>(p.in[In::X], b, s0, n, w.buf(BX), zeros);
    const A* M = load_block<T, A>(p.in[In::M], b, s0, n, w.buf(BM), zeros);
    const A* MC = load_block<T, A>(p.in[In::MC], b, s0, n, w.buf(BMC), zeros);
    const A* v = load_block<T, A>(p.in[In::V], b, s0, n, w.buf(BV), zeros);
    const A* h = load_block<T, A>(p.in[In::H], b, s0, n, w.buf(BH), zeros);
    const A* z = block_z<T, A>(p, b, s0, n, w, BZ, zeros);
    A* y = out_block<T, A>(p.out[Out::Y], b, s0, w.buf(BY), w.buf(BY));
    A* xh = out_block<T, A>(p.out[Out::X0], b, s0, w.buf(BXH), w.buf(BXH));
    for (int64_t j = 0; j < n; ++j) {
      A xhj = A(0);
      const A mj = model_m(f, k, M[j], MC[j]);
      y[j] = step_forward_elem(f, k, x[j], mj, v[j], z[j], h[j], &xhj);
      xh[j] = xhj;
    }
    store_block<T, A>(p.out[Out::Y], b, s0, n, y);
    store_block<T, A>(p.out[Out::X0], b, s0, n, xh);
  });
}

// The lean loops apply when the launch is exactly their step.
bool lean_forward(const StepParams& p, bool* noise) {
  const int qr = (1 << Col::Q) | (1 << Col::R);
  *noise = p.noise != Noise::NONE && ((p.terms >> Col::S) & 1);
  const int want = qr | (*noise ? (1 << Col::S) : 0);
  return !p.need_xh && !p.guided && p.var == Var::FIXED && p.out[Out::X0].data == nullptr &&
         (p.terms & (qr | (1 << Col::S) | (1 << Col::H))) == want;
}

template <typename T>
void forward_kind(const StepParams& p) {
  bool noise = false;
  if (lean_forward(p, &noise)) {
    FD_BOOL_SWITCH(noise, NOISE, [&] { forward_lean<T, NOISE>(p); return true; });
    return;
  }
  switch (p.var) {
    case Var::FIXED: return forward_general<T, Var::FIXED>(p);
    case Var::SQRT: return forward_general<T, Var::SQRT>(p);
    case Var::EXP: return forward_general<T, Var::EXP>(p);
  }
  TORCH_CHECK(false, "step_forward_kernel: unsupported variance mode ", p.var);
}

// ------------------------------------------------------------------------------ backward

// grad x = Q gy, grad m = R gy: the backward of the lean step.
template <typename T>
void backward_lean(const StepParams& p) {
  using A = AccOf<T>;
  const Blocks bl(p, false);
  auto no_scratch = [] { return 0; };
  for_each_block(p, bl, no_scratch, [&](int64_t b, int64_t s0, int64_t n, int) {
    const SampleCoef<A> k = sample_coef<A>(p, b);
    lean_backward_block(at_sample<const T>(p.grad_y, b, s0), at_sample<T>(p.grad[In::X], b, s0),
                        at_sample<T>(p.grad[In::M], b, s0), n, k.c[Col::Q], k.c[Col::R]);
  });
}

template <typename T, int VAR>
void backward_general(const StepParams& p) {
  using A = AccOf<T>;
  const RuntimeFeatures rf = runtime_features(p);
  const CpuFeatures<VAR> f(rf);
  // Streams the gradients read (docs/kernels.md, "Backward").
  const bool need_xr = p.need_xh && p.clip != Clip::NONE;
  const bool s_term = rf.has(Col::S) && p.var != Var::FIXED;
  const bool want_v = s_term && p.grad[In::V].data != nullptr;
  const bool need_v = s_term && (want_v || p.grad[In::Z].data != nullptr);
  const bool need_z = (need_xr && rf.has(Col::E)) || want_v;
  const bool need_x = need_xr && rf.has(Col::U);
  const bool need_m = need_xr && rf.has(Col::W);
  const Blocks bl(p, need_z && p.noise == Noise::PHILOX && p.layout == Layout::CHANNELS_LAST);
  enum { BGY, BG0, BX, BM, BMC, BV, BZ, GX, GM, GMC, GV, GZ, GH, BZERO, BSCRATCH, NBUF };
  auto scratch = [&] { return Scratch<A>(bl.len, NBUF); };
  for_each_block(p, bl, scratch, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>& w) {
    const A* zeros = w.buf(BZERO);
    A* unused = w.buf(BSCRATCH);
    const SampleCoef<A> k = sample_coef<A>(p, b);
    const Stream none;
    const A* gy = load_block<T, A>(p.grad_y, b, s0, n, w.buf(BGY), zeros);
    const A* g0 = load_block<T, A>(p.grad_x0, b, s0, n, w.buf(BG0), zeros);
    const A* x = load_block<T, A>(need_x ? p.in[In::X] : none, b, s0, n, w.buf(BX), zeros);
    const A* M = load_block<T, A>(need_m ? p.in[In::M] : none, b, s0, n, w.buf(BM), zeros);
    const A* MC = load_block<T, A>(need_m ? p.in[In::MC] : none, b, s0, n, w.buf(BMC), zeros);
    const A* v = load_block<T, A>(need_v ? p.in[In::V] : none, b, s0, n, w.buf(BV), zeros);
    const A* z = need_z ? block_z<T, A>(p, b, s0, n, w, BZ, zeros) : zeros;
    A* gx = out_block<T, A>(p.grad[In::X], b, s0, w.buf(GX), unused);
    A* gM = out_block<T, A>(p.grad[In::M], b, s0, w.buf(GM), unused);
    A* gMC = out_block<T, A>(p.grad[In::MC], b, s0, w.buf(GMC), unused);
    A* gv = out_block<T, A>(p.grad[In::V], b, s0, w.buf(GV), unused);
    A* gz = out_block<T, A>(p.grad[In::Z], b, s0, w.buf(GZ), unused);
    A* gh = out_block<T, A>(p.grad[In::H], b, s0, w.buf(GH), unused);
    const A ga = f.guided ? k.ga : A(1);
    for (int64_t j = 0; j < n; ++j) {
      const A mj = model_m(f, k, M[j], MC[j]);
      const ElemGrads<A> g = step_backward_elem(f, k, gy[j], g0[j], x[j], mj, v[j], z[j]);
      gx[j] = g.x;
      gM[j] = g.m * ga;
      gMC[j] = g.m * k.gb;
      gv[j] = g.v;
      gz[j] = g.z;
      gh[j] = g.h;
    }
    store_block<T, A>(p.grad[In::X], b, s0, n, gx);
    store_block<T, A>(p.grad[In::M], b, s0, n, gM);
    store_block<T, A>(p.grad[In::MC], b, s0, n, gMC);
    store_block<T, A>(p.grad[In::V], b, s0, n, gv);
    store_block<T, A>(p.grad[In::Z], b, s0, n, gz);
    store_block<T, A>(p.grad[In::H], b, s0, n, gh);
  });
}

bool lean_backward(const StepParams& p) {
  const int qr = (1 << Col::Q) | (1 << Col::R);
  if (p.need_xh || p.guided || p.var != Var::FIXED || (p.terms & qr) != qr) return false;
  if (p.grad[In::X].data == nullptr || p.grad[In::M].data == nullptr) return false;
  for (int i : {In::MC, In::V, In::Z, In::H})
    if (p.grad[i].data != nullptr) return false;
  return true;
}

template <typename T>
void backward_kind(const StepParams& p) {
  if (lean_backward(p)) return backward_lean<T>(p);
  switch (p.var) {
    case Var::FIXED: return backward_general<T, Var::FIXED>(p);
    case Var::SQRT: return backward_general<T, Var::SQRT>(p);
    case Var::EXP: return backward_general<T, Var::EXP>(p);
  }
  TORCH_CHECK(false, "step_backward_kernel: unsupported variance mode ", p.var);
}

// ------------------------------------------------------------------------------ noise ops

template <typename T>
void normal_kind(const StepParams& p, const Stream& out) {
  const Blocks bl(p, p.layout == Layout::CHANNELS_LAST);
  auto scratch = [&] { return Scratch<float>(bl.len, 0); };
  for_each_block(p, bl, scratch, [&](int64_t b, int64_t s0, int64_t n, Scratch<float>& w) {
    block_noise(p, b, s0, n, w.zf.data(), w.tmp);
    T* dst = at_sample<T>(out, b, s0);
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(w.zf[j]);
  });
}

template <typename Fn>
void by_kind(int kind, const char* op, Fn&& fn) {
  switch (kind) {
    case KIND_F32: return fn(float());
    case KIND_F64: return fn(double());
    case KIND_F16: return fn(c10::Half());
    case KIND_BF16: return fn(c10::BFloat16());
  }
  TORCH_CHECK(false, op, ": unsupported dtype kind ", kind);
}

}  // namespace

void step_forward_cpu(const StepParams& p) {
  if (p.B == 0 || p.N == 0) return;
  by_kind(p.kind, "step_forward_kernel", [&](auto t) { forward_kind<decltype(t)>(p); });
}

void step_backward_cpu(const StepParams& p) {
  if (p.B == 0 || p.N == 0) return;
  by_kind(p.kind, "step_backward_kernel", [&](auto t) { backward_kind<decltype(t)>(p); });
}

void philox_normal_cpu(const StepParams& p, const Stream& out) {
  if (p.B == 0 || p.N == 0) return;
  by_kind(p.kind, "philox_normal_kernel", [&](auto t) { normal_kind<decltype(t)>(p, out); });
}

void philox_uint32_cpu(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                       int64_t t_stride, uint32_t stream, int64_t B, int64_t numel,
                       int64_t* out) {
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
        const U32x4 r = philox_group(static_cast<uint64_t>(g), tt, stream, seed);
        for (int k = 0; k < 4; ++k) {
          const int64_t i = 4 * g + k;
          if (i < numel) o[i] = static_cast<int64_t>(r.v[k]);
        }
      }
    }
  });
}

}  // namespace fused_ddpm
