// The C++ CPU kernels of the fused step (docs/kernels.md).
//
// Work is split with at::parallel_for over blocks: a block is a storage range of one sample,
// BLOCK elements (or, channels_last with in-kernel noise, whole positions: P positions x C
// channels, so that each channel's noise is P consecutive logical elements). Per block the
// noise is generated first (noise_cpu.cpp), then one vector loop (step_cpu_loops.h) applies
// the per-element math of step_math.h. The lean step (no clip, fixed variance, no guidance:
// y = Q x + R m + S z) and its backward read and write the tensors' dtype directly; with
// in-kernel noise in the contiguous layout the lean step takes the normals straight from
// registers (NOISE_BLOCK elements per block, no noise buffer). Every other launch goes
// through compute-type buffers (float; double for fp64).
#include "step_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "noise_cpu.h"
#include "static_switch.h"
#include "step_cpu_loops.h"
#include "step_math.h"

namespace fused_ddpm {
namespace {

using cpu::AccOf;

constexpr int64_t BLOCK = 256;  // storage elements per block (a multiple of 4)
// The same for the lean step with in-kernel noise in registers (contiguous layout): no
// buffers, so longer blocks amortise the per-block start of the noise pipeline.
constexpr int64_t NOISE_BLOCK = 1024;
// Elements per parallel task at least: smaller steps run on one thread, since waking
// threads costs more than the work (and stalls whole steps on a busy machine).
constexpr int64_t PARALLEL_GRAIN = 1 << 16;

// ------------------------------------------------------------------------------ blocks

struct Blocks {
  int64_t len;         // storage elements per block (the last one of a sample may be shorter)
  int64_t per_sample;  // blocks per sample
  Blocks(const StepParams& p, bool cl_noise, int64_t block = BLOCK) {
    if (cl_noise) {
      const int64_t P = std::max<int64_t>(4, (block / std::max<int64_t>(p.C, 1)) & ~int64_t(3));
      len = P * p.C;
    } else {
      len = block;
    }
    per_sample = p.N ? (p.N + len - 1) / len : 0;
  }
};

// Per-task block buffers.
template <typename A>
struct Scratch {
  std::vector<A> v;
  std::vector<float> zf, tmp;
  int64_t len;
  Scratch(int64_t len_, int nbuf) : v(static_cast<size_t>(len_) * nbuf, A(0)), zf(len_ + 4),
                                    len(len_) {}
  A* buf(int i) { return v.data() + static_cast<size_t>(i) * len; }
};

// Runs body(b, s0, n, scratch) over every block, in parallel (one Scratch(len, nbuf) per task).
template <typename A, typename Body>
void for_each_block(const StepParams& p, const Blocks& bl, int nbuf, Body&& body) {
  const int64_t total = p.B * bl.per_sample;
  at::parallel_for(0, total, std::max<int64_t>(1, PARALLEL_GRAIN / bl.len),
                   [&](int64_t begin, int64_t end) {
    Scratch<A> scratch(bl.len, nbuf);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / bl.per_sample, s0 = (idx - b * bl.per_sample) * bl.len;
      body(b, s0, std::min(bl.len, p.N - s0), scratch);
    }
  });
}

cpu::NoiseKey noise_key(const StepParams& p, int64_t b) {
  return {static_cast<uint64_t>(p.seeds.data[b * p.seeds.stride]),
          static_cast<uint32_t>(p.t.data[b * p.t.stride]), p.noise_stream};
}

// In-kernel normals of storage range [s0, s0 + n) of sample b into z[0 .. n) (z holds n + 4).
// s0 is a multiple of 4 (contiguous) or of C (channels_last, n a multiple of C).
void block_noise(const StepParams& p, int64_t b, int64_t s0, int64_t n, float* z,
                 std::vector<float>& tmp) {
  const cpu::NoiseKey nk = noise_key(p, b);
  if (p.layout == Layout::CONTIGUOUS) {
    philox_normals(nk.seed, nk.t, nk.stream, static_cast<uint64_t>(s0 / 4), (n + 3) / 4, z);
    return;
  }
  // storage s = pos C + c  <->  logical i = c S + pos
  const int64_t C = p.C, pos0 = s0 / C, np = n / C;
  tmp.resize(np);
  for (int64_t c = 0; c < C; ++c) {
    philox_normals_range(nk.seed, nk.t, nk.stream, c * p.S + pos0, np, tmp.data());
    for (int64_t k = 0; k < np; ++k) z[k * C + c] = tmp[k];
  }
}

template <typename T>
T* at_sample(const Stream& s, int64_t b, int64_t s0) {
  return s.data ? static_cast<T*>(s.data) + b * s.batch_stride + s0 : nullptr;
}

// Asks for n elements at p into the cache ahead of use (write: about to be stored). Issued
// for the next block before a block's noise is generated, so that the memory traffic of the
// next block overlaps the noise arithmetic of this one instead of following it.
template <typename T>
void prefetch(const T* p, int64_t n, bool write) {
  if (p == nullptr) return;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) {
    if (write) __builtin_prefetch(c + off, 1, 2);
    else __builtin_prefetch(c + off, 0, 2);
  }
}

// Stream s of block (b, s0, n) as compute-type values: the data itself when T is the compute
// type, else converted into buf; an absent stream reads as zeros.
template <typename T, typename A>
const A* load_block(const Stream& s, int64_t b, int64_t s0, int64_t n, A* buf, const A* zeros) {
  const T* src = at_sample<const T>(s, b, s0);
  if (src == nullptr) return zeros;
  if constexpr (std::is_same<T, A>::value) {
    return src;
  } else {
    cpu::to_acc(src, buf, n);
    return buf;
  }
}

// A block's values of output stream s, computed into buf, to the tensor.
template <typename T, typename A>
void store_block(const Stream& s, int64_t b, int64_t s0, int64_t n, const A* buf) {
  T* dst = at_sample<T>(s, b, s0);
  if (dst == nullptr) return;
  if constexpr (std::is_same<T, A>::value) {
    std::memcpy(dst, buf, sizeof(A) * n);
  } else {
    cpu::from_acc(buf, dst, n);
  }
}

// The z of a block as compute-type values: in-kernel normals, the Z stream, or zeros.
template <typename T, typename A>
const A* block_z(const StepParams& p, int64_t b, int64_t s0, int64_t n, Scratch<A>& w,
                 int zbuf, const A* zeros) {
  if (p.noise == Noise::EXTERNAL)
    return load_block<T, A>(p.in[In::Z], b, s0, n, w.buf(zbuf), zeros);
  if (p.noise != Noise::PHILOX) return zeros;
  block_noise(p, b, s0, n, w.zf.data(), w.tmp);
  if constexpr (std::is_same<A, float>::value) {
    return w.zf.data();
  } else {
    A* z = w.buf(zbuf);
    for (int64_t j = 0; j < n; ++j) z[j] = static_cast<A>(w.zf[j]);
    return z;
  }
}

// Runs fn(var, xh) with the variance mode and the x̂0 need as std::integral_constants.
template <typename Fn>
void with_var_xh(const StepParams& p, const char* op, Fn&& fn) {
  const bool known = FD_BOOL_SWITCH(p.need_xh, XH, [&] {
    return FD_VAR_SWITCH(p.var, VAR, [&] {
      fn(std::integral_constant<int, VAR>(), std::bool_constant<XH>());
      return true;
    });
  });
  TORCH_CHECK(known, op, ": unsupported variance mode ", p.var);
}

// ------------------------------------------------------------------------------ forward

// y = Q x + R m (+ S z): the step of the benchmarks and of most samplers.
template <typename T, bool NOISE>
void forward_lean(const StepParams& p) {
  using A = AccOf<T>;
  const bool philox = NOISE && p.noise == Noise::PHILOX;
  const bool fused = philox && p.layout == Layout::CONTIGUOUS;
  const Blocks bl(p, philox && p.layout == Layout::CHANNELS_LAST, fused ? NOISE_BLOCK : BLOCK);
  for_each_block<A>(p, bl, 0, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>& w) {
    const SampleCoef<A> k = sample_coef<A>(p, b);
    const T* x = at_sample<const T>(p.in[In::X], b, s0);
    const T* m = at_sample<const T>(p.in[In::M], b, s0);
    T* y = at_sample<T>(p.out[Out::Y], b, s0);
    if (philox && s0 + n < p.N) {
      const int64_t next = std::min(bl.len, p.N - s0 - n);
      prefetch(x + n, next, false);
      prefetch(m + n, next, false);
      prefetch(y + n, next, true);
    }
    if (NOISE && p.noise == Noise::EXTERNAL) {
      cpu::lean_forward_block<T, T>(x, m, at_sample<const T>(p.in[In::Z], b, s0), y, n, k);
    } else if (fused) {
      cpu::lean_forward_philox_block(x, m, y, n, k, noise_key(p, b), static_cast<uint64_t>(s0 / 4),
                                     w.zf.data());
    } else if (NOISE) {
      block_noise(p, b, s0, n, w.zf.data(), w.tmp);
      cpu::lean_forward_block<T, float>(x, m, w.zf.data(), y, n, k);
    } else {
      cpu::lean_forward_block<T, void>(x, m, nullptr, y, n, k);
    }
  });
}

template <typename T>
void forward_general(const StepParams& p) {
  using A = AccOf<T>;
  const Blocks bl(p, p.noise == Noise::PHILOX && p.layout == Layout::CHANNELS_LAST);
  const RuntimeFeatures rf = runtime_features(p);
  enum { BZERO, BY, BXH, BZ, BIN, NBUF = BIN + NUM_IN };
  with_var_xh(p, "step_forward_kernel", [&](auto var, auto xh) {
    for_each_block<A>(p, bl, NBUF, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>& w) {
      const A* zeros = w.buf(BZERO);
      const SampleCoef<A> k = sample_coef<A>(p, b);
      const A* in[NUM_IN];
      for (int i = 0; i < NUM_IN; ++i)
        in[i] = i == In::Z ? zeros : load_block<T, A>(p.in[i], b, s0, n, w.buf(BIN + i), zeros);
      const A* z = block_z<T, A>(p, b, s0, n, w, BZ, zeros);
      A* y = w.buf(BY);
      A* x0 = w.buf(BXH);
      cpu::general_forward_block<A, decltype(var), decltype(xh)>(
          &rf, &k, in[In::X], in[In::M], in[In::MC], in[In::V], in[In::H], z, y, x0, n);
      store_block<T, A>(p.out[Out::Y], b, s0, n, y);
      if (xh) store_block<T, A>(p.out[Out::X0], b, s0, n, x0);
    });
  });
}

template <typename T>
void forward_kind(const StepParams& p) {
  bool noise = false;
  if (is_lean_forward(p, &noise)) {
    FD_BOOL_SWITCH(noise, NOISE, [&] { forward_lean<T, NOISE>(p); return true; });
    return;
  }
  forward_general<T>(p);
}

// ------------------------------------------------------------------------------ backward

// grad x = Q gy, grad m = R gy: the backward of the lean step.
template <typename T>
void backward_lean(const StepParams& p) {
  using A = AccOf<T>;
  const Blocks bl(p, false);
  for_each_block<A>(p, bl, 0, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>&) {
    const SampleCoef<A> k = sample_coef<A>(p, b);
    cpu::lean_backward_block(at_sample<const T>(p.grad_y, b, s0),
                             at_sample<T>(p.grad[In::X], b, s0),
                             at_sample<T>(p.grad[In::M], b, s0), n, k.c[Col::Q], k.c[Col::R]);
  });
}

template <typename T>
void backward_general(const StepParams& p) {
  using A = AccOf<T>;
  const RuntimeFeatures rf = runtime_features(p);
  const BackwardReads reads =
      backward_reads(rf, p.grad[In::V].data != nullptr, p.grad[In::Z].data != nullptr);
  const Blocks bl(p, reads.z && p.noise == Noise::PHILOX && p.layout == Layout::CHANNELS_LAST);
  enum { BGY, BG0, BX, BM, BMC, BV, BZ, BZERO, BGRAD, NBUF = BGRAD + NUM_IN };
  with_var_xh(p, "step_backward_kernel", [&](auto var, auto xh) {
    for_each_block<A>(p, bl, NBUF, [&](int64_t b, int64_t s0, int64_t n, Scratch<A>& w) {
      const A* zeros = w.buf(BZERO);
      const SampleCoef<A> k = sample_coef<A>(p, b);
      const Stream none;
      const A* gy = load_block<T, A>(p.grad_y, b, s0, n, w.buf(BGY), zeros);
      const A* g0 = load_block<T, A>(p.grad_x0, b, s0, n, w.buf(BG0), zeros);
      const A* x = load_block<T, A>(reads.x ? p.in[In::X] : none, b, s0, n, w.buf(BX), zeros);
      const A* M = load_block<T, A>(reads.m ? p.in[In::M] : none, b, s0, n, w.buf(BM), zeros);
      const A* MC = load_block<T, A>(reads.m ? p.in[In::MC] : none, b, s0, n, w.buf(BMC), zeros);
      const A* v = load_block<T, A>(reads.v ? p.in[In::V] : none, b, s0, n, w.buf(BV), zeros);
      const A* z = reads.z ? block_z<T, A>(p, b, s0, n, w, BZ, zeros) : zeros;
      A* g[NUM_IN];
      for (int i = 0; i < NUM_IN; ++i) g[i] = w.buf(BGRAD + i);
      cpu::general_backward_block<A, decltype(var), decltype(xh)>(
          &rf, &k, gy, g0, x, M, MC, v, z, g[In::X], g[In::M], g[In::MC], g[In::V], g[In::Z],
          g[In::H], n);
      for (int i = 0; i < NUM_IN; ++i) store_block<T, A>(p.grad[i], b, s0, n, g[i]);
    });
  });
}

template <typename T>
void backward_kind(const StepParams& p) {
  if (is_lean_backward(p)) return backward_lean<T>(p);
  backward_general<T>(p);
}

// ------------------------------------------------------------------------------ noise ops

template <typename T>
void normal_kind(const StepParams& p, const Stream& out) {
  const Blocks bl(p, p.layout == Layout::CHANNELS_LAST);
  for_each_block<float>(p, bl, 0, [&](int64_t b, int64_t s0, int64_t n, Scratch<float>& w) {
    block_noise(p, b, s0, n, w.zf.data(), w.tmp);
    T* dst = at_sample<T>(out, b, s0);
    if constexpr (std::is_same<T, double>::value) {
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<double>(w.zf[j]);
    } else {
      store_block<T, float>(out, b, s0, n, w.zf.data());
    }
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
