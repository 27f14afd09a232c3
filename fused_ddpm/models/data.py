"""The handwritten digits the embedded default model is trained on, and where that model lives.

scikit-learn's bundled ``load_digits`` (1797 grey 8×8 images, values 0..16, labels 0..9; no
download) upsampled bilinearly to 16×16 and scaled to [−1, 1]. The split is a fixed rule,
not a random draw: image k is held out when ``k % HELD_OUT_EVERY == 0`` (360 images), the
rest (1437) is for training. The training script uses only the training part;
:func:`digit_classifier` is trained on the held-out part and labels generated samples (the
quality test and ``scripts/bench_main_job.py --accuracy``).

scikit-learn is needed only to load the data (not to sample from the shipped model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MODEL_DIR", "IMAGE_SIZE", "NUM_CLASSES", "NULL_CLASS", "HELD_OUT_EVERY",
           "load_digits16", "digit_classifier", "classifier_features"]

MODEL_DIR = Path(__file__).resolve().parent / "digits"
"""The shipped model: a diffusers pipeline directory (``unet/`` + ``scheduler/``)."""

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
"""The class index the model was trained with for "no label" (classifier-free guidance):
the last of its ``NUM_CLASSES + 1`` class embeddings."""
HELD_OUT_EVERY = 5

SPLITS = ("train", "heldout", "all")


def load_digits16(split: str = "train") -> Tuple[Tensor, Tensor]:
    """The digits of ``split`` (``"train"``, ``"heldout"`` or ``"all"``).

    Returns:
        images: float32 ``[n, 1, 16, 16]`` in [−1, 1] (0 = the 8×8 value 8 of 16);
        labels: int64 ``[n]`` in 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; expected one of {list(SPLITS)}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    x8 = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    x16 = F.interpolate(x8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                        align_corners=False).clamp(-1.0, 1.0)
    k = torch.arange(labels.numel())
    if split == "train":
        keep = k % HELD_OUT_EVERY != 0
    elif split == "heldout":
        keep = k % HELD_OUT_EVERY == 0
    else:  # all
        keep = torch.ones_like(k, dtype=torch.bool)
    return x16[keep].contiguous(), labels[keep].contiguous()


def classifier_features(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 images ``[n, 16, 16, 1]`` (the sampler's output format) → float32 ``[n, 64]``:
    the 8×8 average-pooled image in [−1, 1], flattened."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.avg_pool2d(x, 2).flatten(1).numpy()


def digit_classifier():
    """A judge of generated digits: an SVM (scikit-learn's ``SVC``) trained on the held-out
    digits, which the model never saw. Returns ``(classifier, accuracy)``, the accuracy on
    the real training digits. ``classifier.predict(classifier_features(images))`` labels
    uint8 ``[n, 16, 16, 1]`` images."""
    from sklearn.svm import SVC

    from ..sample_job import to_uint8_images
    heldout, heldout_labels = load_digits16("heldout")
    train, train_labels = load_digits16("train")
    clf = SVC().fit(classifier_features(to_uint8_images(heldout)), heldout_labels.numpy())
    real = float(clf.score(classifier_features(to_uint8_images(train)), train_labels.numpy()))
    return clf, real
