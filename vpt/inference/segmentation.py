"""Slice-wise segmentation of unlabelled volumes and 2D images, as the run's testing did it.

Preprocessing is the object the data module's test volumes use
(:class:`vpt.data.medical.slice_inputs.SegmentationPreprocessing`, rebuilt from the run's
saved record). Prediction mirrors :meth:`SegmentationTask.predict_volume` through the same
function (:func:`vpt.inference.tiling.slice_logits`): whole-slice or blended-tile logits,
padding cut off, resized bilinearly to the original slice size; the label is their argmax
and the probabilities their softmax.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpt.data.medical.slice_inputs import SegmentationPreprocessing
from vpt.data.medical.slicing import SliceGeometry
from vpt.data.medical.windowing import label_dtype
from vpt.inference.tiling import slice_logits, to_original_grid

__all__ = ["SegmentationPreprocessing", "SlicePredictor", "label_dtype"]

_logger = logging.getLogger(__name__)


class SlicePredictor:
    """Batched slice prediction with probabilities at the original resolution.

    Args:
        model: Images ``(B, 3, H, W)`` -> logits ``(B, C, h, w)`` (the run's network, in eval mode).
        device: Where ``model`` lives.
        batch_size: Slices per forward pass.
        autocast: Returns the precision context the run was tested under.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        autocast: Callable[[], ContextManager[Any]],
    ) -> None:
        self.model = model
        self.device = device
        self.batch_size = int(batch_size)
        self.autocast = autocast

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's logits for one batch.

        Args:
            inputs: ``(B, 3, H, W)`` model inputs.

        Returns:
            float32 ``(B, C, h, w)`` on the device, at the network's output resolution.
        """
        with self.autocast():
            logits = self.model(inputs.to(self.device))
        return logits.float()

    @staticmethod
    def resize(logits: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``(B, C, h, w)`` logits resized bilinearly to ``out_size``, as ``predict_volume`` does."""
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def slice_logits(
        self,
        inputs: torch.Tensor,
        geometry: Optional[SliceGeometry],
        out_size: tuple[int, int],
        valid_size: Optional[tuple[int, int]],
    ) -> torch.Tensor:
        """Float32 logits of network inputs on the slices' own grid ``out_size`` (whole slices
        or blended tiles, as testing computes them)."""
        with self.autocast():
            logits = slice_logits(self.model, inputs.to(self.device), geometry, self.batch_size)
        return to_original_grid(logits.float(), out_size, valid_size)

    @torch.inference_mode()
    def predict_volume(
        self,
        unit_volume: np.ndarray,
        preprocessing: SegmentationPreprocessing,
        probabilities: bool = False,
        on_batch: Optional[Callable[[int], object]] = None,
        spacing: Optional[Sequence[float]] = None,
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Labels (and probabilities) of a whole volume, ``batch_size`` slices at a time.

        Args:
            unit_volume: float32 ``(D, H0, W0)`` in [0, 1] (see :meth:`SegmentationPreprocessing.unit_volume`).
            preprocessing: Context, resampling, resizing and normalisation.
            probabilities: Also return the class probabilities.
            on_batch: Called with the number of slices done after each batch (progress).
            spacing: In-plane pixel size ``(y, x)`` in mm, for runs trained at a set spacing.

        Returns:
            ``(labels, probabilities)``: labels ``(D, H0, W0)`` in the smallest unsigned type
            for the C classes, probabilities float32 ``(D, H0, W0, C)`` (channel last, as a
            vector image stores them) or ``None``.
        """
        depth, height, width = unit_volume.shape
        labels: Optional[np.ndarray] = None
        scores: Optional[np.ndarray] = None
        for start in range(0, depth, self.batch_size):
            stop = min(start + self.batch_size, depth)
            inputs = preprocessing.volume_inputs(unit_volume, start, stop, spacing)
            valid = preprocessing.valid_size((height, width), spacing)
            logits = self.slice_logits(inputs, preprocessing.geometry, (height, width), valid)
            if labels is None:  # the class count is known from the first logits
                num_classes = logits.shape[1]
                labels = np.zeros((depth, height, width), dtype=label_dtype(num_classes))
                if probabilities:
                    scores = np.zeros((depth, height, width, num_classes), dtype=np.float32)
            labels[start:stop] = logits.argmax(dim=1).cpu().numpy()
            if scores is not None:
                scores[start:stop] = logits.softmax(dim=1).permute(0, 2, 3, 1).cpu().numpy()
            if on_batch is not None:
                on_batch(stop - start)
        assert labels is not None, "a volume has at least one slice"
        return labels, scores

    @torch.inference_mode()
    def predict_images(
        self,
        unit_images: Sequence[np.ndarray],
        preprocessing: SegmentationPreprocessing,
        probabilities: bool = False,
    ) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
        """Labels (and probabilities) of 2D images of any sizes, in one forward pass.

        Args:
            unit_images: float32 ``(H0, W0)`` or ``(H0, W0, 3)`` images in [0, 1]; at most
                ``batch_size`` of them (the caller batches).
            preprocessing: Resizing and normalisation.
            probabilities: Also return the class probabilities.

        Returns:
            Per image ``(labels (H0, W0) int64, probabilities (H0, W0, C) float32 or None)``.
        """
        geometry = preprocessing.geometry
        tiled = geometry is not None and geometry.tiled
        batch_logits = None if tiled else self.logits(preprocessing.model_inputs(unit_images))
        results = []
        for position, unit in enumerate(unit_images):
            size = tuple(unit.shape[:2])
            if batch_logits is None:  # tiles: each image at its own size
                inputs = preprocessing.model_inputs([unit])
                logits = self.slice_logits(inputs, geometry, size, preprocessing.valid_size(size))  # type: ignore[arg-type]
            else:
                # Each image returns to its own size, so the logits are resized one by one.
                logits = self.resize(batch_logits[position : position + 1], size)  # type: ignore[arg-type]
            scores = logits.softmax(dim=1)[0].permute(1, 2, 0).cpu().numpy() if probabilities else None
            results.append((logits.argmax(dim=1)[0].cpu().numpy(), scores))
        return results
