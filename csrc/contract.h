// GENERATED from fused_ddpm/contract.py by `python -m fused_ddpm.contract --write`.
// Do not edit: tests/test_contract.py fails when this file and contract.py differ.
// Meanings: docs/kernels.md.
#pragma once

namespace fused_ddpm {

struct Col {
  enum : int {
    U = 0,
    W = 1,
    E = 2,
    P = 3,
    Q = 4,
    R = 5,
    H = 6,
    S = 7,
    VA = 8,
    VB = 9,
  };
};

struct Clip {
  enum : int {
    NONE = 0,
    STATIC = 1,
    DYNAMIC = 2,
  };
};

struct Var {
  enum : int {
    FIXED = 0,
    SQRT = 1,
    EXP = 2,
  };
};

struct Noise {
  enum : int {
    NONE = 0,
    EXTERNAL = 1,
    PHILOX = 2,
  };
};

struct Layout {
  enum : int {
    CONTIGUOUS = 0,
    CHANNELS_LAST = 1,
  };
};

struct NoiseStream {
  enum : int {
    TIMESTEP = 0,
    STEP = 1,
  };
};

struct In {
  enum : int {
    X = 0,
    M = 1,
    MC = 2,
    V = 3,
    Z = 4,
    H = 5,
  };
};

struct Out {
  enum : int {
    Y = 0,
    X0 = 1,
  };
};

struct Flag {
  enum : int {
    CLIP = 0,
    VAR = 1,
    NOISE = 2,
    LAYOUT = 3,
    TERMS = 4,
    NOISE_STREAM = 5,
  };
};

struct Scalar {
  enum : int {
    CLIP = 0,
    GUIDANCE = 1,
  };
};

constexpr int NUM_COLS = 10;
constexpr int NUM_IN = 6;
constexpr int NUM_OUT = 2;
constexpr int NUM_FLAGS = 6;
constexpr int NUM_SCALARS = 2;
constexpr long long SEED_HIGH = 9223372036854775807LL;

// TERMS flag bits: 1 << column, for these columns.
constexpr int TERM_COLS_MASK = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7);

}  // namespace fused_ddpm
