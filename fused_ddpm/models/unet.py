"""Load a diffusers ``UNet2DModel`` directory and wrap it as the sampler's ``model(x, t)``.

:func:`load_unet` takes a directory written by ``UNet2DModel.save_pretrained`` or a pipeline
directory (``model_index.json`` + a ``unet/`` subfolder, e.g. ``DDPMPipeline.save_pretrained``)
and finds the noise schedule next to it (the pipeline's ``scheduler/scheduler_config.json``,
or a ``scheduler_config.json`` beside the UNet's own config).

:class:`MicroBatchedUNet` is what the main job gives :func:`fused_ddpm.sample` (which
itself takes a diffusers UNet as it is): for batch invariance the UNet is always called on
exactly ``micro_batch`` samples, the last chunk padded, so a sample's model output never
depends on how many samples share its batch. CPU convolution and matmul kernels pick their
blocking by batch size, which changes the last bits of every sample's result; at a fixed
call shape the result of a sample does not depend on its neighbours or its position
(tested). Classifier-free guidance is not the wrapper's business: ``fd.sample`` calls the
model on the doubled batch and the fused step forms the guided prediction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["ModelError", "UNetInfo", "find_unet", "load_unet", "MicroBatchedUNet"]


class ModelError(ValueError):
    """The model directory is missing, malformed or of the wrong kind."""


@dataclass(frozen=True)
class UNetInfo:
    """Where a UNet came from and what it takes.

    Attributes:
        unet_dir: the directory holding the UNet's ``config.json`` and weights.
        scheduler_config: the scheduler config found beside it (a dict), or ``None``.
        scheduler_config_path: its path, or ``None``.
        channels: C, the sample's channels; ``image_size``: (H, W).
        out_channels: C, or 2C for a learned variance.
        num_class_embeds: the class-embedding table size, ``None`` for an unconditional UNet.
    """

    unet_dir: Path
    scheduler_config: Optional[dict]
    scheduler_config_path: Optional[Path]
    channels: int
    image_size: tuple
    out_channels: int
    num_class_embeds: Optional[int]

    @property
    def conditional(self) -> bool:
        return self.num_class_embeds is not None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e


def find_unet(path: Union[str, Path]) -> Path:
    """The directory of the ``UNet2DModel`` at ``path`` (``path`` itself, or its ``unet/``
    subfolder when ``path`` is a pipeline directory). Raises :class:`ModelError`."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory (expected a diffusers UNet2DModel "
                         "directory or a pipeline directory with a unet/ subfolder)")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index or not (path / "unet").is_dir():
            kind = index.get("_class_name", "pipeline")
            raise ModelError(f"{path} is a {kind} directory without a unet/ subfolder")
        path = path / "unet"
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} has no config.json: not a diffusers model directory")
    kind = _read_json(config).get("_class_name")
    if kind != "UNet2DModel":
        raise ModelError(f"{path} holds a {kind or 'model of unknown class'}; expected a "
                         "diffusers UNet2DModel")
    return path


def _scheduler_config(unet_dir: Path) -> Optional[Path]:
    beside = unet_dir / "scheduler_config.json"
    if beside.is_file():
        return beside
    parent = unet_dir.parent
    if (parent / "model_index.json").is_file():
        sibling = parent / "scheduler" / "scheduler_config.json"
        if sibling.is_file():
            return sibling
    return None


def load_unet(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
              dtype: torch.dtype = torch.float32):
    """Load the ``UNet2DModel`` at ``path`` in eval mode on ``device`` in ``dtype``.

    Returns ``(unet, info)`` (:class:`UNetInfo`). Raises :class:`ModelError` for a missing
    directory or one of the wrong kind, and for class embeddings other than a plain table.
    """
    unet_dir = find_unet(path)
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a model needs diffusers: pip install diffusers") from e
    from diffusers.utils import logging as diffusers_logging
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()   # no advice about optional packages
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the UNet2DModel in {unet_dir}: {e}") from e
    finally:
        diffusers_logging.set_verbosity(verbosity)
    cfg = unet.config
    if cfg.num_class_embeds is not None and cfg.class_embed_type is not None:
        raise ModelError(f"{unet_dir}: class_embed_type={cfg.class_embed_type!r} is not "
                         "supported (only a table of num_class_embeds integer classes)")
    size = cfg.sample_size
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    sched_path = _scheduler_config(unet_dir)
    info = UNetInfo(unet_dir=unet_dir,
                    scheduler_config=_read_json(sched_path) if sched_path else None,
                    scheduler_config_path=sched_path,
                    channels=int(cfg.in_channels), image_size=size,
                    out_channels=int(cfg.out_channels),
                    num_class_embeds=(int(cfg.num_class_embeds)
                                      if cfg.num_class_embeds is not None else None))
    if info.out_channels not in (info.channels, 2 * info.channels):
        raise ModelError(f"{unet_dir}: out_channels={info.out_channels} is neither "
                         f"in_channels={info.channels} nor twice it")
    unet = unet.to(device=device).eval().requires_grad_(False)
    return unet, info


class MicroBatchedUNet:
    """A UNet as :func:`fused_ddpm.sample`'s model, called on fixed micro-batches.

    ``model(x, t, class_labels=None)`` runs the UNet on consecutive chunks of exactly
    ``micro_batch`` samples (the last one padded) and returns the model output tensor
    ``[B, C', ...]``, so a sample's output never depends on how many samples share its
    batch (see the module docstring). With classifier-free guidance :func:`fused_ddpm.sample`
    passes the doubled batch, whose halves are chunked alike.

    Args:
        unet: a diffusers ``UNet2DModel`` (eval mode).
        micro_batch: samples per UNet call (≥ 1); the result of a sample depends on it but
            not on the batch size the sampler runs.
    """

    def __init__(self, unet, micro_batch: int):
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be an int >= 1, got {micro_batch!r}")
        self.unet = unet
        self.micro_batch = micro_batch

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        B, mb = x.shape[0], self.micro_batch
        chunks = []
        for s in range(0, B, mb):
            xs, ts = x[s:s + mb], t[s:s + mb]
            ys = class_labels[s:s + mb] if class_labels is not None else None
            n = xs.shape[0]
            if n < mb:
                pad = mb - n
                xs = torch.cat([xs, xs.new_zeros((pad,) + xs.shape[1:])])
                ts = torch.cat([ts, ts[:1].expand(pad)])
                if ys is not None:
                    ys = torch.cat([ys, ys[:1].expand(pad)])
            chunks.append(self.unet(xs, ts, class_labels=ys).sample[:n])
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
