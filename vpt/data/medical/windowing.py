"""Intensity windows that map CT Hounsfield units to [0, 1] for RGB-pretrained backbones."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from vpt.errors import ConfigError

__all__ = ["ABDOMEN_WINDOW", "UnitIntensity", "label_dtype", "window_ct", "scale_to_unit"]

_logger = logging.getLogger(__name__)

# The soft-tissue abdomen window of TransUNet's and SAMed's Synapse preprocessing; results
# are comparable to theirs only with this window.
ABDOMEN_WINDOW = (-125.0, 275.0)

# Percentiles for scaling images without a fixed unit (MRI, ultrasound) to [0, 1]: robust
# to a few hot voxels that a min-max scaling would let set the whole range.
_UNIT_PERCENTILES = (0.5, 99.5)


def window_ct(hu: np.ndarray, low: float = ABDOMEN_WINDOW[0], high: float = ABDOMEN_WINDOW[1]) -> np.ndarray:
    """Clip CT intensities to a window and scale it to [0, 1].

    Args:
        hu: CT intensities in Hounsfield units, any shape.
        low: Lower edge of the window in HU; maps to 0.
        high: Upper edge of the window in HU; maps to 1.

    Returns:
        float32 array of the same shape, values in [0, 1].
    """
    low, high = float(low), float(high)
    if not low < high:
        raise ConfigError(f"CT window ({low}, {high}) is empty; set task.data.window to (low, high) with low < high.")
    scaled = (np.asarray(hu, dtype=np.float32) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)


def scale_to_unit(image: np.ndarray) -> np.ndarray:
    """Scale an image without a fixed intensity unit to [0, 1] by its 0.5 and 99.5 percentiles.

    Args:
        image: Intensities, any shape (one whole volume, so all its slices share the scale).

    Returns:
        float32 array of the same shape, values in [0, 1].
    """
    image = np.asarray(image, dtype=np.float32)
    if image.size == 0:
        return image
    low, high = np.percentile(image, _UNIT_PERCENTILES)
    if high <= low:  # a constant image carries no contrast to keep
        return np.zeros_like(image)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)


def label_dtype(num_classes: int) -> type[np.integer]:
    """The label type of ``num_classes`` classes in training, testing and prediction alike: the
    smallest unsigned type (uint8 up to 256 classes; OpenCV warps 8- and 16-bit masks, not 32/64-bit)."""
    return np.uint8 if num_classes <= 256 else np.uint16


@dataclass(frozen=True)
class UnitIntensity:
    """Maps a case's image to [0, 1], for training, testing and prediction alike: a small
    picklable callable, so loader workers get only this.

    Attributes:
        intensity: ``"raw"`` (scanner units) or ``"unit"`` (already in [0, 1]), from the layout.
        window: CT window in HU for raw images; ``None`` scales each volume by its percentiles.
    """

    intensity: str
    window: tuple[float, float] | None

    def __call__(self, image: np.ndarray, case_id: str, source: object) -> np.ndarray:
        """Map ``image`` (any shape, one whole case) to float32 [0, 1], shape kept; ``case_id``
        and ``source`` (its file) name the case in the warning below."""
        if self.intensity == "unit":
            return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
        if self.window is None:
            return scale_to_unit(image)
        if image.size and float(image.min()) >= 0.0 and float(image.max()) <= 1.0:
            _logger.warning(
                "Image %s of case %s is already in [0, 1], not HU; set task.data.window=null if it is not CT.",
                source, case_id,
            )
        return window_ct(image, *self.window)
