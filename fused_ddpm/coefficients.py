"""Coefficient tables: :class:`StepConfig`, :class:`StepCoefficients`, :func:`step_coefficients`.

A :class:`StepCoefficients` is built in one way only (its constructor): from a schedule, a
config, the visited timesteps and a precision policy, the row builder of the config's
method (:mod:`fused_ddpm.methods`) makes the float64 host table ``table64``
(``[R, NUM_COLS]``, columns :class:`fused_ddpm.contract.Col`), and everything the kernels
need follows from it: the float32 device table (copied once per device and dtype, kept as
long as the coefficients live), the TERMS mask (columns nonzero in some row), the
clip/variance modes and the noise stream. The kernels look rows up by the actual timestep
t (or by step position, for methods indexed by step), so no host sync is needed per step.

Rows of timesteps outside the inference schedule step to the largest scheduled timestep
below them (or to "before the first step"), so every row is a valid step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import methods
from .contract import TERM_COLS, Clip, Col, NoiseStream, Var, terms_mask
from .methods import METHODS, PREDICTIONS, VARIANCES, lookup
from .schedule import NoiseSchedule, inference_timesteps, sigmas_at

__all__ = ["StepConfig", "StepCoefficients", "step_coefficients", "add_noise_coefficients",
           "previous_timesteps", "METHODS", "STEP_METHODS", "PREDICTION_TYPES",
           "VARIANCE_TYPES"]

PREDICTION_TYPES = tuple(PREDICTIONS)
VARIANCE_TYPES = tuple(VARIANCES)
#: step methods that take a model output (what step_coefficients builds)
STEP_METHODS = tuple(name for name, m in METHODS.items() if m.samples)

#: options a method may read (Method.options), with the value that means "not used"
_OPTION_DEFAULTS: Dict[str, Any] = {"eta": 0.0, "use_clipped_model_output": False,
                                    "set_alpha_to_one": True, "solver_order": 2,
                                    "solver_type": "midpoint", "lower_order_final": True,
                                    "euler_at_final": False, "final_sigmas_type": "zero"}
#: the DPM-Solver++ orders the kernels' affine form covers (3 would need a second history)
SOLVER_ORDERS = (1, 2)


@dataclass(frozen=True)
class StepConfig:
    """What a step does, independent of the schedule. See :func:`step_coefficients`.

    Options a method does not read (``eta``, ``use_clipped_model_output``,
    ``set_alpha_to_one`` with ``method="ddpm"``; the DPM-Solver++ options ``solver_order``
    (1 or 2), ``solver_type`` ("midpoint", "heun"), ``lower_order_final``,
    ``euler_at_final``, ``final_sigmas_type`` ("zero", "sigma_min") with a method other
    than ``"dpmsolver++"`` / ``"sde-dpmsolver++"``) must keep their defaults: anything else
    is a ValueError, never silently ignored. DDIM, DPM-Solver++ and Euler ancestral take
    their own σ; with a learned variance type they take the 2C-channel model output and
    ignore the variance half.
    """

    method: str = "ddpm"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample_range: Optional[float] = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    eta: float = 0.0
    use_clipped_model_output: bool = False
    set_alpha_to_one: bool = True
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        method = lookup(METHODS, "method", self.method)
        lookup(PREDICTIONS, "prediction_type", self.prediction_type)
        lookup(VARIANCES, "variance_type", self.variance_type)
        if self.variance_type not in method.variance_types:
            raise ValueError(f"variance_type={self.variance_type!r} does not apply to "
                             f"method={self.method!r}; expected one of "
                             f"{list(method.variance_types)}")
        for name, default in _OPTION_DEFAULTS.items():
            if name not in method.options and getattr(self, name) != default:
                users = [m for m, e in METHODS.items() if name in e.options]
                raise ValueError(f"{name}={getattr(self, name)!r} does not apply to "
                                 f"method={self.method!r} (only to {users})")
        if self.clip_sample_range is not None and not (float(self.clip_sample_range) > 0):
            raise ValueError(f"clip_sample_range must be a positive float or None, "
                             f"got {self.clip_sample_range!r}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], "
                             f"got {self.dynamic_thresholding_ratio!r}")
        if not self.sample_max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {self.sample_max_value!r}")
        if not self.eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if isinstance(self.solver_order, bool) or self.solver_order not in SOLVER_ORDERS:
            raise ValueError(f"solver_order={self.solver_order!r} is not supported; expected "
                             f"one of {list(SOLVER_ORDERS)}")
        lookup(methods.SOLVER_TYPES, "solver_type", self.solver_type)
        lookup(methods.FINAL_SIGMAS, "final_sigmas_type", self.final_sigmas_type)
        if self.clips and not method.clips:
            raise ValueError(f"method={self.method!r} does not clip (clip_sample_range and "
                             f"thresholding must stay unset)")

    @property
    def clips(self) -> bool:
        """True when x̂0 is clipped or thresholded before the posterior mean."""
        return self.thresholding or self.clip_sample_range is not None

    @property
    def model_channels(self) -> int:
        """1, or 2 when the model output carries C variance channels after the C channels of
        the prediction (learned variance types, for every method)."""
        return lookup(VARIANCES, "variance_type", self.variance_type).channels

    @property
    def learned_variance(self) -> bool:
        """True when the model output has 2C channels (the second half: the variance)."""
        return self.model_channels == 2

    @property
    def variance_mode(self) -> Var:
        """How the kernels form σ: DDIM's σ is its own (η), whatever the variance type."""
        if lookup(METHODS, "method", self.method).own_sigma:
            return Var.FIXED
        return lookup(VARIANCES, "variance_type", self.variance_type).mode

    @property
    def clip_mode(self) -> Clip:
        if self.thresholding:
            return Clip.DYNAMIC
        return Clip.STATIC if self.clip_sample_range is not None else Clip.NONE


def previous_timesteps(timesteps: Tensor, num_train_timesteps: int) -> Tensor:
    """For every training timestep t, the largest scheduled timestep below t, or −1.

    ``timesteps``: the descending schedule, int64 ``[n]``. Returns int64 CPU ``[T]``.
    """
    asc = torch.sort(timesteps.cpu()).values
    t = torch.arange(num_train_timesteps, dtype=torch.int64)
    pos = torch.searchsorted(asc, t, right=False) - 1  # last scheduled value < t
    return torch.where(pos >= 0, asc[pos.clamp(min=0)], torch.full_like(t, -1))


def _step_schedule(timesteps, sigmas, T: int) -> Tuple[Tensor, Tensor]:
    """Checked (timesteps ``[n]``: int64, or float64 when fractional; sigmas float64
    ``[n + 1]``) of a table indexed by step."""
    if sigmas is None:
        raise ValueError("a method indexed by step needs sigmas (float [n + 1])")
    ts = torch.as_tensor(timesteps).to("cpu").reshape(-1)
    ts = ts.double() if ts.dtype.is_floating_point else ts.to(torch.int64)
    if ts.dtype == torch.float64 and bool((ts == ts.round()).all()):
        ts = ts.to(torch.int64)
    if ts.numel() == 0 or not bool(torch.isfinite(ts.double()).all()) or \
            bool((ts[1:] > ts[:-1]).any()) or float(ts[0]) > T - 1 or float(ts[-1]) < 0:
        raise ValueError(f"timesteps must be a non-empty, non-increasing list in "
                         f"[0, {T - 1}], got {ts.tolist()}")
    sig = torch.as_tensor(sigmas).to("cpu", torch.float64).reshape(-1)
    if sig.numel() != ts.numel() + 1:
        raise ValueError(f"sigmas must have n + 1 = {ts.numel() + 1} entries (one per step, "
                         f"then the final sigma), got {sig.numel()}")
    if not bool(torch.isfinite(sig).all()) or bool((sig[1:] >= sig[:-1]).any()) or \
            float(sig[-1]) < 0:
        raise ValueError(f"sigmas must be finite, strictly decreasing and >= 0, got "
                         f"{sig.tolist()}")
    return ts, sig


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """An immutable coefficient table plus everything it was built from.

    Args (the only way to build one; :func:`step_coefficients` is the convenient front):
        schedule: the :class:`NoiseSchedule`.
        config: the :class:`StepConfig`.
        timesteps: CPU ``[n]``, the descending timesteps a sampler visits (what the model
            is given at each step): int64; for methods indexed by step also float64 when
            fractional (Euler with ``linspace`` spacing), non-increasing.
        step_gap: ``None``: a step from t goes to the next scheduled timestep below t;
            an int k: to t − k (diffusers' ``DDIMScheduler`` rule), −1 below 0.
        precision: ``"float64"`` or ``"diffusers_float32"`` (:mod:`fused_ddpm.methods`).
        device: where :attr:`table` lives (the device of the tensors you will step).
        sigmas: methods indexed by step only (and required there): float64 ``[n + 1]``, the
            strictly decreasing sigma sequence σ_0 … σ_n (σ_n the final sigma, ≥ 0).
        timestep_spacing: the spacing the timesteps were made with, if any (only Euler's
            :attr:`init_noise_sigma` reads it).

    Derived attributes:
        prev_timesteps: int64 CPU ``[T]``, the timestep each row steps to (−1: the end);
            None for methods indexed by step.
        table64: float64 CPU ``[R, NUM_COLS]``, the table (R = T rows, one per training
            timestep, for methods indexed by timestep; R = n rows, one per step, for methods
            indexed by step).
        table: float32 ``[R, NUM_COLS]`` on ``device``, what the kernels read.
        rows: int64 CPU ``[n]``, the row each visited step reads (the t to pass): the
            timestep, or the step position 0 … n − 1 for methods indexed by step.
        terms: the TERMS flag (bit ``Col.X`` set iff column X is nonzero in some row).
        reads_history: per row, whether its step reads the previous x̂0 (H ≠ 0).
        index_by: ``"timestep"`` or ``"step"``; noise_stream: the Philox stream word.
    """

    schedule: NoiseSchedule
    config: StepConfig
    timesteps: Tensor
    step_gap: Optional[int] = None
    precision: str = "float64"
    device: torch.device = torch.device("cpu")
    sigmas: Optional[Tensor] = None
    prev_timesteps: Optional[Tensor] = field(init=False, repr=False)
    table64: Tensor = field(init=False, repr=False)
    rows: Tensor = field(init=False, repr=False)
    terms: int = field(init=False, repr=False)
    index_by: str = field(init=False, repr=False)
    noise_stream: NoiseStream = field(init=False, repr=False)
    timestep_spacing: Optional[str] = field(default=None, repr=False)
    _cache: Dict[Tuple[str, str, Any], Tensor] = field(init=False, repr=False)
    _plans: Dict[tuple, Any] = field(init=False, repr=False)
    _fast: Dict[Any, Any] = field(init=False, repr=False)
    reads_history: Tuple[bool, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fused_ddpm.NoiseSchedule, got "
                            f"{type(self.schedule).__name__}")
        if not isinstance(self.config, StepConfig):
            raise TypeError(f"config must be a StepConfig, got {type(self.config).__name__}")
        lookup(methods.PRECISIONS, "precision", self.precision)
        method = lookup(METHODS, "method", self.config.method)
        T = self.schedule.num_train_timesteps
        if method.index_by == "step":
            ts, sigmas = _step_schedule(self.timesteps, self.sigmas, T)
            prev, rows, stream = None, torch.arange(ts.numel()), NoiseStream.STEP
            if self.step_gap is not None:
                raise ValueError(f"step_gap does not apply to method={self.config.method!r}")
        else:
            if self.sigmas is not None:
                raise ValueError(f"sigmas does not apply to method={self.config.method!r} "
                                 f"(a table indexed by timestep)")
            ts = torch.as_tensor(self.timesteps).to("cpu", torch.int64).reshape(-1)
            if ts.numel() == 0 or bool((ts[1:] >= ts[:-1]).any()) or int(ts[0]) >= T or \
                    int(ts[-1]) < 0:
                raise ValueError(f"timesteps must be a non-empty, strictly descending list in "
                                 f"[0, {T}), got {ts.tolist()}")
            if self.step_gap is None:
                prev = previous_timesteps(ts, T)
            elif isinstance(self.step_gap, int) and self.step_gap >= 1:
                prev = torch.arange(T, dtype=torch.int64) - self.step_gap
                prev = torch.where(prev >= 0, prev, torch.full_like(prev, -1))
            else:
                raise ValueError(f"step_gap must be None or a positive int, got "
                                 f"{self.step_gap!r}")
            sigmas, rows, stream = None, ts, NoiseStream.TIMESTEP
        table64 = methods.build_table(self.schedule.alphas_cumprod, prev, self.config,
                                      self.precision, sigmas)
        finite = torch.isfinite(table64[rows]).all(dim=1)
        if not bool(finite.all()):
            bad = rows[~finite].tolist()
            why = ("a second-order DPM-Solver++ step to σ = 0 there: use final_sigmas_type="
                   "'zero' or lower_order_final" if method.index_by == "step" else
                   "ᾱ_t = 0 there: a zero-terminal-SNR schedule needs "
                   "prediction_type='v_prediction' or 'sample'")
            raise ValueError(f"the schedule gives non-finite step coefficients at rows "
                             f"{bad[:8]} ({why})")
        nonzero = [c for c in TERM_COLS if bool((table64[:, c] != 0).any())]
        setters = dict(timesteps=ts, sigmas=sigmas, prev_timesteps=prev, table64=table64,
                       rows=rows, terms=terms_mask(nonzero), index_by=method.index_by,
                       noise_stream=stream, device=torch.device(self.device),
                       _cache={}, _plans={}, _fast={},
                       reads_history=tuple((table64[:, int(Col.H)] != 0).tolist()))
        for name, value in setters.items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ derived facts
    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def num_rows(self) -> int:
        """R, the number of table rows (valid t values are 0 … R − 1)."""
        return self.table64.shape[0]

    @property
    def multistep(self) -> bool:
        """Whether the step reads the previous step's x̂0 (``history``): the H column is
        nonzero in some row (DPM-Solver++ of order 2)."""
        return bool(self.terms >> int(Col.H) & 1)

    @property
    def input_scale(self) -> Tensor:
        """float64 ``[n]``: the model is called on ``x · input_scale[i]`` at step i — methods
        in sigma space x = x0 + σ·ε (Euler ancestral) give the model the variance-preserving
        x/√(σ_i² + 1) (diffusers' ``scale_model_input``); 1 for the others."""
        if METHODS[self.config.method].sigma_space:
            return 1 / (self.sigmas[:-1] ** 2 + 1) ** 0.5
        return torch.ones(self.timesteps.numel(), dtype=torch.float64)

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of x at the first step: x_T = N(0, I)·init_noise_sigma.
        Methods in sigma space (Euler ancestral): σ_max, or √(σ_max² + 1) with ``leading``
        spacing (as diffusers' ``EulerAncestralDiscreteScheduler``); 1 for the others."""
        if METHODS[self.config.method].sigma_space:
            smax = float(self.sigmas.max())
            return (smax ** 2 + 1) ** 0.5 if self.timestep_spacing == "leading" else smax
        return 1.0

    @property
    def adds_noise(self) -> bool:
        """Whether some row has a noise term (σ or E nonzero): the step needs z."""
        return bool(self.terms & ((1 << Col.S) | (1 << Col.E)))

    @property
    def table(self) -> Tensor:
        """float32 ``[R, NUM_COLS]`` on :attr:`device`."""
        return self.table_on(self.device)

    # ------------------------------------------------------------------ the device cache
    def cached(self, what: str, device: Union[str, torch.device], key: Any,
               make: Callable[[], Tensor]) -> Tensor:
        """The one device cache: ``make()`` (a tensor on ``device``) made once per
        (what, device, key) and kept as long as these coefficients live.

        Entries are never dropped (they are few: a table per dtype and an index tensor per
        device), so a kernel still reading one on another stream is never left with freed
        memory. While a CUDA graph is being captured a missing entry is made but not kept:
        its contents exist only when the graph replays.
        """
        device = torch.device(device)
        k = (what, str(device), key)
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        if _is_capturing(device):
            if what == "table":
                raise RuntimeError(f"the coefficient table is not on {device} yet: run one "
                                   f"eager step (or call coeffs.table_on({str(device)!r})) "
                                   f"before capturing a CUDA graph")
            return make()
        value = make()
        self._cache[k] = value
        return value

    def table_on(self, device: Union[str, torch.device], dtype: torch.dtype = torch.float32
                 ) -> Tensor:
        """The table on ``device`` in ``dtype`` (float32; float64 for float64 steps).

        Copies once per (device, dtype) and reuses the copy afterwards."""
        if torch.device(device).type == "cpu" and dtype == torch.float64:
            return self.table64
        return self.cached("table", device, dtype,
                           lambda: self.table64.to(device=device, dtype=dtype).contiguous())

    def row_numbers(self, device: torch.device) -> Tensor:
        """int64 ``[R]`` on ``device`` holding 0 … R − 1 (cached)."""
        return self.cached("rows", device, None,
                           lambda: torch.arange(self.num_rows, dtype=torch.int64,
                                                device=device))

    def row_index(self, t: int, device: torch.device) -> Tensor:
        """int64 0-d tensor on ``device`` holding row ``t`` (a view: no kernel, no copy)."""
        return self.row_numbers(device)[t]

    def visited_rows_on(self, device: Union[str, torch.device]) -> Tensor:
        """:attr:`rows` (the row of each step) as int64 on ``device``."""
        return self.cached("visited", device, None, lambda: self.rows.to(device))

    def to(self, device: Union[str, torch.device]) -> "StepCoefficients":
        """The same coefficients with :attr:`table` on ``device``."""
        return dataclasses.replace(self, device=torch.device(device))

    def __repr__(self) -> str:
        return (f"StepCoefficients({self.config}, {self.schedule!r}, "
                f"steps={self.timesteps.numel()}, precision={self.precision!r}, "
                f"device={self.device})")


def step_coefficients(schedule: NoiseSchedule,
                      method: str = "ddpm",
                      prediction_type: str = "epsilon",
                      variance_type: str = "fixed_small",
                      clip_sample_range: Optional[float] = None,
                      num_inference_steps: Optional[int] = None,
                      timestep_spacing: Optional[str] = None,
                      device: Union[str, torch.device] = "cpu",
                      *,
                      steps_offset: int = 0,
                      timesteps: Optional[Sequence[float]] = None,
                      sigmas: Optional[Sequence[float]] = None,
                      thresholding: bool = False,
                      dynamic_thresholding_ratio: float = 0.995,
                      sample_max_value: float = 1.0,
                      eta: float = 0.0,
                      use_clipped_model_output: bool = False,
                      set_alpha_to_one: bool = True,
                      solver_order: int = 2,
                      solver_type: str = "midpoint",
                      lower_order_final: bool = True,
                      euler_at_final: bool = False,
                      final_sigmas_type: str = "zero",
                      step_gap: Optional[int] = None,
                      precision: str = "float64") -> StepCoefficients:
    """Build the coefficient table of a sampler step (formulas: ``docs/samplers.md``).

    Args:
        schedule: the training :class:`NoiseSchedule`.
        method: ``"ddpm"``, ``"ddim"`` (with ``eta``, ``use_clipped_model_output`` and
            ``set_alpha_to_one`` as in diffusers' ``DDIMScheduler``), ``"dpmsolver++"`` /
            ``"sde-dpmsolver++"`` (diffusers' ``DPMSolverMultistepScheduler`` with that
            ``algorithm_type``; ``solver_order`` 1 or 2, ``solver_type`` "midpoint" or
            "heun", ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type`` "zero"
            or "sigma_min") or ``"euler_ancestral"`` (diffusers'
            ``EulerAncestralDiscreteScheduler``: final sigma 0). Options a
            method does not read must keep their defaults.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        variance_type: ``"fixed_small"``, ``"fixed_small_log"``, ``"fixed_large"``,
            ``"learned"`` (the model's variance channels hold σ², diffusers' convention),
            ``"learned_range"`` (they hold v ∈ [−1, 1] interpolating log σ² between log β̃ and
            log β) or ``"learned_log"`` (they hold log σ², improved-diffusion's ``LEARNED``).
            The learned types expect a 2C-channel model output. The methods with their own
            σ (DDIM, DPM-Solver++, Euler ancestral) take ``"fixed_small"`` (the default) or
            a learned type, whose variance half they ignore.
        clip_sample_range: clip x̂0 to [−c, c]; ``None`` for no clipping.
        num_inference_steps, timestep_spacing, steps_offset, timesteps: the inference
            schedule, with the rules of the method's diffusers scheduler (DDPM/DDIM:
            :func:`fused_ddpm.schedule.inference_timesteps`, default spacing ``"leading"``;
            DPM-Solver++: :func:`~fused_ddpm.schedule.dpmsolver_timesteps`, Euler:
            :func:`~fused_ddpm.schedule.euler_timesteps`, default ``"linspace"``). DDPM/DDIM
            step from t to the next scheduled timestep below it (or to t − ``step_gap``).
        sigmas: methods indexed by step: an explicit sigma sequence ``[n + 1]`` (strictly
            decreasing, the last entry the final sigma), e.g. a diffusers scheduler's
            ``sigmas`` (Karras, exponential, ... sigmas); needs ``timesteps`` (``[n]``, what
            the model is given). Without it, σ_i = √((1 − ᾱ)/ᾱ) at timesteps[i] (linearly
            interpolated for fractional timesteps), then the final sigma.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic
            thresholding (wins over ``clip_sample_range``, as in diffusers).
        device: where the float32 table lives (the device of the tensors you will step).
        step_gap: ``None`` (default): a step from t goes to the next scheduled timestep; an
            int k: to t − k (diffusers' ``DDIMScheduler`` rule for every spacing).
        precision: ``"float64"`` (default) or ``"diffusers_float32"`` (diffusers' float32
            arithmetic, for output parity with diffusers' schedulers).

    Returns:
        :class:`StepCoefficients`: ``table`` float32 ``[R, NUM_COLS]`` on ``device``,
        ``table64`` float64 on the CPU, ``timesteps`` ``[n]``; for methods indexed by step
        also ``sigmas`` float64 ``[n + 1]``, and R = n (pass the step position as t).

    Raises:
        ValueError for unknown names, out-of-range values, options the method does not
        read, and schedules that give non-finite coefficients at a visited row;
        TypeError for a schedule that is not a :class:`NoiseSchedule`.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fused_ddpm.NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    spec = lookup(METHODS, "method", method)
    if spec.samples is False:
        raise ValueError(f"method={method!r} is not a sampler step; expected one of "
                         f"{list(STEP_METHODS)} (use fused_ddpm.add_noise for 'add_noise')")
    if clip_sample_range is not None:
        clip_sample_range = float(clip_sample_range)
    cfg = StepConfig(method, prediction_type, variance_type, clip_sample_range,
                     bool(thresholding), float(dynamic_thresholding_ratio),
                     float(sample_max_value), float(eta), bool(use_clipped_model_output),
                     bool(set_alpha_to_one), solver_order, solver_type,
                     bool(lower_order_final), bool(euler_at_final), final_sigmas_type)
    spacing = spec.default_spacing if timestep_spacing is None else timestep_spacing
    T = schedule.num_train_timesteps
    if spec.index_by == "timestep":
        if sigmas is not None:
            raise ValueError(f"sigmas does not apply to method={method!r}")
        ts = inference_timesteps(T, num_inference_steps, spacing, steps_offset, timesteps)
        return StepCoefficients(schedule, cfg, ts, step_gap=step_gap, precision=precision,
                                device=torch.device(device), timestep_spacing=spacing)
    if timesteps is not None or sigmas is not None:
        if num_inference_steps is not None:
            raise ValueError("pass either num_inference_steps or timesteps (and sigmas), "
                             "not both")
        if timesteps is None:
            raise ValueError("sigmas needs timesteps (what the model is given at each step)")
        ts = torch.as_tensor(timesteps).to("cpu").reshape(-1)
    else:
        if num_inference_steps is None:
            raise ValueError(f"method={method!r} needs num_inference_steps (or timesteps)")
        ts = spec.timesteps(T, num_inference_steps, spacing, steps_offset)
    if sigmas is None:
        final = lookup(methods.FINAL_SIGMAS, "final_sigmas_type",
                       final_sigmas_type)(schedule.alphas_cumprod)
        sigmas = torch.cat([sigmas_at(schedule.alphas_cumprod, ts.double()),
                            torch.tensor([final], dtype=torch.float64)])
    return StepCoefficients(schedule, cfg, ts, step_gap=step_gap, precision=precision,
                            device=torch.device(device), sigmas=torch.as_tensor(sigmas),
                            timestep_spacing=spacing)


def add_noise_coefficients(schedule: NoiseSchedule, prediction_type: str = "epsilon",
                           precision: str = "float64") -> StepCoefficients:
    """The table of the training-side step x0 → (x_t, target) (:func:`fused_ddpm.add_noise`):
    one row per training timestep, Y = √ᾱ_t·x0 + √(1−ᾱ_t)·z and X0 = the target."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fused_ddpm.NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    cfg = StepConfig("add_noise", prediction_type)
    T = schedule.num_train_timesteps
    return StepCoefficients(schedule, cfg, torch.arange(T - 1, -1, -1), precision=precision)
