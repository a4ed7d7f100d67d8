"""Slice-wise segmentation of unlabelled volumes and 2D images, as the run's testing did it.

Preprocessing is the data module's evaluation path (:class:`VolumeDataset`): a whole volume
is mapped to [0, 1] (CT window in HU, or 0.5/99.5 percentiles with ``window=None``), each
slice gets its neighbours as context channels when the run used them, is resampled to the
run's pixel size (when set) and resized to the model's input size (or padded for tiles),
and normalised. Prediction mirrors :meth:`SegmentationTask.predict_volume` through the same
function (:func:`vpt.inference.tiling.slice_logits`): whole-slice or blended-tile logits,
padding cut off, resized bilinearly to the original slice size; the label is their argmax
and the probabilities their softmax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpt.data.medical.windowing import UnitIntensity, label_dtype
from vpt.data.medical.slicing import SliceGeometry, context_stack
from vpt.data.medical.transforms import build_segmentation_transforms, to_model_input
from vpt.inference.tiling import slice_logits, to_original_grid

__all__ = ["SegmentationPreprocessing", "SlicePredictor", "label_dtype"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentationPreprocessing:
    """The run's evaluation preprocessing, taken from its data module.

    Attributes:
        image_size: ``(H, W)`` the model takes.
        mean: Normalisation mean per RGB channel, [0, 1] units.
        std: Normalisation standard deviation per RGB channel.
        window: CT window ``(low, high)`` in HU, or ``None`` for per-volume percentile scaling.
        geometry: Context slices, pixel size and tiles of the run (``None``: one slice, whole).
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    window: Optional[tuple[float, float]]
    geometry: Optional[SliceGeometry] = None

    @classmethod
    def from_preprocessing(cls, preprocessing: Any) -> "SegmentationPreprocessing":
        """The evaluation preprocessing a run saved (:class:`vpt.data.preprocessing.Preprocessing`)."""
        return cls(preprocessing.image_size, preprocessing.mean, preprocessing.std, preprocessing.window, preprocessing.geometry())

    def unit_volume(self, volume: np.ndarray, case_id: str, source: str) -> np.ndarray:
        """Map a raw volume (HU for CT, any unit otherwise) to [0, 1] as training did.

        Args:
            volume: float32 ``(D, H, W)``, one whole case (percentiles are per volume).
            case_id: Names the case in warnings.
            source: The file, for warnings.

        Returns:
            float32 ``(D, H, W)`` in [0, 1].
        """
        # The data module's own rule, so windowing and its warnings are the ones testing used.
        return UnitIntensity("raw", self.window)(volume, case_id, source)

    @staticmethod
    def unit_image(rgb: np.ndarray) -> np.ndarray:
        """An 8-bit RGB image in [0, 1], grey kept as one channel, as the 2D-folder layout reads it.

        Args:
            rgb: uint8 ``(H, W, 3)`` from :func:`vpt.data.classification.read_rgb`.

        Returns:
            float32 ``(H, W)`` for grey images, ``(H, W, 3)`` for colour ones.
        """
        grey = bool((rgb == rgb[..., :1]).all())
        return (rgb[..., 0] if grey else rgb).astype(np.float32) / 255.0

    def model_inputs(
        self, unit_slices: Sequence[np.ndarray], spacing: Optional[Sequence[float]] = None
    ) -> torch.Tensor:
        """Resample (when the run did), resize or pad, and normalise [0, 1] input planes.

        Args:
            unit_slices: float32 ``(H0, W0)`` or ``(H0, W0, 3)`` planes; sizes may differ
                without tiles, and must match with them (the result is stacked).
            spacing: In-plane pixel size ``(y, x)`` in mm, ``None`` when unknown.

        Returns:
            float32 ``(B, 3, H, W)``: the model's input size, or the resampled, padded size
            for tiles.
        """
        geometry = self.geometry
        transform = build_segmentation_transforms(self.image_size, train=False)
        planes = []
        for unit in unit_slices:
            plane = np.asarray(unit, dtype=np.float32)
            if geometry is not None:
                plane = geometry.network_plane(plane, spacing)
            if geometry is None or not geometry.tiled:
                plane = transform(image=plane)["image"]
            planes.append(to_model_input(plane, self.mean, self.std))
        return torch.stack(planes)

    def valid_size(self, shape: tuple[int, int], spacing: Optional[Sequence[float]] = None) -> Optional[tuple[int, int]]:
        """The part of a tiled input that is the slice (the rest is padding); ``None`` untiled."""
        if self.geometry is None or not self.geometry.tiled:
            return None
        return self.geometry.resampled_size(shape, spacing)

    def volume_inputs(
        self, unit_volume: np.ndarray, start: int, stop: int, spacing: Optional[Sequence[float]] = None
    ) -> torch.Tensor:
        """Network inputs of slices ``start:stop`` of a [0, 1] volume ``(D, H0, W0)``, each with
        its neighbours as context channels when the run used them."""
        context = self.geometry.context_slices if self.geometry is not None else 0
        return self.model_inputs([context_stack(unit_volume, z, context) for z in range(start, stop)], spacing)


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
