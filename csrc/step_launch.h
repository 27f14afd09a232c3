// Launch functions of the pure CUDA kernels (step_kernels.cu). No torch headers: the torch
// binding (step_cuda.cpp) fills a StepParams and calls these on the current stream.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "step_params.h"

namespace fused_ddpm {

// Each returns the launch error (cudaSuccess when fine; cudaErrorInvalidValue for a variant
// the kernels do not have). Nothing is launched for B = 0 or N = 0.
cudaError_t launch_step_forward(const StepParams& p, cudaStream_t stream);
cudaError_t launch_step_backward(const StepParams& p, cudaStream_t stream);
// The normals of every element of `out` (p: geometry, kind, layout, t, seeds, noise_stream).
cudaError_t launch_philox_normal(const StepParams& p, const Stream& out, cudaStream_t stream);
cudaError_t launch_philox_uint32(const int64_t* seeds, int64_t seeds_stride, const int64_t* t,
                                 int64_t t_stride, uint32_t noise_stream, int64_t B,
                                 int64_t numel, int64_t* out, cudaStream_t stream);

}  // namespace fused_ddpm
