// Compile-time variant selection (in the style of flash-attention's static_switch.h).
//
//   FD_BOOL_SWITCH(p.guided, GUIDED, [&] { return run<GUIDED>(p); });
//
// runs the callable with NAME a `constexpr` copy of the runtime value. Each switch lists its
// cases explicitly; a value outside them runs nothing and yields false, so every callable
// returns bool (true: handled) and the caller reports a false as an unsupported variant.
#pragma once

#include "step_params.h"

#define FD_SWITCH_CASE_(TYPE, NAME, VALUE, ...) \
  case VALUE: {                                 \
    constexpr static TYPE NAME = VALUE;         \
    return __VA_ARGS__();                       \
  }

#define FD_BOOL_SWITCH(COND, NAME, ...)  \
  [&]() -> bool {                        \
    if (COND) {                          \
      constexpr static bool NAME = true; \
      return __VA_ARGS__();              \
    }                                    \
    constexpr static bool NAME = false;  \
    return __VA_ARGS__();                \
  }()

// The element types of the GPU kernels (fp16, bf16, fp32).
#define FD_GPU_KIND_SWITCH(VALUE, NAME, ...)                                  \
  [&]() -> bool {                                                             \
    switch (VALUE) {                                                          \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::KIND_F32, __VA_ARGS__)         \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::KIND_F16, __VA_ARGS__)         \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::KIND_BF16, __VA_ARGS__)        \
      default: return false;                                                  \
    }                                                                         \
  }()

// The variance modes (contract Var).
#define FD_VAR_SWITCH(VALUE, NAME, ...)                                       \
  [&]() -> bool {                                                             \
    switch (VALUE) {                                                          \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::Var::FIXED, __VA_ARGS__)       \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::Var::SQRT, __VA_ARGS__)        \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::Var::EXP, __VA_ARGS__)         \
      default: return false;                                                  \
    }                                                                         \
  }()

// Where z comes from, with the layout folded in where it matters (in-kernel noise only):
// NAME is one of the NoiseSrc values below.
namespace fused_ddpm {
enum NoiseSrc : int {
  NZ_NONE = 0,       // no z
  NZ_EXTERNAL = 1,   // the Z stream
  NZ_PHILOX = 2,     // Philox, contiguous layout: storage order = logical order
  NZ_PHILOX_CL = 3,  // Philox, channels_last: four positions of one channel per call
};
inline int noise_src(int noise, int layout) {
  if (noise == Noise::NONE) return NZ_NONE;
  if (noise == Noise::EXTERNAL) return NZ_EXTERNAL;
  if (noise == Noise::PHILOX) return layout == Layout::CHANNELS_LAST ? NZ_PHILOX_CL : NZ_PHILOX;
  return -1;
}
}  // namespace fused_ddpm

#define FD_NOISE_SWITCH(VALUE, NAME, ...)                                     \
  [&]() -> bool {                                                             \
    switch (VALUE) {                                                          \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::NZ_NONE, __VA_ARGS__)          \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::NZ_EXTERNAL, __VA_ARGS__)      \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::NZ_PHILOX, __VA_ARGS__)        \
      FD_SWITCH_CASE_(int, NAME, ::fused_ddpm::NZ_PHILOX_CL, __VA_ARGS__)     \
      default: return false;                                                  \
    }                                                                         \
  }()
