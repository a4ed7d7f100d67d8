"""What ``input=`` names: volume files, DICOM series and 2D images, each with its output name.

Accepted inputs:

- one volume file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) or one 2D image
  (``.png``, ``.jpg``, ``.tif`` ...);
- a folder of such files (not searched recursively);
- a DICOM series folder (read with SimpleITK's GDCM series reader), or a folder whose
  sub-folders are DICOM series; a folder holding several series yields one input each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vpt.data.classification import IMAGE_EXTENSIONS
from vpt.data.medical.io import VOLUME_SUFFIXES, preserved_locale, volume_suffix
from vpt.errors import DataError

__all__ = ["INPUT_KINDS", "PredictionInput", "find_inputs"]

_logger = logging.getLogger(__name__)

INPUT_KINDS = ("volume", "dicom", "image")

# Files that sit beside volumes and images but are never DICOM slices (MetaImage data
# files, sidecars); a folder of only these is not probed with GDCM, which would read them all.
_NOT_DICOM_SUFFIXES = frozenset(
    {".raw", ".zraw", ".json", ".txt", ".csv", ".md", ".yaml", ".yml", ".npz", ".npy", ".h5", ".pkl", ".safetensors"}
)

_WHAT_TO_PASS = "pass input=<a volume file, a folder of volumes or 2D images, or a DICOM series folder>"


@dataclass(frozen=True)
class PredictionInput:
    """One thing to predict.

    Attributes:
        kind: ``"volume"`` (one file), ``"dicom"`` (a series of slice files) or ``"image"`` (2D).
        path: The file, or the folder of a DICOM series.
        name: The output files' stem: the file name without its volume or image suffix,
            the series folder's name for DICOM (with the series UID when a folder holds several).
        suffix: The output volume's suffix as the input spells it (``".nii.gz"``, ``".nrrd"``
            ...); ``".nii.gz"`` for DICOM; ``""`` for 2D images.
        files: For ``"dicom"``: the series' slice files in the order GDCM sorts them.
    """

    kind: str
    path: Path
    name: str
    suffix: str = ""
    files: tuple[Path, ...] = ()


def _volume_input(path: Path) -> PredictionInput:
    suffix = volume_suffix(path)
    assert suffix is not None
    return PredictionInput("volume", path, path.name[: -len(suffix)], path.name[-len(suffix):])


def _image_input(path: Path) -> PredictionInput:
    return PredictionInput("image", path, path.stem)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _may_be_dicom(path: Path) -> bool:
    """Whether a file could be a DICOM slice (they often have no or numeric suffixes)."""
    return volume_suffix(path) is None and not _is_image(path) and path.suffix.lower() not in _NOT_DICOM_SUFFIXES


def _dicom_series(folder: Path) -> list[PredictionInput]:
    """The DICOM series stored directly in ``folder`` (none when it holds no DICOM file)."""
    import SimpleITK as sitk

    try:
        with preserved_locale():
            series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise DataError(f"Cannot scan {folder} for DICOM series ({error}); check the folder's permissions.") from error
    found = []
    for series_id in sorted(series_ids):
        with preserved_locale():
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
        files = tuple(Path(name) for name in names)
        if not files:
            continue
        name = folder.name if len(series_ids) == 1 else f"{folder.name}_{series_id}"
        found.append(PredictionInput("dicom", folder, name, ".nii.gz", files))
    return found


def _visible(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def find_inputs(path: str | Path) -> list[PredictionInput]:
    """List what ``path`` holds to predict (see the module docstring).

    Args:
        path: A volume or image file, or a folder.

    Returns:
        The inputs, volumes and images sorted by file name, then DICOM series.

    Raises:
        DataError: ``path`` does not exist, is a file of another type, or a folder holding
            nothing to predict.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Input {path} does not exist; {_WHAT_TO_PASS}.")
    if path.is_file():
        if volume_suffix(path) is not None:
            return [_volume_input(path)]
        if _is_image(path):
            return [_image_input(path)]
        raise DataError(
            f"Input {path} is neither a volume ({', '.join(VOLUME_SUFFIXES)}) nor a 2D image "
            f"({', '.join(IMAGE_EXTENSIONS)}); for a DICOM slice pass its series folder instead."
        )
    entries = _visible(path)
    files = [entry for entry in entries if entry.is_file()]
    inputs = [_volume_input(entry) for entry in files if volume_suffix(entry) is not None]
    inputs += [_image_input(entry) for entry in files if volume_suffix(entry) is None and _is_image(entry)]
    if any(_may_be_dicom(entry) for entry in files):
        inputs += _dicom_series(path)
    for folder in (entry for entry in entries if entry.is_dir()):
        if any(child.is_file() and _may_be_dicom(child) for child in _visible(folder)):
            inputs += _dicom_series(folder)
    if not inputs:
        raise DataError(
            f"Input folder {path} holds no volumes ({', '.join(VOLUME_SUFFIXES)}), 2D images "
            f"({', '.join(IMAGE_EXTENSIONS)}) or DICOM series; {_WHAT_TO_PASS}."
        )
    _logger.info(
        "%s: %d input(s) (%s).", path, len(inputs),
        ", ".join(f"{sum(item.kind == kind for item in inputs)} {kind}" for kind in INPUT_KINDS
                  if any(item.kind == kind for item in inputs)),
    )
    return inputs
