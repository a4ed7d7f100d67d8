"""How a 2D model sees a volume: which slices form one input, at what pixel size, in which tiles.

One :class:`SliceGeometry` holds the three choices, and training, validation, testing and
``vpt-predict`` all read slices through it, so a model is always evaluated on inputs made
the way it was trained:

* **context** (``context_slices=1``): the input's three channels are slices ``z-1, z, z+1``
  (2.5D, as in many CT slice models); at the first and last slice the missing neighbour is
  the slice itself (edges clamp). ``0`` repeats slice ``z`` in every channel.
* **spacing**: slices are resampled (linear for images, nearest for labels) to this
  in-plane pixel size in mm before anything else; predictions are resampled back to the
  original grid before they are scored or written.
* **tiles** (``patch_size``, or ``spacing`` alone, which tiles at the model's input size):
  training takes random crops of ``patch_size`` pixels, validation a grid of tiles covering
  each slice, and whole slices are predicted by overlapping tiles blended with Gaussian
  weights (MONAI's ``sliding_window_inference``). Without tiles, whole slices are resized
  to the model's input size (TransUNet and SAMed do this).

Slices smaller than a tile are padded with 0 in [0, 1] units (air in a CT window) and the
padding is cut off the predictions again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from vpt.errors import ConfigError

__all__ = ["SliceGeometry", "context_indices", "context_stack", "tile_origins", "pad_to", "resample_plane"]


def context_indices(position: int, depth: int, context: int) -> list[int]:
    """Slice indices forming the input of slice ``position``: ``[z-1, z, z+1]`` clamped to the
    volume for ``context=1``, ``[z]`` for ``context=0``."""
    if not 0 <= position < depth:
        raise IndexError(f"slice {position} outside a volume of {depth} slices")
    if context == 0:
        return [position]
    return [min(max(position + offset, 0), depth - 1) for offset in range(-context, context + 1)]


def context_stack(volume: np.ndarray, position: int, context: int) -> np.ndarray:
    """The input planes of slice ``position``: ``(H, W)`` without context, ``(H, W, 3)`` with it.

    Colour volumes ``(D, H, W, 3)`` (2D RGB images) have no neighbours and are returned as they are.
    """
    if volume.ndim == 4 or context == 0:
        return np.asarray(volume[position])
    indices = context_indices(position, len(volume), context)
    return np.stack([np.asarray(volume[index]) for index in indices], axis=-1)


def tile_origins(length: int, tile: int) -> list[int]:
    """Starts of tiles of side ``tile`` covering ``length`` pixels (the last one flush with the end)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def pad_to(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pad ``(H, W[, C])`` with zeros at the bottom/right up to at least ``size``."""
    height, width = plane.shape[:2]
    pad = ((0, max(size[0] - height, 0)), (0, max(size[1] - width, 0))) + ((0, 0),) * (plane.ndim - 2)
    return np.pad(plane, pad) if any(after for _, after in pad) else plane


def resample_plane(plane: np.ndarray, size: tuple[int, int], label: bool = False) -> np.ndarray:
    """Resize ``(H, W[, C])`` to ``size`` = ``(H', W')``: linear for images, nearest for labels
    (pixel centres aligned, as ``F.interpolate(align_corners=False)``)."""
    if tuple(plane.shape[:2]) == tuple(size):
        return plane
    # INTER_NEAREST picks floor(x * scale), shifting labels by up to a pixel; _EXACT uses pixel centres.
    interpolation = cv2.INTER_NEAREST_EXACT if label else cv2.INTER_LINEAR
    return cv2.resize(plane, (int(size[1]), int(size[0])), interpolation=interpolation)


@dataclass(frozen=True)
class SliceGeometry:
    """The slice choices of a run (see the module docstring).

    Attributes:
        model_size: ``(H, W)`` the model takes.
        context_slices: 0 (single slice) or 1 (slices z-1, z, z+1 as the three channels).
        spacing: Target in-plane pixel size ``(y, x)`` in mm, or ``None`` to keep the data's.
        patch_size: Tile side ``(H, W)`` in (resampled) pixels, or ``None`` for no tiles
            (whole slices resized to ``model_size``); with ``spacing`` set and no
            ``patch_size`` the tiles are ``model_size``.
        tile_overlap: Overlap of neighbouring tiles when predicting whole slices, [0, 1).
    """

    model_size: tuple[int, int]
    context_slices: int = 0
    spacing: tuple[float, float] | None = None
    patch_size: tuple[int, int] | None = None
    tile_overlap: float = 0.5

    @classmethod
    def from_options(
        cls,
        model_size: tuple[int, int],
        context_slices: int = 0,
        spacing: float | Sequence[float] | None = None,
        patch_size: int | Sequence[int] | None = None,
        tile_overlap: float = 0.5,
    ) -> "SliceGeometry":
        """Validate the ``task.data`` options and fill in defaults (tiles at the model size
        when only ``spacing`` is given)."""
        if context_slices not in (0, 1):
            raise ConfigError(
                f"task.data.context_slices={context_slices} is not valid; use 1 (slices z-1, z, z+1 as the three "
                "input channels) or 0 (one slice)."
            )
        target: tuple[float, float] | None = None
        if spacing is not None:
            values = [float(spacing)] * 2 if isinstance(spacing, (int, float)) else [float(v) for v in spacing]
            if len(values) != 2 or min(values) <= 0:
                raise ConfigError(
                    f"task.data.spacing={spacing} is not valid; give the in-plane pixel size in mm, one number or [y, x]."
                )
            target = (values[0], values[1])
        tile: tuple[int, int] | None = None
        if patch_size is not None:
            sides = [int(patch_size)] * 2 if isinstance(patch_size, int) else [int(v) for v in patch_size]
            if len(sides) != 2 or min(sides) < 8:
                raise ConfigError(f"task.data.patch_size={patch_size} is not valid; give a side of 8 pixels or more, or [h, w].")
            tile = (sides[0], sides[1])
        elif target is not None:
            tile = tuple(model_size)  # type: ignore[assignment]
        if not 0 <= float(tile_overlap) < 1:
            raise ConfigError(f"task.data.tile_overlap={tile_overlap} is not valid; use a value in [0, 1).")
        return cls(tuple(int(v) for v in model_size), int(context_slices), target, tile, float(tile_overlap))  # type: ignore[arg-type]

    @property
    def tiled(self) -> bool:
        return self.patch_size is not None

    @property
    def channels(self) -> int:
        return 3 if self.context_slices else 1

    def resampled_size(self, shape: tuple[int, int], spacing: Sequence[float] | None) -> tuple[int, int]:
        """The ``(H', W')`` a slice of ``shape`` with in-plane ``spacing`` (y, x) mm takes.

        Unknown spacing (``None`` or NaN) keeps the pixels as they are.
        """
        if self.spacing is None or spacing is None or not all(np.isfinite(value) and value > 0 for value in spacing):
            return (int(shape[0]), int(shape[1]))
        return (
            max(1, int(round(shape[0] * float(spacing[0]) / self.spacing[0]))),
            max(1, int(round(shape[1] * float(spacing[1]) / self.spacing[1]))),
        )

    def network_shape(self, shape: tuple[int, int], spacing: Sequence[float] | None) -> tuple[int, int]:
        """The ``(H, W)`` :meth:`network_plane` gives a slice of ``shape``: resampled, then
        padded up to one tile when tiled."""
        height, width = self.resampled_size(shape, spacing)
        if self.patch_size is None:
            return (height, width)
        return (max(height, self.patch_size[0]), max(width, self.patch_size[1]))

    def network_plane(self, plane: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
        """A [0, 1] input plane ``(H, W[, C])`` as the network's pipeline starts from it:
        resampled to the spacing, and padded up to one tile when tiled."""
        plane = resample_plane(plane, self.resampled_size(plane.shape[:2], spacing))
        return pad_to(plane, self.patch_size) if self.patch_size is not None else plane

    def network_label(self, label: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
        """A label plane on the same grid as :meth:`network_plane` (nearest neighbour, padding 0)."""
        label = resample_plane(label, self.resampled_size(label.shape[:2], spacing), label=True)
        return pad_to(label, self.patch_size) if self.patch_size is not None else label

    def tiles(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Origins ``(y, x)`` of the validation tiles covering a (resampled, padded) slice."""
        assert self.patch_size is not None, "only tiled geometries have tiles"
        return [(y, x) for y in tile_origins(shape[0], self.patch_size[0]) for x in tile_origins(shape[1], self.patch_size[1])]
