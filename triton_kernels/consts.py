"""The kernel contract's constants (``fused_ddpm/contract.py``) as Triton constexprs.

A ``@triton.jit`` function can read only ``tl.constexpr`` globals, so each constant the
kernels use is wrapped here once, by name, from the contract; nothing in the kernels spells
a column, mode or stream as a number.
"""
from __future__ import annotations

import triton.language as tl

from ..contract import NUM_COLS, Clip, Col, In, Noise, Var

NCOLS = tl.constexpr(NUM_COLS)

COL_U = tl.constexpr(int(Col.U))
COL_W = tl.constexpr(int(Col.W))
COL_E = tl.constexpr(int(Col.E))
COL_P = tl.constexpr(int(Col.P))
COL_Q = tl.constexpr(int(Col.Q))
COL_R = tl.constexpr(int(Col.R))
COL_H = tl.constexpr(int(Col.H))
COL_S = tl.constexpr(int(Col.S))
COL_VA = tl.constexpr(int(Col.VA))
COL_VB = tl.constexpr(int(Col.VB))

CLIP_NONE = tl.constexpr(int(Clip.NONE))
CLIP_STATIC = tl.constexpr(int(Clip.STATIC))
CLIP_DYNAMIC = tl.constexpr(int(Clip.DYNAMIC))

VAR_FIXED = tl.constexpr(int(Var.FIXED))
VAR_SQRT = tl.constexpr(int(Var.SQRT))
VAR_EXP = tl.constexpr(int(Var.EXP))

NOISE_NONE = tl.constexpr(int(Noise.NONE))
NOISE_EXTERNAL = tl.constexpr(int(Noise.EXTERNAL))
NOISE_PHILOX = tl.constexpr(int(Noise.PHILOX))

IN_X = tl.constexpr(int(In.X))
IN_M = tl.constexpr(int(In.M))
IN_MC = tl.constexpr(int(In.MC))
IN_V = tl.constexpr(int(In.V))
IN_Z = tl.constexpr(int(In.Z))
IN_H = tl.constexpr(int(In.H))
