"""Reading input volumes with their geometry and writing outputs that keep it, with SimpleITK.

An output volume is built from its ``(z, y, x)`` array with ``sitk.GetImageFromArray`` and
then takes the input's size, spacing, origin and direction with ``CopyInformation``: the
geometry is copied as ITK read it, never rebuilt from the spacing, so a mask of an oblique,
shifted scan lies exactly on it in any viewer.

Files are written through :func:`vpt.inference.outputs.write_new_files`: never over an
existing file, never half a file.
"""

from __future__ import annotations


import logging
from pathlib import Path
from typing import Any

import numpy as np

from vpt.data.medical.io import check_finite, check_volume_complete
from vpt.errors import DataError
from vpt.inference.inputs import PredictionInput, preserved_locale
from vpt.inference.outputs import write_new_files

__all__ = ["read_input_volume", "volume_array", "volume_output_files", "write_label_volume", "write_probability_volume"]

_logger = logging.getLogger(__name__)


def _read_image(sitk: Any, item: PredictionInput) -> Any:
    """The ITK image of a file, or of a DICOM series (its files in slice order)."""
    if item.kind == "dicom":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(path) for path in item.files])
        return reader.Execute()
    return sitk.ReadImage(str(item.path))


def _short(error: BaseException) -> str:
    """The last line of an ITK exception (the first lines name C++ source files)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def read_input_volume(item: PredictionInput) -> Any:
    """Read a volume file or DICOM series as a 3D, single-component ``SimpleITK.Image``.

    Trailing singleton axes (NIfTI files are often stored 4D with one time point) are dropped.

    Args:
        item: A ``"volume"`` or ``"dicom"`` input.

    Returns:
        The image; its voxels and geometry as ITK reads them.

    Raises:
        DataError: An unreadable file or series, or one that is not a 3D single-channel volume.
    """
    import SimpleITK as sitk

    if item.kind == "volume":
        # ITK reads a truncated NIfTI file without complaint (zeros for the missing slices);
        # the same check as training and vpt-check-data refuses it.
        check_volume_complete(item.path)
    try:
        with preserved_locale():
            image = _read_image(sitk, item)
    except RuntimeError as error:
        raise DataError(f"Cannot read {item.path} ({_short(error)}); replace it with an intact copy.") from error
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        size = list(image.GetSize())
        size[-1] = 0  # Extract drops an axis given size 0
        image = sitk.Extract(image, size, [0] * image.GetDimension())
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{item.path} has {image.GetDimension()} axes and {image.GetNumberOfComponentsPerPixel()} component(s) "
            "per voxel; pass 3D volumes with one value per voxel (split multi-channel files, 2D images as .png)."
        )
    return image


def volume_array(image: Any, item: PredictionInput) -> np.ndarray:
    """The voxels of an image read by :func:`read_input_volume`.

    Returns:
        float32 ``(D, H, W)`` = ``(z, y, x)``, the order ``vpt.data.medical.io.read_volume``
        gives for the same file.

    Raises:
        DataError: A NaN or infinite voxel.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    check_finite(array, item.path, item.name)
    return np.ascontiguousarray(array)


def volume_output_files(path: Path) -> list[Path]:
    """Every file that writing the volume ``path`` creates (a ``.mhd`` header has a data file)."""
    if path.name.lower().endswith(".mhd"):
        return [path, path.with_suffix(".zraw")]
    return [path]


def _write_image(image: Any, path: Path) -> list[Path]:
    import SimpleITK as sitk

    return write_new_files(path, lambda target: sitk.WriteImage(image, str(target), useCompression=True))


def write_label_volume(labels: np.ndarray, reference: Any, path: Path) -> list[Path]:
    """Write a label volume on the grid of ``reference``.

    Args:
        labels: ``(D, H, W)`` class indices, the shape of ``reference``'s array.
        reference: The input image; its size, spacing, origin and direction are copied.
        path: The output file; its suffix picks the format.

    Returns:
        The files written.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    image.CopyInformation(reference)
    return _write_image(image, path)


def write_probability_volume(probabilities: np.ndarray, reference: Any, path: Path) -> list[Path]:
    """Write class probabilities as a vector image on the grid of ``reference``.

    Args:
        probabilities: float32 ``(D, H, W, C)``: voxel ``(z, y, x)`` holds the C class
            probabilities (summing to 1). ``sitk.GetArrayFromImage`` of the file gives it back.
        reference: The input image whose geometry is copied.
        path: The output file (NIfTI stores it as a 5D vector-intent image).

    Returns:
        The files written.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(probabilities, dtype=np.float32), isVector=True)
    image.CopyInformation(reference)
    return _write_image(image, path)

