"""Reading and writing medical volumes and the per-slice files of preprocessed data sets.

Every reader returns arrays in ``(D, H, W)`` = ``(z, y, x)`` order and spacings in
millimetres in the same ``(z, y, x)`` order, whatever the file stores.

Orientation is taken as the voxels are stored: NIfTI arrays are only transposed from
nibabel's ``(x, y, z)`` to ``(z, y, x)`` and ITK arrays are already ``(z, y, x)``. Neither
is reoriented to a canonical frame (RAS, LPS), so two files of one patient stored with
different direction matrices give differently flipped arrays. Data sets written by one tool
(nnU-Net, the Medical Segmentation Decathlon) store every case the same way, which is all
slice-wise training needs.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vpt.errors import DataError

__all__ = [
    "VOLUME_SUFFIXES",
    "VolumeGeometry",
    "volume_suffix",
    "check_finite",
    "check_volume_complete",
    "read_volume",
    "read_volume_with_geometry",
    "read_volume_geometry",
    "read_volume_shape",
    "write_volume",
    "read_npz_slice",
    "read_h5_volume",
    "read_mask_2d",
]

_logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ITK_SUFFIXES = (".nrrd", ".mha", ".mhd")

Spacing = tuple[float, float, float]

# NIfTI headers are RAS, ITK's are LPS; flipping x and y puts both in ITK's frame so an image
# and a label read by different libraries still compare.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a volume's voxels lie, as its header says.

    Attributes:
        shape: ``(D, H, W)`` = ``(z, y, x)`` voxels, as :func:`read_volume` returns the array.
        spacing: Voxel size in mm as ``(z, y, x)``.
        origin: Position in mm of the first stored voxel as ``(x, y, z)`` in LPS (ITK's
            frame; NIfTI's RAS is converted), ``None`` when the header has none.
        direction: The index axes' unit vectors in LPS, row-major 3 x 3 as ITK's
            ``GetDirection`` gives it, ``None`` when the header has none.
    """

    shape: tuple[int, ...]
    spacing: Spacing
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None


def check_finite(image: np.ndarray, path: str | Path, case_id: str) -> None:
    """Insist that an image holds no NaN or infinite value.

    One NaN voxel makes a whole volume's percentile scaling NaN and its predictions score
    as an empty segmentation, which silently lowers the reported Dice; so it is an error at
    load time rather than a value to clip.

    Args:
        image: The image array of one case (or slice), any shape.
        path: The file it came from, for the message.
        case_id: The case, for the message.

    Raises:
        DataError: The image holds a NaN or an infinity.
    """
    if image.size == 0 or not np.issubdtype(image.dtype, np.floating):
        return
    # min and max propagate NaN and show infinities without allocating a mask of the volume's size.
    if np.isfinite(image.min()) and np.isfinite(image.max()):
        return
    finite = np.isfinite(image)
    count = int(finite.size - np.count_nonzero(finite))
    first = tuple(int(index) for index in np.unravel_index(int(np.argmin(finite)), image.shape))
    raise DataError(
        f"Case {case_id}: image {path} holds {count} non-finite voxel(s) (NaN or inf, the first at index {first}); "
        "replace them with a finite value such as the background intensity, or remove the case from the data set."
    )


def check_volume_complete(path: str | Path) -> None:
    """Refuse a NIfTI file whose voxel data ends early.

    ITK fills the missing part of a truncated NIfTI file (``.nii`` or ``.nii.gz``) with
    zeros and reports nothing, so a half-copied scan would be segmented as a half-empty
    volume. The header says how many bytes the voxels take; the file (decompressed for
    ``.nii.gz``, in one streaming pass) must hold them. Other formats are checked by their
    readers (ITK raises for short NRRD and MetaImage data).

    Raises:
        DataError: The file is shorter than its header says, or its gzip stream is broken.
    """
    import gzip
    import zlib

    path = Path(path)
    suffix = volume_suffix(path)
    if suffix not in _NIFTI_SUFFIXES:
        return
    try:
        import nibabel as nib

        image = nib.load(str(path))
        needed = int(image.dataobj.offset) + int(np.prod(image.shape)) * np.dtype(image.get_data_dtype()).itemsize
        if suffix == ".nii":
            present = path.stat().st_size
        else:
            present = 0
            with gzip.open(path, "rb") as stream:
                while present < needed:
                    chunk = stream.read(1 << 22)
                    if not chunk:
                        break
                    present += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(
            f"Volume {path} is truncated or corrupt ({error}); replace it with an intact copy."
        ) from None
    except Exception as error:  # nibabel raises many types for broken headers
        raise DataError(f"Cannot read volume {path} ({error}); replace the file with an intact copy.") from None
    if present < needed:
        raise DataError(
            f"Volume {path} is truncated: its header needs {needed:,} bytes of voxels, the file holds {present:,}; "
            "replace it with an intact copy."
        )


def volume_suffix(path: str | Path) -> str | None:
    """The volume suffix of a file name (``.nii.gz`` counts as one), or ``None``.

    Args:
        path: A file name or path.

    Returns:
        One of ``VOLUME_SUFFIXES`` (lower case), or ``None`` for other files.
    """
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _as_label(values: np.ndarray, path: Path) -> np.ndarray:
    """Turn label voxels into the smallest integer type that holds them.

    Labels stored as floats (some tools write them so) must still be whole numbers; a
    fraction means an image was passed where a label was expected or the label was resampled
    with linear interpolation.
    """
    if not np.issubdtype(values.dtype, np.integer):
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise DataError(
                f"Label file {path} holds NaN or infinite values; labels must be class indices, so replace them "
                "with 0 (background) or the right class."
            )
        rounded = np.rint(values)
        if not np.allclose(rounded, values, atol=1e-3):
            raise DataError(
                f"Label file {path} holds non-integer values; labels must be class indices "
                "(resample labels with nearest-neighbour interpolation)."
            )
        values = rounded
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low >= 0 and high <= np.iinfo(np.uint8).max:
        return values.astype(np.uint8, copy=False)
    if np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
        return values.astype(np.int16, copy=False)
    return values.astype(np.int64, copy=False)


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes (NIfTI pads to 4D or 5D) and insist on three axes."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(
            f"Volume {path} has shape {array.shape} but one 3D channel is expected; "
            "split multi-channel or time-series files into one file per channel."
        )
    return array


def read_volume(path: str | Path, label: bool = False) -> tuple[np.ndarray, Spacing]:
    """Read a NIfTI, NRRD, MHA or MHD volume.

    Args:
        path: The volume file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.mhd``).
        label: Whether the file is a label map: values are checked to be whole numbers and
            returned as the smallest fitting integer type (uint8 for up to 255 classes).

    Returns:
        ``(array, spacing)``: the voxels as ``(D, H, W)`` = ``(z, y, x)`` (float32 for
        images, integers for labels) and the voxel size in mm as ``(z, y, x)``.

    Raises:
        DataError: The file is missing, unreadable, not 3D, or has another suffix.
    """
    array, geometry = read_volume_with_geometry(path, label=label)
    return array, geometry.spacing


def read_volume_with_geometry(path: str | Path, label: bool = False) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a volume as :func:`read_volume` does, with its origin and direction too.

    Args:
        path: The volume file (any of ``VOLUME_SUFFIXES``).
        label: Whether the file is a label map (see :func:`read_volume`).

    Returns:
        ``(array, geometry)``: the ``(D, H, W)`` voxels and where they lie.

    Raises:
        DataError: The file is missing, unreadable, not 3D, or has another suffix.
    """
    path = _existing_volume(path)
    check_volume_complete(path)
    try:
        if volume_suffix(path) in _NIFTI_SUFFIXES:
            array, geometry = _read_nifti(path, label)
        else:
            array, geometry = _read_itk(path, label)
    except DataError:
        raise
    except Exception as error:  # nibabel and ITK raise many unrelated types for broken files
        raise DataError(f"Cannot read volume {path} ({error}); replace the file with an intact copy.") from error
    array = _squeeze_to_3d(array, path)
    array = _as_label(array, path) if label else array.astype(np.float32, copy=False)
    return np.ascontiguousarray(array), VolumeGeometry(tuple(array.shape), *geometry)


def read_volume_geometry(path: str | Path) -> VolumeGeometry:
    """The shape, spacing, origin and direction of a volume file, read from its header without
    decoding voxels.

    Args:
        path: The volume file (any of ``VOLUME_SUFFIXES``).

    Returns:
        The geometry; ``shape`` as :func:`read_volume` would return the array (trailing
        singleton axes dropped).

    Raises:
        DataError: The file is missing, unreadable, or has another suffix.
    """
    path = _existing_volume(path)
    try:
        if volume_suffix(path) in _NIFTI_SUFFIXES:
            import nibabel as nib

            image = nib.load(str(path))
            shape = tuple(int(side) for side in image.shape)
            shape = (*shape[:3][::-1], *shape[3:])
            placement = _nifti_placement(image)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(side) for side in reader.GetSize()[::-1])
            placement = _itk_placement(reader)
    except Exception as error:  # as in read_volume: broken headers raise many types
        raise DataError(f"Cannot read volume {path} ({error}); replace the file with an intact copy.") from error
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return VolumeGeometry(shape, *placement)


def read_volume_shape(path: str | Path) -> tuple[int, ...]:
    """The ``(D, H, W)`` shape of a volume file, read from its header without decoding voxels.

    Args:
        path: The volume file (any of ``VOLUME_SUFFIXES``).

    Returns:
        The shape as :func:`read_volume` would return it (trailing singleton axes dropped).
    """
    return read_volume_geometry(path).shape


def _existing_volume(path: str | Path) -> Path:
    """``path`` as a :class:`Path` once it is known to be a volume file that exists."""
    path = Path(path)
    if volume_suffix(path) is None:
        raise DataError(
            f"Volume {path} has an unsupported file type; convert it to one of {', '.join(VOLUME_SUFFIXES)}."
        )
    if not path.is_file():
        raise DataError(f"Volume {path} does not exist; restore it or remove the case from the data set.")
    return path


# (spacing (z, y, x), origin (x, y, z) LPS or None, direction row-major LPS or None)
_Placement = tuple[Spacing, Optional[tuple[float, float, float]], Optional[tuple[float, ...]]]


def _nifti_placement(image: Any) -> _Placement:
    """Spacing from the NIfTI zooms; origin and direction from its affine, turned from RAS to LPS."""
    zooms = tuple(float(zoom) for zoom in image.header.get_zooms()[:3])
    if len(zooms) < 3:
        raise DataError(f"Volume {image.get_filename()} has fewer than three axes; save it as a 3D volume.")
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return (zooms[2], zooms[1], zooms[0]), None, None
    linear = _RAS_TO_LPS @ affine[:3, :3]
    lengths = np.linalg.norm(linear, axis=0)
    direction = linear / np.where(lengths > 0, lengths, 1.0)
    origin = _RAS_TO_LPS @ affine[:3, 3]
    return (
        (zooms[2], zooms[1], zooms[0]),
        tuple(float(value) for value in origin),
        tuple(float(value) for value in direction.ravel()),
    )


def _itk_placement(image: Any) -> _Placement:
    """Spacing, origin and direction of an ITK image or of a reader that read the header."""
    spacing = tuple(float(value) for value in image.GetSpacing())  # (x, y, z)
    if len(spacing) != 3:
        padded = (*spacing, 1.0, 1.0, 1.0)[:3]
        return (padded[2], padded[1], padded[0]), None, None
    origin = tuple(float(value) for value in image.GetOrigin())
    direction = tuple(float(value) for value in image.GetDirection())
    return (spacing[2], spacing[1], spacing[0]), origin, direction


def _read_nifti(path: Path, label: bool) -> tuple[np.ndarray, _Placement]:
    import nibabel as nib

    image = nib.load(str(path))
    # dataobj keeps the stored integer type for labels; get_fdata would scale to float64.
    array = np.asanyarray(image.dataobj) if label else image.get_fdata(dtype=np.float32)
    if array.ndim < 3 or len(image.header.get_zooms()) < 3:
        raise DataError(f"Volume {path} has shape {array.shape}, not three axes; save it as a 3D volume.")
    # nibabel indexes (x, y, z, ...); move the spatial axes to (z, y, x) and keep the rest behind.
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0))
    return array, _nifti_placement(image)


def _read_itk(path: Path, label: bool) -> tuple[np.ndarray, _Placement]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"Volume {path} has {image.GetDimension()} axes and {image.GetNumberOfComponentsPerPixel()} "
            "component(s) per voxel; save it as a 3D volume with one value per voxel."
        )
    array = sitk.GetArrayFromImage(image)  # already (z, y, x)
    return array, _itk_placement(image)


def write_volume(path: str | Path, array: np.ndarray, spacing: Sequence[float] | None = None) -> Path:
    """Write a ``(D, H, W)`` volume so that :func:`read_volume` reads back the same array.

    Every format claims the same orientation, ITK's identity direction (DICOM's axial
    default): row 0 anterior, column 0 the patient's right, slices towards the head. NRRD/
    MHA/MHD files get the identity direction, NIfTI files the same axes in RAS (``diag(-x,
    -y, z)`` with the spacing), so pictures (:mod:`vpt.data.medical.orientation`) show an
    array written here as it was drawn, whatever the format.

    Args:
        path: Output file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.mhd``); the
            parent folder is created.
        array: Voxels as ``(D, H, W)`` = ``(z, y, x)``; the dtype is kept.
        spacing: Voxel size in mm as ``(z, y, x)``; ``None`` writes 1 mm.

    Returns:
        The written path.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise DataError(f"Cannot write {path}; name the file with one of {', '.join(VOLUME_SUFFIXES)}.")
    array = np.asarray(array)
    if array.ndim != 3:
        raise DataError(f"Cannot write an array of shape {array.shape} to {path}; pass a (D, H, W) volume.")
    z, y, x = (float(value) for value in (spacing if spacing is not None else (1.0, 1.0, 1.0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _NIFTI_SUFFIXES:
        import nibabel as nib

        image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.diag([-x, -y, z, 1.0]))
        image.header.set_xyzt_units("mm")
        nib.save(image, str(path))
    else:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing((x, y, z))
        sitk.WriteImage(image, str(path), useCompression=True)
    return path


def read_npz_slice(path: str | Path, label_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """Read one 2D slice of TransUNet's Synapse ``train_npz`` folder.

    TransUNet's preprocessing already clipped the CT to [-125, 275] HU and scaled it to
    [0, 1], so the image is returned as stored (float32), not windowed again.

    Args:
        path: A ``<case>_slice<k>.npz`` file with arrays ``image`` and ``label``.
        label_only: Read only the label (npz members load separately, so this is cheap).

    Returns:
        ``(image, label)``: image float32 ``(H, W)`` in [0, 1] (``None`` with
        ``label_only``), label integers ``(H, W)``.
    """
    path = Path(path)
    try:
        with np.load(path) as data:
            missing = [key for key in ("image", "label") if key not in data.files]
            if missing:
                raise DataError(f"Slice file {path} lacks the array(s) {missing}; it must hold 'image' and 'label'.")
            label = _as_label(np.asarray(data["label"]), path)
            image = None if label_only else np.asarray(data["image"], dtype=np.float32)
    except DataError:
        raise
    except FileNotFoundError as error:
        raise DataError(f"Slice file {path} does not exist; restore it or remove it from train_npz/.") from error
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"Cannot read slice file {path} ({error}); replace it with an intact copy.") from error
    if label.ndim != 2 or (image is not None and image.shape != label.shape):
        raise DataError(
            f"Slice file {path} has image {None if image is None else image.shape} and label {label.shape}; "
            "both must be 2D arrays of the same shape."
        )
    return image, label


def read_h5_volume(path: str | Path, label_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """Read one volume of TransUNet's Synapse ``test_vol_h5`` folder.

    Like the training slices, the image is already windowed to [0, 1] by TransUNet's
    preprocessing, and the file stores no spacing.

    Args:
        path: A ``<case>.npy.h5`` file with datasets ``image`` and ``label`` of shape ``(D, H, W)``.
        label_only: Read only the label.

    Returns:
        ``(image, label)``: image float32 ``(D, H, W)`` (``None`` with ``label_only``),
        label integers ``(D, H, W)``.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Volume {path} does not exist; restore it or remove it from test_vol_h5/.")
    try:
        with h5py.File(path, "r") as data:
            missing = [key for key in ("image", "label") if key not in data]
            if missing:
                raise DataError(f"Volume {path} lacks the dataset(s) {missing}; it must hold 'image' and 'label'.")
            label = _as_label(np.asarray(data["label"][()]), path)
            image = None if label_only else np.asarray(data["image"][()], dtype=np.float32)
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"Cannot read volume {path} ({error}); replace it with an intact copy.") from error
    if label.ndim != 3 or (image is not None and image.shape != label.shape):
        raise DataError(
            f"Volume {path} has image {None if image is None else image.shape} and label {label.shape}; "
            "both must be (D, H, W) arrays of the same shape."
        )
    return image, label


def read_mask_2d(path: str | Path) -> np.ndarray:
    """Read a 2D mask image whose pixel values are class indices.

    Palette PNGs give their palette indices; greyscale and 16-bit PNGs give their values;
    colour masks are accepted only when the three channels agree.

    Args:
        path: Mask file (PNG recommended; lossy JPEG corrupts class indices).

    Returns:
        Integer array ``(H, W)``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            values = np.asarray(image)
    except FileNotFoundError as error:
        raise DataError(f"Mask {path} does not exist; add it or remove its image.") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"Cannot read mask {path} (corrupt or not an image); replace it.") from error
    if values.ndim == 3:
        channels = values[..., :3]
        if not (channels == channels[..., :1]).all():
            raise DataError(
                f"Mask {path} is a colour image; save masks as single-channel PNGs whose pixel values are "
                "class indices."
            )
        values = channels[..., 0]
    return _as_label(values, path)
