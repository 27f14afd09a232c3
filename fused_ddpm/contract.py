"""The kernel contract, declared once: table columns, modes, streams, launch flags.

Every backend reads its constants from here. Python and the Triton kernels import this
module; the C++ and CUDA sources include ``csrc/contract.h``, which is *generated* from it
(``python -m fused_ddpm.contract --write``; ``tests/test_contract.py`` fails when the
checked-in header differs from what this module renders). No other file spells a column
offset, a mode code or a stream index as a number. The meaning of each name is in
``docs/kernels.md``.

Per element of sample b, with ``c`` the table row ``table[clamp(t[b], 0, R-1)]``::

    m   = M                      or, guided:  k_b·((1−g)·M + g·MC)
    xr  = c.U·x + c.W·m + c.E·z                    (x̂0 before clipping)
    xh  = clip(xr)                                 (Clip mode)
    σ   = c.S | c.S·√v | c.S·exp(c.VA + c.VB·v)    (Var mode)
    y   = c.P·xh + c.Q·x + c.R·m + c.H·h + σ·z
    x0  = xh

A term whose column's bit is clear in the ``TERMS`` flag is left out (the column is zero in
every row of the table, so the formula it stands for has no such term).
"""
from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Type

__all__ = ["Col", "NUM_COLS", "Clip", "Var", "Noise", "Layout", "NoiseStream", "In",
           "NUM_IN", "Out", "NUM_OUT", "Flag", "NUM_FLAGS", "Scalar", "NUM_SCALARS",
           "TERM_COLS", "terms_mask", "render_header", "HEADER_PATH"]


class Col(enum.IntEnum):
    """Columns of a coefficient table row (float32; float64 for the CPU fp64 kernel)."""

    U = 0    # x̂0 coefficient of x
    W = 1    # x̂0 coefficient of m
    E = 2    # x̂0 coefficient of z (training-side add_noise targets; 0 for sampler steps)
    P = 3    # y coefficient of the clipped x̂0
    Q = 4    # y coefficient of x
    R = 5    # y coefficient of m
    H = 6    # y coefficient of h (the previous step's x̂0: multistep solvers)
    S = 7    # σ (Var.FIXED), or the factor of the per-element σ (a gate for learned variances)
    VA = 8   # Var.EXP: σ = S·exp(VA + VB·v)
    VB = 9


NUM_COLS = len(Col)

#: Columns that carry a term of the affine form (bit i of the TERMS flag ⇔ column i).
TERM_COLS = (Col.U, Col.W, Col.E, Col.P, Col.Q, Col.R, Col.H, Col.S)


class Clip(enum.IntEnum):
    """How x̂0 is clipped: not, to [−clip, clip], or dynamically: clamp(xr, −s_b, s_b)/s_b."""

    NONE = 0
    STATIC = 1
    DYNAMIC = 2


class Var(enum.IntEnum):
    """Where σ comes from: the table (FIXED), or per element from the variance stream v."""

    FIXED = 0    # σ = S
    SQRT = 1     # σ = S·√v              (diffusers' "learned": v is the variance)
    EXP = 2      # σ = S·exp(VA + VB·v)  ("learned_range", and log-variance outputs)


class Noise(enum.IntEnum):
    """Where z comes from."""

    NONE = 0       # no noise term (σ and E are zero in every row): z is never formed
    EXTERNAL = 1   # the Z input stream
    PHILOX = 2     # in-kernel Philox4x32-10 from seeds[b] (docs/kernels.md, "Noise")


class Layout(enum.IntEnum):
    """How every stream's sample X[b] is stored (only the batch stride differs per stream)."""

    CONTIGUOUS = 0      # X[b] contiguous
    CHANNELS_LAST = 1   # X[b] contiguous in channels-last order (strides (1, …, C))


class NoiseStream(enum.IntEnum):
    """The fourth word of the Philox counter: keeps streams of different uses apart."""

    TIMESTEP = 0   # tables indexed by training timestep, and x_T at counter word T
    STEP = 1       # tables indexed by step position


class In(enum.IntEnum):
    """Input streams: tensors [B, C, *spatial] in the inputs' dtype, sample-dense in one
    Layout. Absent streams are None."""

    X = 0    # the sample x_t (always given)
    M = 1    # the model output (its first C channels; the unconditional one when guided)
    MC = 2   # guided steps: the conditional model output
    V = 3    # Var.SQRT / Var.EXP: the variance channels
    Z = 4    # Noise.EXTERNAL: the noise
    H = 5    # the previous step's x̂0 (when the H column is used)


NUM_IN = len(In)


class Out(enum.IntEnum):
    """Output streams of the forward launch (X0 may be absent)."""

    Y = 0    # x at the next step
    X0 = 1   # the clipped x̂0 (diffusers' pred_original_sample; a multistep state)


NUM_OUT = len(Out)


class Flag(enum.IntEnum):
    """The ``flags`` int list of a launch."""

    CLIP = 0           # a Clip
    VAR = 1            # a Var
    NOISE = 2          # a Noise
    LAYOUT = 3         # a Layout
    TERMS = 4          # bit mask over TERM_COLS: terms the kernel computes
    NOISE_STREAM = 5   # a NoiseStream (Philox counter word 3)


NUM_FLAGS = len(Flag)


class Scalar(enum.IntEnum):
    """The ``scalars`` float list of a launch."""

    CLIP = 0       # Clip.STATIC: the clip range c
    GUIDANCE = 1   # guided steps: g


NUM_SCALARS = len(Scalar)


#: per-sample Philox seeds drawn from a torch generator are uniform on [0, SEED_HIGH)
SEED_HIGH = 2 ** 63 - 1


def terms_mask(nonzero_cols: Iterable[int]) -> int:
    """The TERMS flag for a table whose nonzero columns are ``nonzero_cols``."""
    mask = 0
    for col in nonzero_cols:
        col = Col(col)
        if col in TERM_COLS:
            mask |= 1 << int(col)
    return mask


# ----------------------------------------------------------------------------- C++ header
HEADER_PATH = Path(__file__).resolve().parent.parent / "csrc" / "contract.h"

_ENUMS: List[Type[enum.IntEnum]] = [Col, Clip, Var, Noise, Layout, NoiseStream, In, Out, Flag,
                                    Scalar]
_COUNTS: Dict[str, int] = {"NUM_COLS": NUM_COLS, "NUM_IN": NUM_IN, "NUM_OUT": NUM_OUT,
                           "NUM_FLAGS": NUM_FLAGS, "NUM_SCALARS": NUM_SCALARS}


def render_header() -> str:
    """The text of ``csrc/contract.h``: every enum above as a struct holding an unscoped
    ``int`` enum, so ``fused_ddpm::Col::U`` is an int constant (usable as a template
    argument or an index), plus the counts."""
    lines = [
        "// GENERATED from fused_ddpm/contract.py by `python -m fused_ddpm.contract --write`.",
        "// Do not edit: tests/test_contract.py fails when this file and contract.py differ.",
        "// Meanings: docs/kernels.md.",
        "#pragma once",
        "",
        "namespace fused_ddpm {",
        "",
    ]
    for e in _ENUMS:
        lines.append(f"struct {e.__name__} {{")
        lines.append("  enum : int {")
        for member in e:
            lines.append(f"    {member.name} = {int(member)},")
        lines.append("  };")
        lines.append("};")
        lines.append("")
    for name, value in _COUNTS.items():
        lines.append(f"constexpr int {name} = {value};")
    lines.append(f"constexpr long long SEED_HIGH = {SEED_HIGH}LL;")
    lines.append("")
    lines.append("// TERMS flag bits: 1 << column, for these columns.")
    bits = " | ".join(f"(1 << {int(c)})" for c in TERM_COLS)
    lines.append(f"constexpr int TERM_COLS_MASK = {bits};")
    lines.append("")
    lines.append("}  // namespace fused_ddpm")
    lines.append("")
    return "\n".join(lines)


def _main(argv: List[str]) -> int:
    text = render_header()
    if "--write" in argv:
        HEADER_PATH.write_text(text)
        print(f"wrote {HEADER_PATH}")
    elif "--check" in argv:
        same = HEADER_PATH.exists() and HEADER_PATH.read_text() == text
        print(f"{HEADER_PATH}: {'up to date' if same else 'STALE: run python -m fused_ddpm.contract --write'}")
        return 0 if same else 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
