// Entry points of the C++ CPU kernels (step_cpu.cpp); the torch wrappers are in ops.cpp.
#pragma once

#include <stdint.h>

#include "step_params.h"

namespace fused_ddpm {

void step_forward_cpu(const StepParams& p);
void step_backward_cpu(const StepParams& p);
// Writes the in-kernel normals of every element of `out` (p: geometry, kind, layout, t,
// seeds, noise_stream).
void philox_normal_cpu(const StepParams& p, const Stream& out);
void philox_uint32_cpu(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                       int64_t t_stride, uint32_t stream, int64_t B, int64_t numel,
                       int64_t* out);

}  // namespace fused_ddpm
