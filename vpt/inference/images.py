"""Outputs of 2D segmentation: a class-index mask PNG, an overlay picture, optional probabilities."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vpt.inference.outputs import write_new_files
from vpt.runs import _ORGAN_COLOURS

__all__ = ["overlay_picture", "write_mask_png", "write_overlay_png", "write_probability_npz"]

_logger = logging.getLogger(__name__)

# The blend of the run folder's test_overlays.png, so both pictures read the same.
_OVERLAY_ALPHA = 0.45


def overlay_picture(rgb: np.ndarray, labels: np.ndarray, alpha: float = _OVERLAY_ALPHA) -> np.ndarray:
    """The image with each foreground class blended in its colour (the run pictures' palette).

    Args:
        rgb: uint8 ``(H, W, 3)``.
        labels: ``(H, W)`` class indices; 0 (background) stays uncoloured.
        alpha: Weight of the class colour.

    Returns:
        uint8 ``(H, W, 3)``.
    """
    base = rgb.astype(np.float32) / 255.0
    colours = _ORGAN_COLOURS[labels % len(_ORGAN_COLOURS)]
    blended = np.where((labels > 0)[..., None], (1.0 - alpha) * base + alpha * colours, base)
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def write_mask_png(labels: np.ndarray, path: Path) -> list[Path]:
    """Write class indices as a single-channel PNG (8-bit up to 256 classes, else 16-bit).

    Args:
        labels: ``(H, W)`` class indices.
        path: The ``.png`` file (never replaced).

    Returns:
        The files written.
    """
    from PIL import Image

    values = labels.astype(np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16)
    return write_new_files(path, lambda target: Image.fromarray(values).save(target))


def write_overlay_png(rgb: np.ndarray, labels: np.ndarray, path: Path) -> list[Path]:
    """Write :func:`overlay_picture` of ``rgb`` (uint8 ``(H, W, 3)``) and ``labels`` (``(H, W)``) to ``path``."""
    from PIL import Image

    picture = overlay_picture(rgb, labels)
    return write_new_files(path, lambda target: Image.fromarray(picture).save(target))


def write_probability_npz(probabilities: np.ndarray, path: Path) -> list[Path]:
    """Write float32 ``(H, W, C)`` class probabilities as ``probabilities`` in a compressed ``.npz``."""
    values = np.asarray(probabilities, dtype=np.float32)
    return write_new_files(path, lambda target: np.savez_compressed(target, probabilities=values))
