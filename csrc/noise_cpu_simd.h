// The in-kernel noise of the CPU backend in registers: Philox4x32-10 across groups and the
// Box–Muller of noise_cpu_math.h, per ISA -- what noise_cpu.cpp writes to buffers and what the
// fused lean step (step_cpu_loops.h) consumes directly. Every path gives the same bits.
//
// AVX-512 (AVX2) holds 8 (4) groups in two vectors of 64-bit lanes, A = (c0 | c1 << 32) and
// B = (c2 | c3 << 32). A round is one 32x32 -> 64 multiply per lane (vpmuludq) for each half,
// the xor of the high words with the other word and the key in the odd dwords (one masked
// vpternlogd), and a dword swap that moves the new words into place. The last round skips the
// swap: two masked dword shuffles gather (c0, c2) and (c1, c3) per lane, the Box–Muller inputs.
// The groups sit in the lanes in the order that makes the two unpacks of (z0, z2) and
// (z1, z3) come out in element order.
#pragma once

#include <stdint.h>

#include "noise_cpu_math.h"
#include "step_cpu_simd.h"
#include "step_math.h"

namespace fused_ddpm {

// Uniform of a raw word as the spec rounds it (see uint32_to_uniform), generic over V / VI.
template <typename V, typename VI>
inline V uniform_of(const VI& w_shifted) {
  return fma_(to_float(w_shifted), V(5.9604644775390625e-08f), V(2.98023223876953125e-08f));
}

// The four normals of group g (logical elements 4 g .. 4 g + 3) of one sample.
inline void group_normals(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g, float* z) {
  const U32x4 o = philox_group(g, t, stream, seed);
  for (int h = 0; h < 2; ++h)
    box_muller_cpu<float, int32_t>(uint32_to_uniform(o.v[2 * h]),
                                   uint32_to_uniform(o.v[2 * h + 1]), z[2 * h], z[2 * h + 1]);
}

#if defined(FD_HAVE_X86_SIMD)
namespace simd {

// ------------------------------------------------------------------------------ AVX-512
// The constants of one sample's stream: the round keys and counter words (t, stream); a1 and
// p0 are the state after round 0 and the round-1 product of its (c0, c1) half for the groups
// below 2^32 (counter word c1 = 0), which do not depend on the group.
struct Philox16 {
  __m512i k0[PHILOX_ROUNDS], k1[PHILOX_ROUNDS], tw, a1, p0;
  FD_AVX512 Philox16(uint64_t seed, uint32_t t, uint32_t stream) {
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
      k0[r] = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(seed) + r * PHILOX_W0));
      k1[r] = _mm512_set1_epi32(
          static_cast<int32_t>(static_cast<uint32_t>(seed >> 32) + r * PHILOX_W1));
    }
    tw = _mm512_set1_epi64(static_cast<int64_t>((static_cast<uint64_t>(stream) << 32) | t));
    uint32_t hi, lo;
    mul_wide(PHILOX_M1, t, hi, lo);
    const uint32_t c0 = hi ^ static_cast<uint32_t>(seed);  // ^ c1 = 0
    a1 = _mm512_set1_epi64(static_cast<int64_t>((static_cast<uint64_t>(lo) << 32) | c0));
    p0 = _mm512_set1_epi64(static_cast<int64_t>(static_cast<uint64_t>(c0) * PHILOX_M0));
  }
};

// One Philox round of 8 groups in (A, B), from the products P1 = c2 M1 and P0 = c0 M0: the
// new words in place, or after the last round the gathered (c0, c2) in A and (c1, c3) in B.
FD_AVX512 inline void philox_round16(__m512i& A, __m512i& B, __m512i P1, __m512i P0,
                                     __m512i k0, __m512i k1, bool last) {
  const __mmask16 odd = 0xAAAA;
  // (lo1, hi1 ^ c1 ^ k0) and (lo0, hi0 ^ c3 ^ k1)
  const __m512i T1 = _mm512_mask_ternarylogic_epi32(P1, odd, A, k0, 0x96);
  const __m512i T0 = _mm512_mask_ternarylogic_epi32(P0, odd, B, k1, 0x96);
  if (!last) {
    A = _mm512_shuffle_epi32(T1, _MM_PERM_CDAB);  // a dword shuffle and a rotation: two ports
    B = _mm512_ror_epi64(T0, 32);
  } else {
    A = _mm512_mask_shuffle_epi32(T0, 0x5555, T1, _MM_PERM_DDBB);  // (c0, c2)
    B = _mm512_mask_shuffle_epi32(T1, odd, T0, _MM_PERM_CCAA);     // (c1, c3)
  }
}

// Where the normals of 32 elements land in the two vectors box_muller16 gives per batch.
enum class ZOrder {
  ELEMENT,   // z[0] = elements 0 .. 15, z[1] = 16 .. 31
  EVEN_ODD,  // z[0] = elements 0, 2, .. 30, z[1] = 1, 3, .. 31 (the 16-bit types' halves)
};

// The Philox words of groups g .. g + 8 NB - 1 (logical elements 4 g ..): per batch b of 8
// groups, W0[b] = (c0, c2) and W1[b] = (c1, c3) in the 64-bit lanes, the groups in the lane
// order box_muller16 needs for ORDER. The NB batches are independent chains the core
// interleaves.
template <int NB, ZOrder ORDER>
FD_AVX512 inline void philox16(const Philox16& key, uint64_t g, __m512i* W0, __m512i* W1) {
  const __m512i M0 = _mm512_set1_epi64(PHILOX_M0), M1 = _mm512_set1_epi64(PHILOX_M1);
  // ELEMENT: the unpacks take lanes 0, 2, 4, 6 (low) and 1, 3, 5, 7 (high) of each half
  const __m512i order = ORDER == ZOrder::ELEMENT ? _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0)
                                                 : _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 odd = 0xAAAA;
  __m512i A[NB], B[NB];
  for (int b = 0; b < NB; ++b) {
    A[b] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(g + 8 * b)), order);
    B[b] = key.tw;
  }
  if (g + 8 * NB <= (uint64_t(1) << 32)) {  // c1 = 0: rounds 0 and 1 from the constants
    for (int b = 0; b < NB; ++b) {
      B[b] = _mm512_ror_epi64(
          _mm512_mask_ternarylogic_epi32(_mm512_mul_epu32(A[b], M0), odd, B[b], key.k1[0], 0x96),
          32);
      A[b] = key.a1;
      philox_round16(A[b], B[b], _mm512_mul_epu32(B[b], M1), key.p0, key.k0[1], key.k1[1], false);
    }
  } else {
    for (int r = 0; r < 2; ++r)
      for (int b = 0; b < NB; ++b)
        philox_round16(A[b], B[b], _mm512_mul_epu32(B[b], M1), _mm512_mul_epu32(A[b], M0),
                       key.k0[r], key.k1[r], false);
  }
  for (int r = 2; r < PHILOX_ROUNDS; ++r)
    for (int b = 0; b < NB; ++b)
      philox_round16(A[b], B[b], _mm512_mul_epu32(B[b], M1), _mm512_mul_epu32(A[b], M0),
                     key.k0[r], key.k1[r], r + 1 == PHILOX_ROUNDS);
  for (int b = 0; b < NB; ++b) {
    W0[b] = A[b];
    W1[b] = B[b];
  }
}

// The normals of the words of philox16: z[2 b] and z[2 b + 1] hold the elements
// 32 b .. 32 b + 31 from the first group, in ORDER.
template <int NB, ZOrder ORDER>
FD_AVX512 inline void box_muller16(const __m512i* W0, const __m512i* W1, __m512* z) {
  for (int b = 0; b < NB; ++b) {
    const F16 u0 = uniform_of<F16, I16>(I16(_mm512_srli_epi32(W0[b], 8)));
    const F16 u1 = uniform_of<F16, I16>(I16(_mm512_srli_epi32(W1[b], 8)));
    F16 zc, zs;  // (z0, z2) and (z1, z3) of each group: the even and the odd elements
    box_muller_cpu<F16, I16>(u0, u1, zc, zs);
    if (ORDER == ZOrder::ELEMENT) {
      z[2 * b] = _mm512_unpacklo_ps(zc.v, zs.v);
      z[2 * b + 1] = _mm512_unpackhi_ps(zc.v, zs.v);
    } else {
      z[2 * b] = zc.v;
      z[2 * b + 1] = zs.v;
    }
  }
}

// ------------------------------------------------------------------------------ AVX2
struct Philox8 {
  __m256i k0[PHILOX_ROUNDS], k1[PHILOX_ROUNDS], tw;
  FD_AVX2 Philox8(uint64_t seed, uint32_t t, uint32_t stream) {
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
      k0[r] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(seed) + r * PHILOX_W0));
      k1[r] = _mm256_set1_epi32(
          static_cast<int32_t>(static_cast<uint32_t>(seed >> 32) + r * PHILOX_W1));
    }
    tw = _mm256_set1_epi64x(static_cast<int64_t>((static_cast<uint64_t>(stream) << 32) | t));
  }
};

// As philox16 / box_muller16 (ZOrder::ELEMENT) with 4 groups per batch: z[2 b], z[2 b + 1]
// are the elements 16 b .. 16 b + 15.
template <int NB>
FD_AVX2 inline void philox8(const Philox8& key, uint64_t g, __m256i* W0, __m256i* W1) {
  const __m256i M0 = _mm256_set1_epi64x(PHILOX_M0), M1 = _mm256_set1_epi64x(PHILOX_M1);
  const __m256i order = _mm256_set_epi64x(3, 1, 2, 0);
  __m256i A[NB], B[NB];
  for (int b = 0; b < NB; ++b) {
    A[b] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(g + 4 * b)), order);
    B[b] = key.tw;
  }
  for (int r = 0; r < PHILOX_ROUNDS; ++r) {
    for (int b = 0; b < NB; ++b) {
      const __m256i P0 = _mm256_mul_epu32(A[b], M0), P1 = _mm256_mul_epu32(B[b], M1);
      const __m256i T1 = _mm256_blend_epi32(
          P1, _mm256_xor_si256(_mm256_xor_si256(P1, A[b]), key.k0[r]), 0xAA);
      const __m256i T0 = _mm256_blend_epi32(
          P0, _mm256_xor_si256(_mm256_xor_si256(P0, B[b]), key.k1[r]), 0xAA);
      if (r + 1 < PHILOX_ROUNDS) {
        A[b] = _mm256_shuffle_epi32(T1, 0xB1);
        B[b] = _mm256_shuffle_epi32(T0, 0xB1);
      } else {
        W0[b] = _mm256_blend_epi32(_mm256_shuffle_epi32(T1, 0xF5), T0, 0xAA);  // (c0, c2)
        W1[b] = _mm256_blend_epi32(T1, _mm256_shuffle_epi32(T0, 0xA0), 0xAA);  // (c1, c3)
      }
    }
  }
}

template <int NB>
FD_AVX2 inline void box_muller8(const __m256i* W0, const __m256i* W1, __m256* z) {
  for (int b = 0; b < NB; ++b) {
    const F8 u0 = uniform_of<F8, I8>(I8(_mm256_srli_epi32(W0[b], 8)));
    const F8 u1 = uniform_of<F8, I8>(I8(_mm256_srli_epi32(W1[b], 8)));
    F8 zc, zs;
    box_muller_cpu<F8, I8>(u0, u1, zc, zs);
    z[2 * b] = _mm256_unpacklo_ps(zc.v, zs.v);
    z[2 * b + 1] = _mm256_unpackhi_ps(zc.v, zs.v);
  }
}

}  // namespace simd
#endif  // FD_HAVE_X86_SIMD

}  // namespace fused_ddpm
