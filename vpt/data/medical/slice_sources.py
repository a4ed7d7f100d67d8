"""Where a training or validation slice is read from: three storage kinds behind one interface.

- :class:`MemorySlice`: the slice's [0, 1] image (float16, context channels already stacked)
  and label, kept in memory (``cache=False``).
- :class:`CachedSlice`: one position of a case's memory-mapped cache entry
  (:mod:`vpt.data.medical.cache`), mapped per item and released with it, so RAM stays flat.
- :class:`SynapseSliceFile`: one of TransUNet's ``.npz`` slice files, with the files of its
  neighbours for context channels, read per item.

Each is a small picklable object with :meth:`~SliceSource.read` (image and label for an item)
and :meth:`~SliceSource.stored_label` (the label alone, to count classes), so the dataset
and the data module do not care which one a slice has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from vpt.data.medical.cache import CachedCase
from vpt.data.medical.io import check_finite, read_npz_slice
from vpt.data.medical.slicing import context_stack

__all__ = ["SliceSource", "MemorySlice", "CachedSlice", "SynapseSliceFile"]


class SliceSource(Protocol):
    """One slice of a case, wherever it is stored."""

    def read(self, context: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image, label)``: the image in [0, 1], ``(H, W)`` or ``(H, W, 3)`` (colour, or
        slices z-1, z, z+1 when ``context`` is 1), and the ``(H, W)`` class indices."""
        ...

    def stored_label(self) -> np.ndarray:
        """The ``(H, W)`` class indices as stored."""
        ...


@dataclass(frozen=True)
class MemorySlice:
    """A slice held in memory; its context channels were stacked when it was kept."""

    image: np.ndarray
    label: np.ndarray

    def read(self, context: int) -> tuple[np.ndarray, np.ndarray]:
        return self.image, self.label

    def stored_label(self) -> np.ndarray:
        return self.label


@dataclass(frozen=True)
class CachedSlice:
    """Position ``position`` of a case's cache entry (shared by the case's slices)."""

    cached: CachedCase
    position: int

    def read(self, context: int) -> tuple[np.ndarray, np.ndarray]:
        image = np.array(context_stack(self.cached.image(), self.position, context))
        return image, np.array(self.cached.label()[self.position])

    def stored_label(self) -> np.ndarray:
        return np.asarray(self.cached.label()[self.position])


@dataclass(frozen=True)
class SynapseSliceFile:
    """A Synapse ``.npz`` slice and its neighbours' files (edges clamped)."""

    path: Path
    neighbours: tuple[Path, Path]
    case_id: str

    def read(self, context: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = read_npz_slice(self.path)
        # Synapse slice images are first read here, in a worker, so this is where a NaN shows.
        check_finite(image, self.path, self.case_id)
        if context:
            before, after = (read_npz_slice(path)[0] for path in self.neighbours)
            for path, plane in zip(self.neighbours, (before, after)):
                check_finite(plane, path, self.case_id)
            image = np.stack([before, image, after], axis=-1)
        return np.clip(image, 0.0, 1.0), label

    def stored_label(self) -> np.ndarray:
        return read_npz_slice(self.path, label_only=True)[1]
