"""The evaluation preprocessing of slice-wise segmentation, one object for testing and prediction.

:class:`SegmentationPreprocessing` turns a volume into network inputs: the intensity rule
maps it to [0, 1] (CT window in HU, or 0.5/99.5 percentiles with ``window=None``), each
slice gets its neighbours as context channels when the run used them, is resampled to the
run's pixel size (when set) and resized to the model's input size (or padded for tiles),
and normalised. The data module's test and validation volumes
(:class:`vpt.data.medical.datamodule.VolumeDataset`) and ``vpt-predict`` both call it, so a
scan predicted after training gets exactly the inputs testing gave it; a run saves it as
:class:`vpt.data.preprocessing.Preprocessing` and prediction rebuilds it from that alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vpt.data.medical.slicing import SliceGeometry, context_stack
from vpt.data.medical.transforms import build_segmentation_transforms, to_model_input
from vpt.data.medical.windowing import UnitIntensity

__all__ = ["SegmentationPreprocessing"]


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
