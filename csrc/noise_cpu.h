// In-kernel noise of the CPU backend (noise_cpu.cpp): the Philox stream and its normals
// (docs/kernels.md, "Noise"), vectorised across Philox groups.
#pragma once

#include <stdint.h>

namespace fused_ddpm {

// z[0 .. 4 ngroups) = the normals of Philox groups g0 .. g0 + ngroups - 1 (logical elements
// 4 g0 ..) of one sample with key `seed`, counter words t and stream. Whatever the machine's
// SIMD support (AVX-512, AVX2 + FMA, or none), every normal has the same bits.
void philox_normals(uint64_t seed, uint32_t t, uint32_t stream, uint64_t g0, int64_t ngroups,
                    float* z);

// z[0 .. n) = the normals of logical elements i0 .. i0 + n - 1 (any alignment).
void philox_normals_range(uint64_t seed, uint32_t t, uint32_t stream, int64_t i0, int64_t n,
                          float* z);

// The SIMD path philox_normals uses: "avx512", "avx2" or "scalar". FUSED_DDPM_CPU_ISA
// (same names) read at the first call picks a narrower one, for testing.
const char* cpu_noise_isa();

// The same choice as a number: 0 AVX-512, 1 AVX2 + FMA, 2 baseline (the CPU kernels' vector
// loops use it too).
int cpu_isa_level();

}  // namespace fused_ddpm
