"""Slice-wise segmentation of unlabelled volumes and 2D images, as the run's testing did it.

Preprocessing is the data module's evaluation path (:class:`VolumeDataset`): a whole volume
is mapped to [0, 1] (CT window in HU, or 0.5/99.5 percentiles with ``window=None``), each
slice is resized to the model's input size and normalised to RGB. Prediction mirrors
:meth:`SegmentationTask.predict_volume`: the network's logits are resized bilinearly to the
original slice size and the label is their argmax; the probabilities are the softmax of
those same resized logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpt.data.medical.datamodule import _UnitIntensity
from vpt.data.medical.layouts import Case
from vpt.data.medical.transforms import build_segmentation_transforms, to_model_input

__all__ = ["SegmentationPreprocessing", "SlicePredictor", "label_dtype"]

_logger = logging.getLogger(__name__)


def label_dtype(num_classes: int) -> type[np.integer]:
    """The smallest unsigned type for class indices ``0 .. num_classes - 1`` (uint8 up to 256 classes)."""
    return np.uint8 if num_classes <= 256 else np.uint16


@dataclass(frozen=True)
class SegmentationPreprocessing:
    """The run's evaluation preprocessing, taken from its data module.

    Attributes:
        image_size: ``(H, W)`` the model takes.
        mean: Normalisation mean per RGB channel, [0, 1] units.
        std: Normalisation standard deviation per RGB channel.
        window: CT window ``(low, high)`` in HU, or ``None`` for per-volume percentile scaling.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    window: Optional[tuple[float, float]]

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> "SegmentationPreprocessing":
        """Read the settings of a ``VolumeSegmentationDataModule`` built from the run config."""
        # A data module that resolves ``window: auto`` from its dataset.json says which window it used.
        resolve = getattr(datamodule, "resolved_window", None)
        window = resolve() if callable(resolve) else datamodule.window
        return cls(
            tuple(int(side) for side in datamodule.image_size),  # type: ignore[arg-type]
            tuple(float(value) for value in datamodule.mean),  # type: ignore[arg-type]
            tuple(float(value) for value in datamodule.std),  # type: ignore[arg-type]
            None if window is None else (float(window[0]), float(window[1])),
        )

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
        return _UnitIntensity("raw", self.window)(volume, Case(case_id, Path(source)))

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

    def model_inputs(self, unit_slices: Sequence[np.ndarray]) -> torch.Tensor:
        """Resize and normalise [0, 1] slices for the model.

        Args:
            unit_slices: float32 ``(H0, W0)`` or ``(H0, W0, 3)`` slices, sizes may differ.

        Returns:
            float32 ``(B, 3, H, W)``.
        """
        transform = build_segmentation_transforms(self.image_size, train=False)
        return torch.stack([to_model_input(transform(image=unit)["image"], self.mean, self.std) for unit in unit_slices])


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
    def predict_volume(
        self,
        unit_volume: np.ndarray,
        preprocessing: SegmentationPreprocessing,
        probabilities: bool = False,
        on_batch: Optional[Callable[[int], object]] = None,
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Labels (and probabilities) of a whole volume, ``batch_size`` slices at a time.

        Args:
            unit_volume: float32 ``(D, H0, W0)`` in [0, 1] (see :meth:`SegmentationPreprocessing.unit_volume`).
            preprocessing: Resizing and normalisation.
            probabilities: Also return the class probabilities.
            on_batch: Called with the number of slices done after each batch (progress).

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
            inputs = preprocessing.model_inputs(list(unit_volume[start:stop]))
            logits = self.resize(self.logits(inputs), (height, width))
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
        batch_logits = self.logits(preprocessing.model_inputs(unit_images))
        results = []
        for position, unit in enumerate(unit_images):
            # Each image returns to its own size, so the logits are resized one by one.
            logits = self.resize(batch_logits[position : position + 1], tuple(unit.shape[:2]))  # type: ignore[arg-type]
            scores = logits.softmax(dim=1)[0].permute(1, 2, 0).cpu().numpy() if probabilities else None
            results.append((logits.argmax(dim=1)[0].cpu().numpy(), scores))
        return results
