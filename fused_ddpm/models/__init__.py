"""Models for the main job (``python -m fused_ddpm.sample``).

* :data:`DEFAULT_MODEL`: the embedded default model, a class-conditional diffusers
  ``UNet2DModel`` on 16×16 handwritten digits, in diffusers' pipeline layout
  (``unet/``, ``scheduler/``), trained by ``scripts/train_digits.py``;
* :mod:`.data`: its training data and the held-out split;
* :mod:`.unet`: loading any diffusers ``UNet2DModel`` directory, and the model wrapper the
  sampler calls (batch-invariant micro-batches).
"""
from .data import MODEL_DIR as DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL"]
