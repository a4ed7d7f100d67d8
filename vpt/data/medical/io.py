"""Reading and writing medical volumes and the per-slice files of preprocessed data sets.

One reader, SimpleITK, reads every volume of every path: training, ``vpt-check-data`` and
``vpt-predict`` all go through :func:`read_image` (NIfTI, NRRD, MHA/MHD and DICOM series),
so a scan gives the same voxels and the same geometry whichever command reads it. nnU-Net's
default reader is SimpleITK too, so its data sets read here as they read there. nibabel is
used only for what ITK's NIfTI reader hides: voxel data that ends early (ITK fills the
missing part with zeros) and NaN or infinite voxels (ITK turns them into 0); one streaming
pass over the NIfTI file finds both, and the stored values are then taken as nibabel
decodes them, so the NaN check names them instead of training on zeros.

Every reader returns arrays in ``(D, H, W)`` = ``(z, y, x)`` order and spacings in
millimetres in the same ``(z, y, x)`` order, whatever the file stores. Origins and
directions are in ITK's LPS frame (ITK turns NIfTI's RAS into LPS when it reads).

Orientation is taken as the voxels are stored: arrays are not reoriented to a canonical
frame (RAS, LPS), so two files of one patient stored with different direction matrices give
differently flipped arrays. Data sets written by one tool (nnU-Net, the Medical Segmentation
Decathlon) store every case the same way, which is all slice-wise training needs, and
predictions are written back on the input's own grid. Oblique (rotated) grids read as they
are; a NIfTI affine with shear, which ITK cannot represent, is refused with the fix.
"""

from __future__ import annotations

import contextlib
import locale
import logging
import zipfile
from collections.abc import Iterator, Sequence
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
    "preserved_locale",
    "read_image",
    "image_array",
    "image_geometry",
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


def check_volume_complete(path: str | Path, case_id: str | None = None, channel: int | None = None) -> None:
    """Refuse a NIfTI file whose voxel data ends early or whose affine is sheared (and, given
    ``case_id``, one holding NaN or infinite voxels, named as training names them).

    ITK fills the missing part of a truncated NIfTI file (``.nii`` or ``.nii.gz``) with
    zeros and reports nothing, so a half-copied scan would be segmented as a half-empty
    volume. The header says how many bytes the voxels take; the file (decompressed for
    ``.nii.gz``, in one streaming pass) must hold them. Other formats are checked by their
    readers (ITK raises for short NRRD and MetaImage data).

    Raises:
        DataError: The file is shorter than its header says, its gzip stream is broken, its
            affine is sheared, or (with ``case_id``) a voxel is NaN or infinite.
    """
    path = Path(path)
    if volume_suffix(path) in _NIFTI_SUFFIXES and _scan_nifti(path) and case_id is not None:
        check_finite(_nifti_voxels(path, channel), path, case_id)  # says how many and where (in the channel read)


def _scan_nifti(path: Path) -> bool:
    """Read a NIfTI file's voxel bytes once, as a stream: refuse a truncated file, and say
    whether a floating-point volume holds NaN or infinite values.

    Both are things ITK's NIfTI reader (nifticlib) hides: it zero-fills missing data and
    replaces non-finite values with 0 without a word, so a broken scan would be trained on or
    segmented as if it were clean. nibabel reads only the header here.

    Returns:
        Whether some voxel is NaN or infinite (always ``False`` for integer types).

    Raises:
        DataError: The file is shorter than its header says, its gzip stream is broken, or
            its sform is sheared (ITK would quietly place it by its qform instead).
    """
    import gzip
    import zlib

    try:
        import nibabel as nib

        image = nib.load(str(path))
        _refuse_sheared_sform(image.header, path)
        dtype = np.dtype(image.get_data_dtype())
        offset = int(image.dataobj.offset)
        needed = offset + int(np.prod(image.shape)) * dtype.itemsize
        floating = dtype.kind == "f"
        if path.name.lower().endswith(".nii") and not floating:
            present, non_finite = path.stat().st_size, False
        else:
            present, non_finite, pending = 0, False, b""
            opener = open if path.name.lower().endswith(".nii") else gzip.open
            with opener(path, "rb") as stream:
                while present < needed:
                    chunk = stream.read(1 << 22)
                    if not chunk:
                        break
                    start = max(0, offset - present)  # the header's bytes are not voxels
                    present += len(chunk)
                    if floating and not non_finite and start < len(chunk):
                        data = pending + chunk[start:]
                        usable = len(data) - len(data) % dtype.itemsize
                        values = np.frombuffer(data[:usable], dtype=dtype)
                        non_finite = not np.isfinite(values).all()
                        pending = data[usable:]
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(
            f"Volume {path} is truncated or corrupt ({error}); replace it with an intact copy."
        ) from None
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types for broken headers
        raise DataError(f"Cannot read volume {path} ({error}); replace the file with an intact copy.") from None
    if present < needed:
        raise DataError(
            f"Volume {path} is truncated: its header needs {needed:,} bytes of voxels, the file holds {present:,}; "
            "replace it with an intact copy."
        )
    return non_finite


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


def read_volume_with_geometry(
    path: str | Path, label: bool = False, channel: int | None = None
) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a volume as :func:`read_volume` does, with its origin and direction too.

    Args:
        path: The volume file (any of ``VOLUME_SUFFIXES``).
        label: Whether the file is a label map (see :func:`read_volume`).
        channel: For a multi-channel 4D file (an MSD image with its modalities on a 4th
            axis), which channel to read; ``None`` refuses such a file.

    Returns:
        ``(array, geometry)``: the ``(D, H, W)`` voxels and where they lie.

    Raises:
        DataError: The file is missing, unreadable, not 3D, or has another suffix.
    """
    path = _existing_volume(path)
    image = read_image(path, channel=channel)
    array = image_array(image, path, label=label)
    return array, image_geometry(image)


def read_image(source: str | Path | Sequence[str | Path], channel: int | None = None) -> Any:
    """The one volume reader: a file or a DICOM series as a 3D, one-value-per-voxel ``SimpleITK.Image``.

    Training (through :func:`read_volume_with_geometry`), ``vpt-check-data`` and
    ``vpt-predict`` all read volumes here. Trailing singleton axes (NIfTI files are often
    stored 4D with one time point) are dropped.

    Args:
        source: A volume file (any of ``VOLUME_SUFFIXES``), or the files of one DICOM series
            in slice order.
        channel: For a 4D file with channels on its 4th axis (the Medical Segmentation
            Decathlon's multi-modal images), the channel to read; ``None`` refuses such a
            file. A 3D file is read as it is either way.

    Returns:
        The image, its voxels and geometry as ITK reads them.

    Raises:
        DataError: A missing, truncated or unreadable file or series, a sheared NIfTI
            affine, or an image that is not a 3D single-channel volume.
    """
    import SimpleITK as sitk

    non_finite = False
    if isinstance(source, (str, Path)):
        path = _existing_volume(source)
        if volume_suffix(path) in _NIFTI_SUFFIXES:
            non_finite = _scan_nifti(path)  # truncation and NaN, which ITK's NIfTI reader hides
        files = [str(path)]
    else:
        files = [str(file) for file in source]
        if not files:
            raise DataError("No DICOM files were given; pass the files of one series.")
        path = Path(files[0]).parent
    try:
        with preserved_locale():
            if len(files) == 1:
                image = sitk.ReadImage(files[0])
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                image = reader.Execute()
    except RuntimeError as error:
        raise _read_error(path, error) from None
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        size = list(image.GetSize())
        size[-1] = 0  # Extract drops an axis given size 0
        image = sitk.Extract(image, size, [0] * image.GetDimension())
    if channel is not None and image.GetDimension() == 4 and image.GetNumberOfComponentsPerPixel() == 1:
        count = int(image.GetSize()[3])
        if not 0 <= channel < count:
            raise DataError(f"Volume {path} has {count} channels on its 4th axis, no channel {channel}; pass one of 0..{count - 1}.")
        size = [*image.GetSize()[:3], 0]
        image = sitk.Extract(image, size, [0, 0, 0, channel])
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"Volume {path} has {image.GetDimension()} axes and {image.GetNumberOfComponentsPerPixel()} "
            "component(s) per voxel; save it as a 3D volume with one value per voxel (split multi-channel or "
            "time-series files into one file per channel, 2D images as .png)."
        )
    if non_finite:
        # ITK turned the NaN/inf voxels into 0; take the stored values, keep ITK's geometry,
        # so the NaN check of the caller names them rather than training on zeros.
        image = _with_stored_voxels(image, path, channel)
    return image


def _nifti_voxels(path: Path, channel: int | None = None) -> np.ndarray:
    """The float32 voxels of a NIfTI file as nibabel decodes them (NaN kept), ``(z, y, x)``
    (channel ``channel`` of a 4D file)."""
    import nibabel as nib

    array = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4 and channel is not None:
        array = array[..., channel]
    return np.ascontiguousarray(np.moveaxis(array, (0, 1, 2), (2, 1, 0)))  # (x, y, z) -> (z, y, x)


def _with_stored_voxels(image: Any, path: Path, channel: int | None = None) -> Any:
    """``image`` with its voxels as nibabel decodes them from the NIfTI file ``path``."""
    import SimpleITK as sitk

    stored = sitk.GetImageFromArray(_nifti_voxels(path, channel))
    stored.CopyInformation(image)
    return stored


def image_array(image: Any, path: str | Path, label: bool = False, case_id: str | None = None) -> np.ndarray:
    """The voxels of an image from :func:`read_image` as a contiguous ``(D, H, W)`` array.

    Args:
        image: The image.
        path: Its file, for messages.
        label: Whether it is a label map: values must be whole numbers and come back as the
            smallest fitting integer type (uint8 for up to 255 classes); else float32.
        case_id: With an image (not a label): insist that no voxel is NaN or infinite, naming
            this case.

    Returns:
        ``(D, H, W)`` = ``(z, y, x)`` voxels.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # already (z, y, x)
    array = _as_label(array, Path(path)) if label else array.astype(np.float32, copy=False)
    if case_id is not None and not label:
        check_finite(array, path, case_id)
    return np.ascontiguousarray(array)


def image_geometry(image: Any) -> VolumeGeometry:
    """Where the voxels of a 3D ``SimpleITK.Image`` (or of a reader that read a header) lie."""
    size = tuple(int(side) for side in image.GetSize())
    shape = (*size[:3][::-1], *size[3:])
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return VolumeGeometry(shape, *_itk_placement(image))


def read_volume_geometry(path: str | Path, channel: int | None = None) -> VolumeGeometry:
    """The shape, spacing, origin and direction of a volume file, read from its header without
    decoding voxels.

    Args:
        path: The volume file (any of ``VOLUME_SUFFIXES``).
        channel: For a multi-channel 4D file, the channel a reader would take: the shape is
            then that channel's ``(D, H, W)``.

    Returns:
        The geometry; ``shape`` as :func:`read_volume` would return the array (trailing
        singleton axes dropped).

    Raises:
        DataError: The file is missing, unreadable, or has another suffix.
    """
    import SimpleITK as sitk

    path = _existing_volume(path)
    if volume_suffix(path) in _NIFTI_SUFFIXES:
        import nibabel as nib

        try:
            header = nib.load(str(path)).header
        except Exception as error:  # nibabel raises many types for broken headers
            raise DataError(f"Cannot read volume {path} ({error}); replace the file with an intact copy.") from None
        _refuse_sheared_sform(header, path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise _read_error(path, error) from None
    geometry = image_geometry(reader)
    if channel is not None and len(geometry.shape) == 4:
        geometry = VolumeGeometry(geometry.shape[:3], geometry.spacing, geometry.origin, geometry.direction)
    return geometry


def read_volume_shape(path: str | Path) -> tuple[int, ...]:
    """The ``(D, H, W)`` shape of a volume file, read from its header without decoding voxels.

    Args:
        path: The volume file (any of ``VOLUME_SUFFIXES``).

    Returns:
        The shape as :func:`read_volume` would return it (trailing singleton axes dropped).
    """
    return read_volume_geometry(path).shape


@contextlib.contextmanager
def preserved_locale() -> Iterator[None]:
    """Run ITK's DICOM code (GDCM), which can switch the process to the "C" locale (later text
    I/O of the process would turn ASCII), and put the locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def _read_error(path: Path, error: BaseException) -> DataError:
    """One sentence for an ITK read failure (its first lines name C++ source files)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = (lines[-1] if lines else type(error).__name__)[:200]
    if "orthonormal" in reason:
        return _sheared(path)
    return DataError(f"Cannot read volume {path} ({reason}); replace the file with an intact copy.")


def _refuse_sheared_sform(header: Any, path: Path) -> None:
    """Refuse a NIfTI header whose sform is sheared: ITK would place the voxels by the qform
    instead, without a word, and predictions would not lie where the scan does."""
    if int(header["sform_code"]) > 0:
        linear = np.asarray(header.get_sform(), dtype=np.float64)[:3, :3]
        lengths = np.linalg.norm(linear, axis=0)
        unit = linear / np.where(lengths > 0, lengths, 1.0)
        if not np.allclose(unit.T @ unit, np.eye(3), atol=1e-4):
            raise _sheared(path)


def _sheared(path: Path) -> DataError:
    return DataError(
        f"Volume {path} has a sheared (non-orthonormal) affine, which ITK and so vpt cannot place; resample it "
        "onto an orthonormal grid (e.g. nibabel.processing.resample_from_to, or 3D Slicer's Harden transform) "
        "and write it again."
    )


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


def _itk_placement(image: Any) -> _Placement:
    """Spacing, origin and direction of the first three axes of an ITK image or header reader."""
    spacing = tuple(float(value) for value in image.GetSpacing())  # (x, y, z, ...)
    dimension = len(spacing)
    if dimension < 3:
        padded = (*spacing, 1.0, 1.0, 1.0)[:3]
        return (padded[2], padded[1], padded[0]), None, None
    origin = tuple(float(value) for value in image.GetOrigin()[:3])
    matrix = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)[:3, :3]
    direction = tuple(float(value) for value in matrix.ravel())
    return (spacing[2], spacing[1], spacing[0]), origin, direction


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
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((x, y, z))  # identity direction: ITK stores it in NIfTI as RAS diag(-x, -y, z)
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
