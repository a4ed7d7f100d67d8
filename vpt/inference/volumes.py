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

from vpt.data.medical.io import image_array, read_image
from vpt.inference.inputs import PredictionInput
from vpt.inference.outputs import write_new_files

__all__ = ["INPUT_CHANNEL", "read_input_volume", "volume_array", "volume_output_files", "write_label_volume", "write_probability_volume"]

_logger = logging.getLogger(__name__)


#: The channel of a multi-channel 4D scan (an MSD image) that is the model's input: channel
#: 0, as training reads it (nnU-Net's ``_0000``, the MSD image's first modality).
INPUT_CHANNEL = 0


def read_input_volume(item: PredictionInput) -> Any:
    """Read a volume file or DICOM series with the one reader training uses
    (:func:`vpt.data.medical.io.read_image`); of a 4D multi-channel file, channel
    :data:`INPUT_CHANNEL`.

    Args:
        item: A ``"volume"`` or ``"dicom"`` input.

    Returns:
        The 3D single-component ``SimpleITK.Image``; its voxels and geometry as ITK reads them.

    Raises:
        DataError: An unreadable file or series, or one that is not a 3D single-channel volume.
    """
    return read_image(item.files if item.kind == "dicom" else item.path, channel=INPUT_CHANNEL)


def volume_array(image: Any, item: PredictionInput) -> np.ndarray:
    """The voxels of an image read by :func:`read_input_volume`.

    Returns:
        float32 ``(D, H, W)`` = ``(z, y, x)``, what ``vpt.data.medical.io.read_volume``
        gives for the same file (the same function makes both).

    Raises:
        DataError: A NaN or infinite voxel.
    """
    return image_array(image, item.path, case_id=item.name)


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

