"""Logits of whole slices: one forward at the model's size, or overlapping tiles blended.

Testing (:meth:`vpt.tasks.SegmentationTask.predict_volume`) and ``vpt-predict``
(:class:`vpt.inference.SlicePredictor`) both call :func:`slice_logits`, so a run is scored
on exactly the predictions it writes. Tiles use MONAI's ``sliding_window_inference``
(Gaussian importance weights, as nnU-Net blends) rather than a loop of our own.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vpt.data.medical.slicing import SliceGeometry

__all__ = ["slice_logits", "to_original_grid"]


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def slice_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    geometry: Optional[SliceGeometry],
    batch_size: int,
) -> torch.Tensor:
    """Float32 logits of a batch of network-ready slices.

    Args:
        model: Images ``(B, 3, h, w)`` at the model's input size -> logits ``(B, C, h', w')``
            at any resolution.
        inputs: ``(B, 3, H, W)`` on the model's device: at the model's input size without
            tiles, else resampled slices (at least one tile large) of any size.
        geometry: The run's slice geometry; ``None`` or untiled is one forward pass.
        batch_size: Tiles per forward pass.

    Returns:
        Without tiles, the model's logits as they are; with tiles, ``(B, C, H, W)``: every
        tile resized to the model's input, its logits resized back onto the tile and
        blended with Gaussian weights where tiles overlap.
    """
    if geometry is None or not geometry.tiled:
        return model(inputs).float()
    from monai.inferers import sliding_window_inference

    model_size = geometry.model_size

    def predict_tiles(tiles: torch.Tensor) -> torch.Tensor:
        logits = model(_resize(tiles, model_size)).float()
        return _resize(logits, tuple(tiles.shape[-2:]))

    return sliding_window_inference(
        inputs,
        roi_size=geometry.patch_size,
        sw_batch_size=int(batch_size),
        predictor=predict_tiles,
        overlap=geometry.tile_overlap,
        mode="gaussian",
    )


def to_original_grid(
    logits: torch.Tensor, out_size: tuple[int, int], valid_size: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """Logits back on the slice's own grid: padding cut off (``valid_size``), then resized
    bilinearly to ``out_size``."""
    if valid_size is not None:
        logits = logits[..., : int(valid_size[0]), : int(valid_size[1])]
    return _resize(logits, out_size)
