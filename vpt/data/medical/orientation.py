"""How to turn a stored slice to the orientation radiologists read it in, for pictures only.

:mod:`vpt.data.medical.io` keeps voxels as stored: a slice is ``(H, W)`` = ``(y, x)``
index axes, and the header's direction (in LPS: +x to the patient's Left, +y Posterior,
+z Superior) says where each index axis points. Training and scoring need nothing more,
but a slice drawn as stored can come out upside down or mirrored: DICOM-derived NIfTI
files commonly store rows from posterior to anterior, so row 0 (drawn at the top) is the
back of the head.

The usual (radiological) display, as DICOM viewers show it:

- axial: seen from the feet, anterior at the top, the patient's left on the image right,
  so picture columns run along +x (L) and rows along +y (P);
- coronal: seen from the front, superior at the top, the patient's left on the image right:
  columns along +x, rows along -z;
- sagittal: anterior on the image left, superior at the top: columns along +y, rows along -z.

The plane is the one the slice axis is closest to normal to. An identity LPS direction
(ITK's default, DICOM axial series) is already in display orientation; NIfTI's RAS
identity affine is turned 180 degrees. Without a direction (Synapse ``.npz``/``.h5``,
2D images) slices are drawn as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DisplayOrientation", "display_orientation"]

# For a slice normal along LPS axis n: (world axis, sign) that picture columns run along
# (left to right) and that rows run along (top to bottom).
_DISPLAY_AXES: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    2: ((0, 1), (1, 1)),  # axial: L to the right, P downward
    1: ((0, 1), (2, -1)),  # coronal: L to the right, inferior downward
    0: ((1, 1), (2, -1)),  # sagittal: P to the right, inferior downward
}


@dataclass(frozen=True)
class DisplayOrientation:
    """A transpose, then flips, that take a stored slice to its display orientation.

    Attributes:
        transpose: Swap rows and columns first (slices stored with x along the rows).
        flip_rows: Then turn it upside down.
        flip_columns: Then mirror it left-right.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False

    def apply(self, plane: np.ndarray) -> np.ndarray:
        """A slice ``(H, W)`` or ``(H, W, C)`` in display orientation (``(W, H[, C])`` when transposed)."""
        if self.transpose:
            plane = np.swapaxes(plane, 0, 1)
        if self.flip_rows:
            plane = plane[::-1]
        if self.flip_columns:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)


def display_orientation(direction: Sequence[float] | None) -> DisplayOrientation:
    """The turn that shows slices of a volume with this direction as radiologists read them.

    Args:
        direction: The volume's direction, row-major 3 x 3 in LPS whose columns are the
            index axes x (picture columns), y (picture rows), z (slices), as
            :class:`vpt.data.medical.io.VolumeGeometry` holds it; ``None`` when unknown.

    Returns:
        The orientation; the identity when the direction is unknown.
    """
    if direction is None:
        return DisplayOrientation()
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    along_columns, along_rows, normal = matrix[:, 0], matrix[:, 1], matrix[:, 2]
    (right_axis, right_sign), (down_axis, down_sign) = _DISPLAY_AXES[int(np.argmax(np.abs(normal)))]
    # Transpose when the stored rows run closer to the display's left-right axis than the columns do.
    transpose = abs(along_rows[right_axis]) > abs(along_columns[right_axis])
    horizontal, vertical = (along_rows, along_columns) if transpose else (along_columns, along_rows)
    return DisplayOrientation(
        transpose=bool(transpose),
        flip_rows=bool(vertical[down_axis] * down_sign < 0),
        flip_columns=bool(horizontal[right_axis] * right_sign < 0),
    )
