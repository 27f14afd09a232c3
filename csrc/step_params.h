// What one launch of the step kernels needs, as plain data (no torch headers). The torch
// bindings fill it in (step_common.h) after checking the launch arguments against
// docs/kernels.md; the CPU kernel (step_cpu.cpp) and the pure CUDA kernels
// (step_kernels.cu) only read it.
#pragma once

#include <stdint.h>

#include "contract.h"

namespace fused_ddpm {

// Element type of every stream of a launch.
enum ScalarKind : int { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2, KIND_F64 = 3 };

// One sample-dense stream. Element s (storage order) of sample b is at
// data + b * batch_stride + s. data == nullptr: the stream is absent.
struct Stream {
  void* data = nullptr;
  int64_t batch_stride = 0;  // in elements
};

// A per-sample vector [B]: value of sample b at data[b * stride] (stride 0: one value for
// every sample). data == nullptr: absent.
template <typename T>
struct PerSample {
  const T* data = nullptr;
  int64_t stride = 0;
};

struct StepParams {
  // ---- geometry ---------------------------------------------------------------------------
  int64_t B = 0;          // samples
  int64_t N = 0;          // elements per sample (C * S)
  int64_t C = 1;          // channels (dim 1)
  int64_t S = 0;          // positions per channel (N / C)
  int kind = KIND_F32;    // ScalarKind of every stream
  int layout = Layout::CONTIGUOUS;  // storage position s of a sample holds logical element
                                    // i = s (CONTIGUOUS) or i = (s % C) * S + s / C
                                    // (CHANNELS_LAST); only in-kernel noise depends on it

  // ---- streams, indexed by the contract enums In / Out --------------------------------------
  Stream in[NUM_IN];      // forward and backward inputs: X M MC V Z H
  Stream out[NUM_OUT];    // forward outputs: Y X0
  Stream grad_y;          // backward: dL/dY
  Stream grad_x0;         // backward: dL/dX0 (absent: 0)
  Stream grad[NUM_IN];    // backward outputs, one per input stream (absent: not wanted)

  // ---- per sample ---------------------------------------------------------------------------
  PerSample<int64_t> t;       // table row (clamped into [0, rows - 1]); its low 32 bits are
                              // Philox counter word 2
  PerSample<int64_t> seeds;   // Philox key (Noise::PHILOX)
  PerSample<float> thresh;    // s_b (Clip::DYNAMIC)
  PerSample<float> gscale;    // k_b of a guided step (absent: 1)

  // ---- coefficient table ----------------------------------------------------------------------
  const void* table = nullptr;  // [rows, NUM_COLS] contiguous; float (double: CPU fp64 kernel)
  int64_t rows = 0;

  // ---- launch flags and scalars (docs/kernels.md) -----------------------------------------------
  int clip = Clip::NONE;
  int var = Var::FIXED;
  int noise = Noise::NONE;
  int terms = 0;              // TERMS mask: bit Col::c set <=> the c-term is computed
  uint32_t noise_stream = 0;  // Philox counter word 3
  double clip_value = 0.0;    // Clip::STATIC range
  double guidance = 0.0;      // g of a guided step (MC present)

  // ---- decided once per launch by the binding (step_common.h) from the above ----------------
  bool guided = false;        // MC present: m = k_b((1 - g) M + g MC)
  bool need_xh = false;       // forward: x̂0 is formed (clip, P term or X0 written);
                              // backward: a = (gy P + g0) dh is nonzero somewhere
};

// Element range of one Philox call: a call serves four consecutive logical elements.
constexpr int PHILOX_WORDS = 4;

}  // namespace fused_ddpm
