// CPU in-kernel noise into buffers: the normals of noise_cpu_simd.h per ISA, picked once per
// process.
#include "noise_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "noise_cpu_simd.h"

namespace fused_ddpm {
namespace {

void normals_scalar(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g0, int64_t ngroups,
                    float* z) {
  for (int64_t g = 0; g < ngroups; ++g)
    group_normals(seed, t, stream, g0 + static_cast<uint64_t>(g), z + 4 * g);
}

#if defined(FD_HAVE_X86_SIMD)
// Steps of NB batches; the Philox rounds of the next step are issued before the Box–Muller
// of this one (two independent chains), and the last partial step goes through a buffer.
FD_AVX512 FD_FLATTEN void normals_avx512(uint64_t seed, uint32_t t, uint32_t stream,
                                         uint64_t g0, int64_t ngroups, float* z) {
  constexpr int NB = 2;
  constexpr int64_t G = 8 * NB;
  const simd::Philox16 key(seed, t, stream);
  __m512i W0[NB], W1[NB], N0[NB], N1[NB];
  simd::philox16<NB, simd::ZOrder::ELEMENT>(key, g0, W0, W1);
  float tail[4 * G];
  for (int64_t g = 0; g < ngroups; g += G) {
    if (g + G < ngroups)
      simd::philox16<NB, simd::ZOrder::ELEMENT>(key, g0 + static_cast<uint64_t>(g + G), N0, N1);
    __m512 v[2 * NB];
    simd::box_muller16<NB, simd::ZOrder::ELEMENT>(W0, W1, v);
    float* dst = ngroups - g >= G ? z + 4 * g : tail;
    for (int q = 0; q < 2 * NB; ++q) _mm512_storeu_ps(dst + 16 * q, v[q]);
    if (dst == tail) std::memcpy(z + 4 * g, tail, sizeof(float) * 4 * (ngroups - g));
    for (int b = 0; b < NB; ++b) {
      W0[b] = N0[b];
      W1[b] = N1[b];
    }
  }
}

FD_AVX2 FD_FLATTEN void normals_avx2(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g0,
                                     int64_t ngroups, float* z) {
  constexpr int NB = 2;
  constexpr int64_t G = 4 * NB;
  const simd::Philox8 key(seed, t, stream);
  __m256i W0[NB], W1[NB], N0[NB], N1[NB];
  simd::philox8<NB>(key, g0, W0, W1);
  float tail[4 * G];
  for (int64_t g = 0; g < ngroups; g += G) {
    if (g + G < ngroups) simd::philox8<NB>(key, g0 + static_cast<uint64_t>(g + G), N0, N1);
    __m256 v[2 * NB];
    simd::box_muller8<NB>(W0, W1, v);
    float* dst = ngroups - g >= G ? z + 4 * g : tail;
    for (int q = 0; q < 2 * NB; ++q) _mm256_storeu_ps(dst + 8 * q, v[q]);
    if (dst == tail) std::memcpy(z + 4 * g, tail, sizeof(float) * 4 * (ngroups - g));
    for (int b = 0; b < NB; ++b) {
      W0[b] = N0[b];
      W1[b] = N1[b];
    }
  }
}
#endif  // FD_HAVE_X86_SIMD

using NormalsFn = void (*)(uint64_t, uint32_t, uint32_t, uint64_t, int64_t, float*);

struct Isa {
  NormalsFn fn;
  const char* name;
  int level;
};

Isa pick_isa() {
  // The widest path this CPU has, or a narrower one named by FUSED_DDPM_CPU_ISA.
  const char* want = std::getenv("FUSED_DDPM_CPU_ISA");
  int widest = 0;  // 0 avx512, 1 avx2, 2 scalar
  if (want != nullptr && *want != '\0') {
    if (std::strcmp(want, "avx512") == 0) widest = 0;
    else if (std::strcmp(want, "avx2") == 0) widest = 1;
    else if (std::strcmp(want, "scalar") == 0) widest = 2;
    else throw std::invalid_argument(std::string("FUSED_DDPM_CPU_ISA must be avx512, avx2 or "
                                                 "scalar, got '") + want + "'");
  }
#if defined(FD_HAVE_X86_SIMD)
  __builtin_cpu_init();
  if (widest <= 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return {normals_avx512, "avx512", 0};
  if (widest <= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return {normals_avx2, "avx2", 1};
#endif
  return {normals_scalar, "scalar", 2};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace

void philox_normals(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g0, int64_t ngroups,
                    float* z) {
  if (ngroups > 0) isa().fn(seed, t, stream, g0, ngroups, z);
}

void philox_normals_range(uint64_t seed, uint32_t t, uint32_t stream, int64_t i0, int64_t n,
                          float* z) {
  if (n <= 0) return;
  const int64_t first = i0 >> 2, last = (i0 + n - 1) >> 2;
  const int64_t head = i0 & 3;
  if (head == 0 && (n & 3) == 0) {
    philox_normals(seed, t, stream, static_cast<uint64_t>(first), last - first + 1, z);
    return;
  }
  // Unaligned ends: whole groups into a small buffer, then the wanted part.
  constexpr int64_t CHUNK = 256;  // groups per step
  float buf[4 * CHUNK];
  int64_t done = 0;
  for (int64_t g = first; g <= last; g += CHUNK) {
    const int64_t ng = std::min<int64_t>(CHUNK, last - g + 1);
    philox_normals(seed, t, stream, static_cast<uint64_t>(g), ng, buf);
    const int64_t from = (g == first) ? head : 0;
    const int64_t take = std::min<int64_t>(4 * ng - from, n - done);
    std::memcpy(z + done, buf + from, sizeof(float) * take);
    done += take;
  }
}

const char* cpu_noise_isa() { return isa().name; }

int cpu_isa_level() { return isa().level; }

}  // namespace fused_ddpm
