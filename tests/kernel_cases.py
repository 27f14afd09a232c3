"""Random launches of the kernel contract (``docs/kernels.md``) and their expected results.

:func:`sample_inputs` yields :class:`Case` objects in the spirit of pytorch/extension-cpp's
sample-input generators: every method × prediction type × variance type × clip mode, both
noise sources, odd shapes, every dtype the backend takes, both layouts, and the 2C-channel
model output passed as two views. A case's launch arguments are built by the production
layer (:class:`fused_ddpm.step.Prepared`, which the user-level call uses too); its expected
outputs come from the float64 reference (:mod:`fused_ddpm.reference`), never from the
table. The table is read here only for the *error scale* of each element: the magnitudes
of the terms that make it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

import fused_ddpm as fd
from fused_ddpm.backends import get as get_backend
from fused_ddpm.contract import Clip, Col, Flag, In, Layout, Out, Var
from fused_ddpm.layout import empty_in_layout
from fused_ddpm.methods import METHODS, PREDICTIONS, VARIANCES
from fused_ddpm.step import Prepared

from helpers import variance_values

SCHED = fd.NoiseSchedule(num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02)
THRESH = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
CLIPS = {"none": {}, "static": dict(clip_sample_range=1.0), "dynamic": THRESH}
NAN = float("nan")

# Relative error allowed per element, as a fraction of the element's scale (the sum of the
# magnitudes of the terms that make it): a few roundings of the compute or storage type.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# float64 launches still read two float32 quantities: the dynamic-threshold scale (thresh)
# and, for in-kernel noise, the normals (float32 by spec, exact in float64 on both sides).
F64_DYNAMIC_TOL = 2e-7

SHAPES = [(3, 3, 7, 13), (1, 4, 9), (2, 3, 5, 6, 7), (4, 2, 17, 5), (2, 5, 3, 3), (3, 1, 150),
          (2, 3, 1, 1)]


#: values tried for each option a method reads (Method.options), default first
OPTION_VALUES = {"eta": (0.0, 0.7, 0.5), "use_clipped_model_output": (False, False, True),
                 "set_alpha_to_one": (True, False, True), "solver_order": (2, 1, 2),
                 "solver_type": ("midpoint", "heun", "heun"),
                 "lower_order_final": (True, True, False), "euler_at_final": (False, False, True),
                 "final_sigmas_type": ("zero", "sigma_min", "sigma_min")}


def step_configs() -> List[dict]:
    """Every sampler config of the registry: each sampler method × prediction type × clip
    mode × (each variance type it takes, or — for methods with options or their own σ,
    which only read the variance type's channel count — three settings of its options,
    cycling through its variance types)."""
    out = []
    for name, method in METHODS.items():
        if not method.samples:
            continue
        vts = method.variance_types
        for p, c in itertools.product(PREDICTIONS, CLIPS):
            if not method.options and not method.own_sigma:
                out += [dict(method=name, prediction_type=p, variance_type=v, **CLIPS[c])
                        for v in vts]
                continue
            for k in range(3):
                opts = {o: OPTION_VALUES[o][k] for o in method.options}
                out.append(dict(method=name, prediction_type=p, variance_type=vts[k % len(vts)],
                                **opts, **CLIPS[c]))
    return out


def config_id(cfg: dict) -> str:
    keys = ("method", "prediction_type", "variance_type") + tuple(OPTION_VALUES)
    clip = "dynamic" if cfg.get("thresholding") else ("static" if "clip_sample_range" in cfg
                                                       else "none")
    return "-".join(str(cfg[k]) for k in keys if k in cfg) + "-" + clip


def coefficients(cfg: dict) -> fd.StepCoefficients:
    if cfg.get("method") == "add_noise":
        return fd.add_noise_coefficients(SCHED, cfg["prediction_type"])
    # 12 steps for the methods indexed by step: below diffusers' 15-step lower_order_final
    # threshold, so the last two rows exercise it
    n = 12 if METHODS[cfg["method"]].index_by == "step" else 50
    return fd.step_coefficients(SCHED, num_inference_steps=n, **cfg)


def relayout(a: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Same values; each sample contiguous, or contiguous in channels-last order (any rank)."""
    if layout == Layout.CONTIGUOUS:
        return a.contiguous()
    perm = [0] + list(range(2, a.dim())) + [1]
    inv = [0, a.dim() - 1] + list(range(1, a.dim() - 1))
    return a.permute(perm).contiguous().permute(inv)


@dataclass
class Launch:
    """The arguments of one launch, as docs/kernels.md lists them."""

    ins: list
    t: torch.Tensor
    seeds: Optional[torch.Tensor]
    table: torch.Tensor
    thresh: Optional[torch.Tensor]
    gscale: Optional[torch.Tensor]
    flags: List[int]
    scalars: List[float]

    @property
    def x(self) -> torch.Tensor:
        return self.ins[In.X]

    @property
    def layout(self) -> Layout:
        return Layout(self.flags[Flag.LAYOUT])

    def poisoned(self) -> torch.Tensor:
        out = empty_in_layout(self.x, self.layout)
        return out.fill_(NAN)

    def forward(self, backend: str, write_x0: bool = True):
        y = self.poisoned()
        x0 = self.poisoned() if write_x0 else None
        get_backend(backend).launchers.forward(self.ins, self.t, self.seeds, self.table,
                                               self.thresh, self.gscale, [y, x0], self.flags,
                                               self.scalars)
        return y, x0

    def backward(self, backend: str, grad_y, grad_x0=None, wanted=None):
        """Gradients of every present stream (or of the streams in ``wanted``)."""
        grads = [self.poisoned() if a is not None and (wanted is None or s in wanted) else None
                 for s, a in zip(In, self.ins)]
        get_backend(backend).launchers.backward(self.ins, grad_y, grad_x0, self.t, self.seeds,
                                                self.table, self.thresh, self.gscale, grads,
                                                self.flags, self.scalars)
        return grads


class Case:
    """Random inputs of one step on ``device`` and their launch on ``backend``."""

    def __init__(self, cfg: dict, shape, dtype: torch.dtype, layout: Layout, noise: str,
                 backend: str, device: str, seed: int, t=None, seeds=None):
        self.cfg, self.shape, self.dtype, self.layout = cfg, tuple(shape), dtype, layout
        self.noise_kind, self.backend, self.device = noise, backend, device
        self.coeffs = coefficients(cfg)
        c = self.coeffs.config
        self.training = not METHODS[c.method].samples
        g = torch.Generator().manual_seed(seed)
        B, C = shape[0], shape[1]
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
        mo = None
        if not self.training:
            mo = torch.randn((B, C * c.model_channels) + tuple(shape[2:]), generator=g,
                             dtype=torch.float64) * 1.5
            if c.learned_variance:
                mo[:, C:] = variance_values(c.variance_type, mo[:, C:].shape, g)
            mo = relayout(mo.to(dtype), layout).to(device)
        self.x = relayout(x.to(dtype), layout).to(device)
        self.mo = mo
        if t is None:         # row 0, the first visited row, the last, then random ones
            rows = self.coeffs.rows
            t = torch.tensor([0, int(rows[0]), int(rows[-1])] + [
                int(rows[i]) for i in torch.randint(0, len(rows), (max(B - 3, 0),),
                                                    generator=g)])[:B]
            t = t[torch.randperm(B, generator=g)] if B else t
        self.t = torch.as_tensor(t, dtype=torch.int64).to(device)
        self.history = None
        if self.coeffs.multistep:            # the previous step's x̂0
            h = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            self.history = relayout(h, layout).to(device)
        self.noise = self.seeds = None
        if noise == "external":
            z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            self.noise = relayout(z, layout).to(device)
        else:
            if seeds is None:
                seeds = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g, dtype=torch.int64)
            self.seeds = torch.as_tensor(seeds, dtype=torch.int64).to(device)
        self.plan = Prepared(self.coeffs, self.x, self.mo, self.t, self.noise, self.seeds, None,
                             backend, x_name="x0" if self.training else "x_t",
                             history=self.history)
        ins = self.plan.streams(self.x, self.mo, self.noise, self.history)
        tt = self.plan.timesteps(self.t, B)
        sd = self.plan.seeds(self.seeds, B, None)
        self.launch = Launch(ins, tt, sd, self.plan.table, self.plan.thresh(ins, tt), None,
                             list(self.plan.flags), list(self.plan.scalars))
        # In-kernel noise: the reference gets the backend's own normals (tested against the
        # Philox oracle on their own, within the noise tolerance), so that the step's math is
        # compared tightly.
        if noise == "external":
            self.z64 = self.noise.double().cpu()
        elif sd is None:                           # no noise term: z is never formed
            self.z64 = torch.zeros(shape, dtype=torch.float64)
        else:
            z = torch.empty(shape, dtype=torch.float32, device=device)
            if B:
                get_backend(backend).launchers.philox_normal(
                    sd, tt, self.launch.flags[Flag.NOISE_STREAM], int(Layout.CONTIGUOUS), z)
            self.z64 = z.double().cpu()

    def __repr__(self) -> str:
        return (f"Case({config_id(self.cfg)}, {list(self.shape)}, {self.dtype}, "
                f"{self.layout.name}, {self.noise_kind}, {self.backend}-{self.device})")

    # ------------------------------------------------------------------ reference
    def reference(self, requires_grad: bool = False, zero_noise: bool = False):
        """(y, x0, leaves): the float64 reference on the CPU, from the same inputs."""
        x = self.x.detach().cpu().double().requires_grad_(requires_grad)
        leaves = [x]
        kw = {}
        if self.noise is not None or zero_noise:
            z = (torch.zeros_like(x) if zero_noise else
                 self.noise.detach().cpu().double().requires_grad_(requires_grad))
            kw["noise"] = z
            leaves.append(z)
        else:
            kw["noise"] = self.z64
        if self.training:
            y, x0 = fd.reference.add_noise(x, self.t.cpu(), SCHED,
                                           prediction_type=self.cfg["prediction_type"], **kw)
        else:
            mo = self.mo.detach().cpu().double().requires_grad_(requires_grad)
            leaves.insert(1, mo)
            if self.history is not None:
                kw["history"] = self.history.detach().cpu().double().requires_grad_(
                    requires_grad)
                self.h_leaf = kw["history"]        # not in leaves: Z stays the last
            y, x0 = fd.reference.ddpm_step(x, mo, self.t.cpu(), self.coeffs, return_x0=True,
                                           **kw)
        return y, x0, leaves

    def rows(self):
        """col(c): the float64 table column c per sample, shaped to broadcast."""
        rows = self.coeffs.table64[self.t.cpu()]
        shape = (-1,) + (1,) * (len(self.shape) - 1)
        return lambda c: rows[:, c].reshape(shape).abs()

    def scales(self):
        """Element-wise error scales of x0 and y: the magnitudes of their terms."""
        col = self.rows()
        x = self.x.double().cpu().abs()
        m = self.model().abs() if not self.training else 0
        y_ref, _, _ = self.reference()
        y_nz, _, _ = self.reference(zero_noise=True)
        sz = (y_ref - y_nz).abs()                            # |σ z|
        b0 = col(Col.U) * x + col(Col.W) * m + col(Col.E) * self.z64.abs()
        if self.launch.thresh is not None:
            b0 = b0 / self.launch.thresh.double().cpu().reshape(col(Col.U).shape)
        h = self.history.double().cpu().abs() if self.history is not None else 0
        by = col(Col.P) * b0 + col(Col.Q) * x + col(Col.R) * m + col(Col.H) * h + sz
        return b0, by

    def model(self) -> torch.Tensor:
        """The model output's prediction channels (float64, CPU)."""
        return self.mo.double().cpu()[:, :self.shape[1]]

    def tol(self) -> float:
        if self.dtype == torch.float64 and self.launch.flags[Flag.CLIP] == Clip.DYNAMIC:
            return F64_DYNAMIC_TOL
        return TOL[self.dtype]


def assert_close_scaled(got, want, scale, tol, what) -> None:
    """|got − want| ≤ tol·(scale + |want| + 1e-3) element-wise (NaN never passes)."""
    got = got.detach().double().cpu()
    err = (got - want).abs()
    lim = tol * (scale + want.abs() + 1e-3)
    bad = ~(err <= lim)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off; first at "
                             f"{i}: got {got[tuple(i)].item()}, want {want[tuple(i)].item()}, "
                             f"max err/lim {(err / lim).max().item():.3g}")


def sample_inputs(backend, configs: Optional[List[dict]] = None, seed: int = 0,
                  dtypes=None) -> Iterator[Case]:
    """Cases for ``backend`` (a tests.conftest.BackendCase): every config × both noise
    sources; shape, dtype and layout cycle through the configs so each appears often."""
    configs = step_configs() if configs is None else configs
    dtypes = list(dtypes or backend.dtypes)
    for k, cfg in enumerate(configs):
        for j, noise in enumerate(("external", "philox")):
            i = 2 * k + j
            shape = SHAPES[i % len(SHAPES)]
            dtype = dtypes[(i // 3) % len(dtypes)]
            layout = Layout.CHANNELS_LAST if (i // 5) % 2 and len(shape) >= 3 and shape[1] > 1 \
                else Layout.CONTIGUOUS
            yield Case(cfg, shape, dtype, layout, noise, backend.name, backend.device,
                       seed=seed * 1000 + i)


def var_mode(case: Case) -> Var:
    return Var(case.launch.flags[Flag.VAR])


__all__ = ["Case", "Launch", "sample_inputs", "step_configs", "config_id", "assert_close_scaled",
           "relayout", "coefficients", "SCHED", "TOL", "SHAPES", "Out"]
