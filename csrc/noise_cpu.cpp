// CPU in-kernel noise: Philox4x32-10 and Box–Muller vectorised across Philox groups.
//
// Philox state of one group in two 64-bit lanes, A = (c0 | c1 << 32), B = (c2 | c3 << 32):
// a round is one 32x32 -> 64 multiply per lane (vpmuludq) for each half, the xor of the
// high words with the key under a dword mask (one vpternlogd on AVX-512), and a 32-bit
// rotation that puts the new words in place. Box–Muller runs on 16 (8) pairs at once with the
// generic accurate math of step_math.h, so the AVX-512, AVX2 and scalar paths give the same
// bits for every normal.
#include "noise_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "step_cpu_simd.h"
#include "step_math.h"

namespace fused_ddpm {
namespace {

// ------------------------------------------------------------------------------ scalar
void normals_scalar(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g0, int64_t ngroups,
                    float* z) {
  for (int64_t g = 0; g < ngroups; ++g) {
    const U32x4 o = philox_group(g0 + static_cast<uint64_t>(g), t, stream, seed);
    for (int h = 0; h < 2; ++h) {
      float z0, z1;
      box_muller_accurate<float, int32_t>(uint32_to_uniform(o.v[2 * h]),
                                          uint32_to_uniform(o.v[2 * h + 1]), z0, z1);
      z[4 * g + 2 * h] = z0;
      z[4 * g + 2 * h + 1] = z1;
    }
  }
}

#if defined(FD_HAVE_X86_SIMD)
using simd::F16;
using simd::F8;
using simd::I16;
using simd::I8;

// ------------------------------------------------------------------------------ AVX-512
// Uniforms of the raw words w (16 lanes).
FD_AVX512 inline F16 uniform16(__m512i w) {
  return fma_(F16(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8))), F16(5.9604644775390625e-08f),
              F16(2.98023223876953125e-08f));
}

FD_AVX512 FD_FLATTEN void normals_avx512(uint64_t seed, uint32_t t, uint32_t stream,
                                         uint64_t g0, int64_t ngroups, float* z) {
  __m512i K0[PHILOX_ROUNDS], K1[PHILOX_ROUNDS];
  for (int r = 0; r < PHILOX_ROUNDS; ++r) {
    K0[r] = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(seed) + r * PHILOX_W0));
    K1[r] = _mm512_set1_epi32(
        static_cast<int32_t>(static_cast<uint32_t>(seed >> 32) + r * PHILOX_W1));
  }
  const __m512i M0 = _mm512_set1_epi64(PHILOX_M0), M1 = _mm512_set1_epi64(PHILOX_M1);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i B0 = _mm512_set1_epi64(static_cast<int64_t>(
      (static_cast<uint64_t>(stream) << 32) | t));
  // even / odd dwords of (A, B): lanes 0-7 from A (words 0, 1), 8-15 from B (words 2, 3)
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  // output order: element 4g + j of the 8 groups from zc (cos: j = 0, 2) and zs (sin: j = 1, 3)
  const __m512i out_lo =
      _mm512_set_epi32(27, 11, 19, 3, 26, 10, 18, 2, 25, 9, 17, 1, 24, 8, 16, 0);
  const __m512i out_hi =
      _mm512_set_epi32(31, 15, 23, 7, 30, 14, 22, 6, 29, 13, 21, 5, 28, 12, 20, 4);
  // Two independent batches of 8 groups per iteration: the 10 dependent rounds of one batch
  // are a long latency chain, the other batch fills its gaps.
  float tail[64];
  for (int64_t g = 0; g < ngroups; g += 16) {
    __m512i A[2], B[2];
    for (int h = 0; h < 2; ++h) {
      A[h] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(g0 + g + 8 * h)), lane);
      B[h] = B0;
    }
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
      for (int h = 0; h < 2; ++h) {
        const __m512i P0 = _mm512_mul_epu32(A[h], M0);
        const __m512i P1 = _mm512_mul_epu32(B[h], M1);
        // swap the words of each lane: a dword shuffle for A, a rotation for B (two ports)
        A[h] = _mm512_shuffle_epi32(
            _mm512_mask_ternarylogic_epi32(P1, 0xAAAA, A[h], K0[r], 0x96), _MM_PERM_CDAB);
        B[h] = _mm512_ror_epi64(_mm512_mask_ternarylogic_epi32(P0, 0xAAAA, B[h], K1[r], 0x96), 32);
      }
    }
    float* dst = (ngroups - g >= 16) ? z + 4 * g : tail;
    for (int h = 0; h < 2; ++h) {
      const F16 u0 = uniform16(_mm512_permutex2var_epi32(A[h], even, B[h]));
      const F16 u1 = uniform16(_mm512_permutex2var_epi32(A[h], odd, B[h]));
      F16 zc, zs;
      box_muller_accurate<F16, I16>(u0, u1, zc, zs);
      _mm512_storeu_ps(dst + 32 * h, _mm512_permutex2var_ps(zc.v, out_lo, zs.v));
      _mm512_storeu_ps(dst + 32 * h + 16, _mm512_permutex2var_ps(zc.v, out_hi, zs.v));
    }
    if (dst == tail) std::memcpy(z + 4 * g, tail, sizeof(float) * 4 * (ngroups - g));
  }
}

// ------------------------------------------------------------------------------ AVX2
FD_AVX2 inline F8 uniform8(__m256i w) {
  return fma_(F8(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8))), F8(5.9604644775390625e-08f),
              F8(2.98023223876953125e-08f));
}

FD_AVX2 FD_FLATTEN void normals_avx2(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g0,
                                     int64_t ngroups, float* z) {
  __m256i K0[PHILOX_ROUNDS], K1[PHILOX_ROUNDS];
  for (int r = 0; r < PHILOX_ROUNDS; ++r) {
    K0[r] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(seed) + r * PHILOX_W0));
    K1[r] = _mm256_set1_epi32(
        static_cast<int32_t>(static_cast<uint32_t>(seed >> 32) + r * PHILOX_W1));
  }
  const __m256i M0 = _mm256_set1_epi64x(PHILOX_M0), M1 = _mm256_set1_epi64x(PHILOX_M1);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  const __m256i B0 = _mm256_set1_epi64x(static_cast<int64_t>(
      (static_cast<uint64_t>(stream) << 32) | t));
  float tail[16];
  for (int64_t g = 0; g < ngroups; g += 4) {
    __m256i A = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(g0 + g)), lane);
    __m256i B = B0;
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
      const __m256i P0 = _mm256_mul_epu32(A, M0);
      const __m256i P1 = _mm256_mul_epu32(B, M1);
      const __m256i TA = _mm256_xor_si256(_mm256_xor_si256(P1, A), K0[r]);
      const __m256i TB = _mm256_xor_si256(_mm256_xor_si256(P0, B), K1[r]);
      A = _mm256_shuffle_epi32(_mm256_blend_epi32(P1, TA, 0xAA), 0xB1);
      B = _mm256_shuffle_epi32(_mm256_blend_epi32(P0, TB, 0xAA), 0xB1);
    }
    // per 128-bit half: even dwords -> (o0 g, o0 g+1, o2 g, o2 g+1), odd -> o1, o3
    const __m256 Af = _mm256_castsi256_ps(A), Bf = _mm256_castsi256_ps(B);
    const F8 u0 = uniform8(_mm256_castps_si256(_mm256_shuffle_ps(Af, Bf, 0x88)));
    const F8 u1 = uniform8(_mm256_castps_si256(_mm256_shuffle_ps(Af, Bf, 0xDD)));
    F8 zc, zs;
    box_muller_accurate<F8, I8>(u0, u1, zc, zs);
    // zc = (z0 z4 z2 z6 | z8 z12 z10 z14), zs likewise +1
    const __m256 a = _mm256_unpacklo_ps(zc.v, zs.v);  // z0 z1 z4 z5 | z8 z9 z12 z13
    const __m256 b = _mm256_unpackhi_ps(zc.v, zs.v);  // z2 z3 z6 z7 | z10 z11 z14 z15
    const __m256 c = _mm256_shuffle_ps(a, b, 0x44);   // z0 z1 z2 z3 | z8 .. z11
    const __m256 d = _mm256_shuffle_ps(a, b, 0xEE);   // z4 .. z7 | z12 .. z15
    float* dst = (ngroups - g >= 4) ? z + 4 * g : tail;
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(c, d, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(c, d, 0x31));
    if (dst == tail) std::memcpy(z + 4 * g, tail, sizeof(float) * 4 * (ngroups - g));
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
