"""What the harness can measure: providers, modes, shapes, dtypes, and the presets.

A run is a list of *groups*; each group is the cross product of its providers, modes, shapes
and dtypes. The command line builds one group (``--providers/--modes/--shapes/--dtypes``);
a preset (``--preset cpu|gpu|quick``) is a list of groups (command-line options that are
given explicitly replace the matching field in every group of the preset).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fused_ddpm.backends import BACKENDS

# ------------------------------------------------------------------------------ providers
#: the fused step on each backend of fused_ddpm's backend records
FUSED = tuple(BACKENDS)
_FUSED_NOTES = {"triton": "; CUDA only here", "torch": "; the kernel contract in torch ops"}
#: provider name -> one-line description (the order is the table order)
PROVIDERS: Dict[str, str] = {
    **{name: f"fused step, {name} backend (fused_ddpm.ddpm_step(backend={name!r})"
             f"{_FUSED_NOTES.get(name, '')})" for name in FUSED},
    "sample": "fused_ddpm.sample(...) loop (loop modes only)",
    "dropin": "diffusers drop-in FusedDDPMScheduler.step, diffusers' own noise (randn; mode "
              "'overhead')",
    "dropin-philox": "the drop-in with noise='philox' (in-kernel noise; mode 'overhead')",
    "reference": "eager PyTorch reference (fused_ddpm.reference.ddpm_step)",
    "compile": "torch.compile(fused_ddpm.reference.ddpm_step)",
    "diffusers": "diffusers DDPMScheduler.step (clip_sample=False, fixed_small, epsilon)",
    "randn": "torch.randn alone, the noise floor (mode 'baseline')",
    "copy": "y.copy_(x), the bandwidth ceiling (mode 'baseline'; always measured)",
    "add": "torch.add(x, m) of the same tensor, the per-call floor of mode 'overhead'",
}
BASELINE_PROVIDERS = ("randn", "copy")

# ------------------------------------------------------------------------------ modes
#: mode name -> description. "baseline" is where randn and copy are recorded (once per
#: shape and dtype, shared by every mode).
MODES: Dict[str, str] = {
    "fwd-seeds": "forward, noise generated inside the step (fused: in-kernel Philox from "
                 "seeds; peers: torch.randn inside the step) - floor 3 passes",
    "fwd-noise": "forward, external noise tensor passed in - floor 4 passes",
    "bwd": "backward only: grad of sum(y) w.r.t. x and model_output (gy = ones, "
           "materialised; in-kernel/own noise) - floor 3 passes (read gy, write gx, gm)",
    "loop": "1000-step loop without a model (x <- step(x, m, t), t = 999..0), eager "
            "Python loop - floor 3 passes per step",
    "loop-graph": "the same 1000-step loop captured whole in one CUDA graph (GPU only)",
    "overhead": "Python overhead: per-call time of one step on a tiny tensor (fused: "
                "fused_ddpm.ddpm_step with int t and a seeds tensor; dropin: "
                "FusedDDPMScheduler.step as a pipeline calls it), reported as a ratio to "
                "torch.add of the same tensor in the same run (x_add)",
}
STEP_MODES = ("fwd-seeds", "fwd-noise", "bwd")
LOOP_MODES = ("loop", "loop-graph")

#: bytes moved per element, in units of one tensor pass
PASSES = {"fwd-seeds": 3, "fwd-noise": 4, "bwd": 3, "loop": 3, "loop-graph": 3,
          "overhead": 3, "copy": 2, "randn": 1}
#: the shape of mode "overhead" (a 1x4x8x8 tensor: the per-call cost, not bandwidth)
OVERHEAD_SHAPE = "tiny"

LOOP_STEPS = 1000

# ------------------------------------------------------------------------------ shapes
SHAPES: Dict[str, Tuple[int, ...]] = {
    "sd-latent": (1, 4, 64, 64),          # SD 1.x latent, batch 1 (launch-bound)
    "sdxl-latent-b8": (8, 4, 128, 128),   # SDXL latent, batch 8
    "cifar-b128": (128, 3, 32, 32),       # CIFAR-10 pixel space, batch 128
    "img256-b16": (16, 3, 256, 256),
    "img512-b64": (64, 3, 512, 512),      # the headline shape
    "video-latent": (1, 4, 16, 64, 64),   # 5-D video latent [B, C, T, H, W]
    "tiny": (1, 4, 8, 8),                 # mode "overhead": per-call Python cost
}

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}


def parse_shape(spec: str) -> Tuple[str, Tuple[int, ...]]:
    """A shape name from :data:`SHAPES` or an explicit ``BxCxHxW[...]`` spec."""
    spec = spec.strip()
    if spec in SHAPES:
        return spec, SHAPES[spec]
    if re.fullmatch(r"\d+(x\d+){2,}", spec):
        return spec, tuple(int(s) for s in spec.split("x"))
    raise ValueError(f"unknown shape {spec!r}: use one of {list(SHAPES)} or e.g. 2x4x32x32")


def _split(value: Optional[str], known: Sequence[str], what: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items == ["all"]:
        return list(known)
    bad = [v for v in items if v not in known]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {list(known)} or 'all'")
    return items


def parse_providers(value): return _split(value, list(PROVIDERS), "provider")
def parse_modes(value): return _split(value, list(MODES), "mode")
def parse_dtypes(value): return _split(value, list(DTYPES), "dtype")


def parse_shapes(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items == ["all"]:
        return list(SHAPES)
    for v in items:
        parse_shape(v)
    return items


# ------------------------------------------------------------------------------ groups
@dataclass
class Group:
    providers: List[str]
    modes: List[str]
    shapes: List[str]
    dtypes: List[str]


@dataclass
class Settings:
    """How long and how often to measure (per case)."""

    repeats: int = 10          # timed repeats; the row's number is their median
    min_repeat_s: float = 0.002  # each repeat runs enough calls to last at least this long
    warmup_s: float = 0.02     # warm-up time after the first (untimed) call
    loop_repeats: int = 3      # timed repeats of a whole 1000-step loop
    timer: str = "auto"        # "auto" (events on CUDA, wall clock on CPU), "events", "do_bench"
    rotate: bool = True        # rotate inputs among buffers when the working set fits in cache


@dataclass
class Preset:
    groups: List[Group]
    settings: Settings = field(default_factory=Settings)
    description: str = ""


ALL_STEP_PROVIDERS = [*FUSED, "reference", "compile", "diffusers", "randn", "copy"]
LOOP_PROVIDERS = [*FUSED, "sample", "reference", "compile", "diffusers"]
OVERHEAD_PROVIDERS = [*FUSED, "dropin", "dropin-philox", "diffusers", "add"]
SEC5_SHAPES = ["sd-latent", "img512-b64"]
OVERHEAD_SETTINGS = Settings(repeats=15, min_repeat_s=0.01, warmup_s=0.05, loop_repeats=1)

PRESETS: Dict[str, Preset] = {
    # Tiny: one small shape, one dtype, few repeats; CPU-friendly, for tests and smoke runs.
    "quick": Preset(
        groups=[Group([*FUSED, "reference", "diffusers", "randn", "copy"],
                      ["fwd-seeds", "fwd-noise", "bwd"], ["1x4x16x16"], ["fp32"])],
        settings=Settings(repeats=3, min_repeat_s=0.001, warmup_s=0.005, loop_repeats=1),
        description="tiny smoke run (1x4x16x16 fp32, no torch.compile, no loops)"),
    # Modest CPU run: finishes in a few minutes on a 2-core machine.
    "cpu": Preset(
        groups=[
            Group(ALL_STEP_PROVIDERS, list(STEP_MODES),
                  ["sd-latent", "cifar-b128", "video-latent"], ["fp32", "bf16"]),
            # the C++ kernel's target shape (issue: >= 2x the eager reference, in-kernel noise)
            Group(["cpu", "reference", "diffusers", "randn", "copy"], ["fwd-seeds", "fwd-noise"],
                  ["img256-b16"], ["fp32"]),
            Group(LOOP_PROVIDERS, ["loop"], ["sd-latent"], ["fp32"]),
            Group(OVERHEAD_PROVIDERS, ["overhead"], [OVERHEAD_SHAPE], ["fp32"]),
        ],
        settings=Settings(repeats=15, min_repeat_s=0.002, warmup_s=0.02, loop_repeats=3),
        description="CPU: 3 small shapes x fp32/bf16 x fwd/bwd, 16x3x256x256 fp32 fwd, "
                    "1000-step loop on the SD latent"),
    # The full headline set on a GPU (~3 min on an H200).
    "gpu": Preset(
        groups=[
            Group([p for p in ALL_STEP_PROVIDERS if p != "compile"], list(STEP_MODES),
                  list(SHAPES), list(DTYPES)),
            # torch.compile costs seconds of compilation per (shape, dtype, mode): the
            # section 5 shapes only (run `--providers compile --shapes all` for the rest).
            Group(["compile"], list(STEP_MODES), SEC5_SHAPES, list(DTYPES)),
            Group(LOOP_PROVIDERS, list(LOOP_MODES), ["sd-latent", "cifar-b128"], list(DTYPES)),
            Group(OVERHEAD_PROVIDERS, ["overhead"], [OVERHEAD_SHAPE], ["fp32"]),
        ],
        settings=Settings(repeats=25, min_repeat_s=0.001, warmup_s=0.025, loop_repeats=3),
        description="GPU: the headline set - all shapes, dtypes, modes and providers"),
    # Python overhead per call (1x4x8x8): fused_ddpm.ddpm_step and the drop-in vs torch.add.
    "overhead": Preset(
        groups=[Group(OVERHEAD_PROVIDERS, ["overhead"], [OVERHEAD_SHAPE], ["fp32"])],
        settings=OVERHEAD_SETTINGS,
        description="Python overhead per call on a 1x4x8x8 tensor, as ratios to torch.add"),
}


def override(preset: Preset, providers=None, modes=None, shapes=None, dtypes=None) -> Preset:
    """The preset with every given field replacing that field in each group.

    ``modes`` in a multi-group preset keeps, per group, only the given modes that group
    has (so ``--preset gpu --modes loop`` runs only the loop group); groups left empty are
    dropped, identical groups merged."""
    multi = len(preset.groups) > 1
    out, seen = [], set()
    for g in preset.groups:
        gm = list(g.modes)
        if modes is not None:
            gm = [m for m in modes if m in g.modes] if multi else list(modes)
        ng = Group(list(providers) if providers is not None else list(g.providers), gm,
                   list(shapes) if shapes is not None else list(g.shapes),
                   list(dtypes) if dtypes is not None else list(g.dtypes))
        key = (tuple(ng.providers), tuple(ng.modes), tuple(ng.shapes), tuple(ng.dtypes))
        if ng.providers and ng.modes and ng.shapes and ng.dtypes and key not in seen:
            seen.add(key)
            out.append(ng)
    if not out and modes:
        # the given modes are in no group of the preset: one group of everything
        out = [Group(list(providers or dict.fromkeys(p for g in preset.groups for p in g.providers)),
                     list(modes),
                     list(shapes or dict.fromkeys(s for g in preset.groups for s in g.shapes)),
                     list(dtypes or dict.fromkeys(d for g in preset.groups for d in g.dtypes)))]
    return replace(preset, groups=out)


def union(preset: Preset, providers=None, modes=None, shapes=None, dtypes=None) -> Preset:
    """One group: the given fields, the union over the preset's groups for the others."""
    def merged(attr):
        return list(dict.fromkeys(v for g in preset.groups for v in getattr(g, attr)))
    g = Group(list(providers) if providers is not None else merged("providers"),
              list(modes) if modes is not None else merged("modes"),
              list(shapes) if shapes is not None else merged("shapes"),
              list(dtypes) if dtypes is not None else merged("dtypes"))
    return replace(preset, groups=[g] if (g.providers and g.modes and g.shapes and g.dtypes)
                   else [])
