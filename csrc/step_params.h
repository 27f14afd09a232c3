// Plain parameter structs of the step kernels (no torch headers): what the torch bindings
// (step_cpu.cpp, step_cuda.cpp) fill in and the kernels (CPU, step_kernels.cu) read.
#pragma once

#include <stdint.h>

namespace fused_ddpm {

enum ScalarKind : int { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2, KIND_F64 = 3 };

// One sample-dense tensor: element s of sample b lives at data + b * batch_stride + s
// (strides in elements). data == nullptr means "not given".
struct TensorArg {
  void* data;
  int64_t batch_stride;
};

struct StepParams {
  // forward inputs (x, m, v, noise) and backward inputs (grad_y, grad_x0)
  TensorArg x, m, v, noise, grad_y, grad_x0;
  // forward outputs (y, x0), backward outputs (grad_x, grad_m, grad_v, grad_noise)
  TensorArg y, x0, grad_x, grad_m, grad_v, grad_noise;

  const int64_t* seeds;   // [B] int64, stride seeds_stride (may be 0); null with external noise
  const int64_t* t;       // [B] int64, stride t_stride (may be 0)
  const void* table;      // [T, 8] contiguous, float32 (float64 for the CPU fp64 kernel)
  const float* thresh;    // [B] float32, stride thresh_stride; only for clip_mode 2
  int64_t seeds_stride, t_stride, thresh_stride;

  int64_t B;              // batch
  int64_t N;              // elements per sample
  int64_t C;              // channels (dim 1)
  int64_t S;              // N / C (spatial size)
  int64_t T;              // table rows
  bool channels_last;     // storage position s ↔ logical index (s % C) * S + s / C
  double clip;            // static clip range (CUDA kernels use it as float)
  int clip_mode, var_mode;
  int kind;               // ScalarKind of the sample tensors
};

}  // namespace fused_ddpm
