"""Find the cases of a segmentation data set laid out on disk, and load one case.

Three layouts are understood (see ``data/README.md``):

- ``"nnunet"``: the nnU-Net / Medical Segmentation Decathlon raw layout::

      root/dataset.json                  class names under "labels"
      root/imagesTr/<case>_0000.nii.gz   nnU-Net v2 (channel 0000), or <case>.nii.gz (MSD)
      root/labelsTr/<case>.nii.gz
      root/imagesTs/ (+ labelsTs/)       optional; without labelsTs the cases are unlabelled

  Volumes may be ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.mhd``; intensities are
  raw scanner units (HU for CT) and are windowed later.
- ``"synapse"``: TransUNet's preprocessed Synapse multi-organ CT::

      root/train_npz/<case>_slice<k>.npz   2D slices, arrays "image" and "label"
      root/test_vol_h5/<case>.npy.h5       3D volumes (D, H, W), datasets "image" and "label"

  TransUNet's preprocessing already clipped the images to [-125, 275] HU and scaled them to
  [0, 1], and kept no spacing, so Synapse distances are in voxels.
- ``"folder2d"``: 2D images with same-named masks whose pixel values are class indices::

      root/images/<name>.png|jpg|...
      root/masks/<name>.png
      root/dataset.json                  optional, class names as for nnU-Net

Every layout yields :class:`Case` records; :func:`load_case` turns one into arrays.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpt.data.classification import IMAGE_EXTENSIONS, read_rgb
from vpt.data.loading import warn_once
from vpt.data.medical.io import (
    VolumeGeometry,
    check_finite,
    read_h5_volume,
    read_mask_2d,
    read_npz_slice,
    read_volume_geometry,
    read_volume_with_geometry,
    volume_suffix,
)
from vpt.errors import DataError
from vpt.messages import log_setup

__all__ = [
    "LAYOUTS",
    "SYNAPSE_CLASS_NAMES",
    "Case",
    "CaseIndex",
    "CaseArrays",
    "detect_layout",
    "find_cases",
    "class_names_from_dataset_json",
    "check_geometry",
    "load_case",
]

_logger = logging.getLogger(__name__)

LAYOUTS = ("nnunet", "synapse", "folder2d")

# TransUNet's label order for the 8 Synapse organs; "left"/"right" are the patient's sides.
SYNAPSE_CLASS_NAMES = (
    "background",
    "aorta",
    "gallbladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "spleen",
    "stomach",
)

_README = "data/README.md"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SYNAPSE_SLICE = re.compile(r"^(?P<case>.+)_slice(?P<number>\d+)\.npz$")
_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")

# Image and label spacings may differ by float rounding in their headers, not by more.
_SPACING_RTOL = 1e-3
# Origins may differ by a rounding error of a small share of a voxel, directions by as little.
_ORIGIN_VOXEL_SHARE = 1e-2
_DIRECTION_ATOL = 1e-3

# How a case is stored; load_case reads each kind its own way.
CASE_KINDS = ("volume", "synapse_slices", "synapse_volume", "image2d")


@dataclass(frozen=True)
class Case:
    """One case (patient, scan or 2D image): where its image and label live.

    Attributes:
        case_id: Unique name of the case within its data set (the split unit).
        image: The image file; for ``"synapse_slices"`` the ``train_npz`` folder.
        label: The label file, ``None`` for unlabelled cases; for Synapse the file that
            also holds the image.
        kind: One of ``"volume"``, ``"synapse_slices"``, ``"synapse_volume"``, ``"image2d"``.
        slice_files: For ``"synapse_slices"``: one ``.npz`` per slice, in slice order.
        slice_numbers: For ``"synapse_slices"``: the ``<k>`` of each slice file.
    """

    case_id: str
    image: Path
    label: Path | None = None
    kind: str = "volume"
    slice_files: tuple[Path, ...] = ()
    slice_numbers: tuple[int, ...] = ()


@dataclass(frozen=True)
class CaseIndex:
    """The cases of one data set folder.

    Attributes:
        layout: One of ``LAYOUTS``.
        root: The data set folder.
        class_names: Names by class index, background first; ``None`` when the folder does
            not say (then ``num_classes`` must be given).
        cases: Labelled cases to split into train/val (and test when ``test`` is empty).
        test: Labelled cases of an official test split (Synapse ``test_vol_h5``, nnU-Net
            ``imagesTs`` with ``labelsTs``).
        unlabeled: Cases without labels (nnU-Net ``imagesTs`` without ``labelsTs``).
        intensity: ``"raw"`` for scanner units to be windowed (HU for CT), ``"unit"`` for
            images already in [0, 1].
    """

    layout: str
    root: Path
    class_names: tuple[str, ...] | None
    cases: tuple[Case, ...]
    test: tuple[Case, ...] = ()
    unlabeled: tuple[Case, ...] = ()
    intensity: str = "raw"


@dataclass
class CaseArrays:
    """The arrays of one loaded case.

    Attributes:
        image: ``(D, H, W)`` float32 (raw units or [0, 1], see ``CaseIndex.intensity``), or
            ``(D, H, W, 3)`` for colour 2D images; ``None`` when only the label was read.
        label: ``(D, H, W)`` integer class indices, ``None`` for unlabelled cases.
        spacing: Voxel size in mm as ``(z, y, x)``, ``None`` when unknown.
        slice_numbers: ``(D,)`` int64 slice number of each slice (its index in the volume,
            or the ``<k>`` of Synapse slice files).
    """

    image: np.ndarray | None
    label: np.ndarray | None
    spacing: tuple[float, float, float] | None
    slice_numbers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _missing_root(root: Path) -> DataError:
    return DataError(
        f"Data folder {root} does not exist; set task.data.root to a data set folder laid out as in {_README}."
    )


def detect_layout(root: str | Path) -> str:
    """Tell the layout of a data set folder from the sub-folders it has.

    Args:
        root: The data set folder.

    Returns:
        One of ``LAYOUTS``.

    Raises:
        DataError: The folder is missing or matches no layout.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing_root(root)
    if (root / "imagesTr").is_dir() or ((root / "dataset.json").is_file() and not (root / "images").is_dir()):
        return "nnunet"
    if (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir():
        return "synapse"
    if (root / "images").is_dir():
        return "folder2d"
    raise DataError(
        f"Data folder {root} has none of imagesTr/ (nnU-Net), train_npz/ or test_vol_h5/ (Synapse), or "
        f"images/ + masks/ (2D); arrange it as described in {_README}."
    )


def find_cases(root: str | Path, layout: str = "auto") -> CaseIndex:
    """List the cases of a data set folder.

    Args:
        root: The data set folder.
        layout: One of ``LAYOUTS``, or ``"auto"`` to detect it from the sub-folders.

    Returns:
        The cases and class names found (no image is decoded).

    Raises:
        DataError: Missing folders, no cases, images without labels, bad ``dataset.json``.
    """
    root = Path(root).expanduser()
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"Layout {layout!r} is not known; set task.data.layout to auto or one of {', '.join(LAYOUTS)}.")
    if not root.is_dir():
        raise _missing_root(root)
    scanner = {"nnunet": _find_nnunet, "synapse": _find_synapse, "folder2d": _find_folder2d}[layout]
    index = scanner(root)
    if not index.cases and not index.test:
        raise DataError(f"Data folder {root} holds no labelled cases; add cases laid out as described in {_README}.")
    log_setup(
        _logger, logging.INFO, "%s (%s layout): %d labelled cases, %d official test cases, %d unlabelled.",
        root, layout, len(index.cases), len(index.test), len(index.unlabeled),
    )
    return index


def _visible_files(folder: Path) -> list[Path]:
    """Sorted files of a folder, without hidden files (macOS ``._`` copies break readers)."""
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()) is not None


def class_names_from_dataset_json(path: str | Path) -> tuple[str, ...]:
    """Read class names, ordered by index, from an nnU-Net or MSD ``dataset.json``.

    nnU-Net v2 writes ``"labels": {"background": 0, "liver": 1}``; the Medical Segmentation
    Decathlon writes ``"labels": {"0": "background", "1": "liver"}``. Both are understood.
    Missing indices are named ``class_<i>``.

    Args:
        path: The ``dataset.json`` file.

    Returns:
        Class names by index, background (index 0) first.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist; add a dataset.json with the class names under 'labels'.") from error
    except (OSError, ValueError) as error:
        raise DataError(f"Cannot read {path} ({error}); fix it to be valid JSON.") from error
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path} has no 'labels' mapping; add one like {{\"background\": 0, \"liver\": 1}}.")
    by_index: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, str) and _is_integer(key):  # MSD: {"1": "liver"}
            index, name = int(key), value
        elif _is_integer(value):  # nnU-Net v2: {"liver": 1}
            index, name = int(value), str(key)
        elif isinstance(value, (list, tuple)):
            raise DataError(
                f"{path} defines region {key!r} as several labels {value}; region-based labels are not "
                "supported, give each class one integer."
            )
        else:
            raise DataError(f"{path} maps label {key!r} to {value!r}; use {{name: index}} or {{\"index\": name}}.")
        if index in by_index:
            raise DataError(
                f"{path} gives index {index} to both {by_index[index]!r} and {name!r}; make indices unique."
            )
        by_index[index] = name
    if 0 not in by_index:
        raise DataError(f"{path} has no label 0; add the background as label 0.")
    if len(by_index) == 1:
        # Said here, from the data, rather than later as an invalid class count the user never set.
        raise DataError(
            f"{path} declares only the background ('labels': {labels}); add each foreground class the label "
            f"files hold, like {{\"background\": 0, \"lesion\": 1}} (vpt-check-data {path.parent} lists the "
            "values the labels hold)."
        )
    size = max(by_index) + 1
    gaps = [index for index in range(size) if index not in by_index]
    if gaps:
        _logger.warning("%s names no class for label(s) %s; calling them class_<i>.", path, gaps)
    return tuple(by_index.get(index, f"class_{index}") for index in range(size))


def dataset_modality(root: str | Path) -> str | None:
    """The first channel's modality from ``dataset.json`` (``"CT"``, ``"MRI"``, ``"T2"`` ...).

    nnU-Net v2 writes ``"channel_names": {"0": "CT"}``, the Medical Segmentation Decathlon
    ``"modality": {"0": "CT"}``. ``None`` when the folder has no such entry.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # class_names_from_dataset_json reports a broken file
    channels = (data.get("channel_names") or data.get("modality")) if isinstance(data, dict) else None
    if not isinstance(channels, dict) or not channels:
        return None
    first = channels.get("0", channels.get(0, next(iter(channels.values()))))
    return str(first) if first is not None else None


def _find_nnunet(root: Path) -> CaseIndex:
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DataError(f"nnU-Net data folder {root} has no imagesTr/; add it as described in {_README}.")
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DataError(
            f"nnU-Net data folder {root} has no labelsTr/; add the label volumes as described in {_README}."
        )
    json_path = root / "dataset.json"
    class_names = class_names_from_dataset_json(json_path) if json_path.is_file() else None
    cases = _pair_volumes(images_dir, labels_dir, required=True)
    test: list[Case] = []
    unlabeled: list[Case] = []
    if (root / "imagesTs").is_dir():
        labels_ts = root / "labelsTs"
        found = _pair_volumes(root / "imagesTs", labels_ts if labels_ts.is_dir() else None, required=False)
        test = [case for case in found if case.label is not None]
        unlabeled = [case for case in found if case.label is None]
        if test and unlabeled:
            _logger.warning(
                "%d images in %s have no label in %s; they are not used.", len(unlabeled), root / "imagesTs", labels_ts
            )
    return CaseIndex("nnunet", root, class_names, tuple(cases), tuple(test), tuple(unlabeled), intensity="raw")


def _pair_volumes(images_dir: Path, labels_dir: Path | None, required: bool) -> list[Case]:
    """Match every image volume of a folder with its label volume.

    Args:
        images_dir: ``imagesTr`` or ``imagesTs``.
        labels_dir: The matching labels folder, ``None`` when there is none.
        required: Whether an image without label is an error (training) or unlabelled (test).

    Returns:
        Cases sorted by id.
    """
    label_files: dict[str, Path] = {}
    if labels_dir is not None:
        for path in _visible_files(labels_dir):
            suffix = volume_suffix(path)
            if suffix is not None:
                label_files[path.name[: -len(suffix)]] = path
    cases: dict[str, Case] = {}
    skipped_channels = 0
    for path in _visible_files(images_dir):
        suffix = volume_suffix(path)
        if suffix is None:
            continue
        stem = path.name[: -len(suffix)]
        match = _CHANNEL.match(stem)
        if stem in label_files or match is None:
            case_id = stem  # MSD names the image like its label
        elif match.group("channel") == "0000":
            case_id = match.group("case")
        else:
            skipped_channels += 1  # vpt feeds one channel (replicated to RGB) to the backbone
            continue
        if case_id in cases:
            raise DataError(f"Case {case_id} has two image files in {images_dir}; keep one ({path.name}).")
        label = label_files.get(case_id)
        if label is None and required:
            raise DataError(
                f"Image {path} has no label {labels_dir}/{case_id}{suffix}; add the label or remove the image."
            )
        cases[case_id] = Case(case_id, path, label, kind="volume")
    if skipped_channels:
        _logger.warning(
            "%s: ignoring %d image files of channels other than _0000; only the first channel is used.",
            images_dir, skipped_channels,
        )
    return [cases[case_id] for case_id in sorted(cases)]


def _find_synapse(root: Path) -> CaseIndex:
    cases: list[Case] = []
    train_dir = root / "train_npz"
    if train_dir.is_dir():
        slices: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for path in _visible_files(train_dir):
            if not path.name.endswith(".npz"):
                continue
            match = _SYNAPSE_SLICE.match(path.name)
            if match is None:
                raise DataError(
                    f"Slice file {path} is not named <case>_slice<k>.npz; rename it so slices group into cases."
                )
            slices[match.group("case")].append((int(match.group("number")), path))
        for case_id in sorted(slices):
            ordered = sorted(slices[case_id])
            numbers = [number for number, _ in ordered]
            if len(set(numbers)) != len(numbers):
                raise DataError(f"Case {case_id} in {train_dir} has two files for one slice number; keep one of each.")
            cases.append(
                Case(
                    case_id,
                    train_dir,
                    train_dir,
                    kind="synapse_slices",
                    slice_files=tuple(path for _, path in ordered),
                    slice_numbers=tuple(numbers),
                )
            )
    test: list[Case] = []
    test_dir = root / "test_vol_h5"
    if test_dir.is_dir():
        for path in _visible_files(test_dir):
            if path.name.endswith((".h5", ".hdf5")):
                case_id = re.sub(r"(\.npy)?\.(h5|hdf5)$", "", path.name)
                test.append(Case(case_id, path, path, kind="synapse_volume"))
    if not cases and not test:
        raise DataError(
            f"Synapse data folder {root} has no train_npz/*.npz or test_vol_h5/*.h5 files; "
            f"add TransUNet's preprocessed files as described in {_README}."
        )
    return CaseIndex("synapse", root, SYNAPSE_CLASS_NAMES, tuple(cases), tuple(test), intensity="unit")


def _find_folder2d(root: Path) -> CaseIndex:
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(
                f"2D data folder {root} has no {folder.name}/; add images/ and masks/ as described in {_README}."
            )
    masks = {path.stem: path for path in _visible_files(masks_dir) if path.suffix.lower() in _MASK_SUFFIXES}
    cases: list[Case] = []
    seen: set[str] = set()
    for path in _visible_files(images_dir):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in seen:
            raise DataError(f"Two images in {images_dir} are named {path.stem}; give each image its own name.")
        seen.add(path.stem)
        mask = masks.get(path.stem)
        if mask is None:
            raise DataError(f"Image {path} has no mask {masks_dir / (path.stem + '.png')}; add it or remove the image.")
        cases.append(Case(path.stem, path, mask, kind="image2d"))
    if not cases:
        raise DataError(
            f"Image folder {images_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
            f"add them as described in {_README}."
        )
    json_path = root / "dataset.json"
    class_names = class_names_from_dataset_json(json_path) if json_path.is_file() else None
    return CaseIndex("folder2d", root, class_names, tuple(cases), intensity="unit")


def _shape_mismatch(case: Case, image_shape: tuple[int, ...], label_shape: tuple[int, ...]) -> DataError:
    return DataError(
        f"Case {case.case_id}: image {case.image} has shape {image_shape} but label {case.label} has shape "
        f"{label_shape}; resample the label onto the image grid or pair the right files."
    )


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(value), 4) for value in values)


def geometry_mismatches(image: VolumeGeometry, label: VolumeGeometry) -> list[str]:
    """Which of ``"shape"``, ``"spacing"``, ``"origin"``, ``"direction"`` differ between two grids.

    The one rule the loaders (:func:`check_geometry`) and ``vpt-check-data`` share: spacing to
    0.1 % (header rounding), origin to 1 % of the smallest voxel side, direction cosines to
    1e-3. Origin and direction are only compared when both headers carry them.
    """
    found = []
    if tuple(image.shape) != tuple(label.shape):
        found.append("shape")
    if len(image.spacing) != len(label.spacing) or not np.allclose(label.spacing, image.spacing, rtol=_SPACING_RTOL, atol=1e-6):
        found.append("spacing")
    if image.origin is not None and label.origin is not None:
        tolerance = _ORIGIN_VOXEL_SHARE * min(image.spacing)
        if not np.allclose(label.origin, image.origin, rtol=1e-5, atol=tolerance):
            found.append("origin")
    if image.direction is not None and label.direction is not None:
        if not np.allclose(label.direction, image.direction, atol=_DIRECTION_ATOL):
            found.append("direction")
    return found


def check_geometry(case: Case, image: VolumeGeometry, label: VolumeGeometry) -> None:
    """Check that a case's label lies on its image's voxel grid.

    Shape and spacing must agree (spacing to 0.1 %), since image and label are paired voxel by
    voxel and distances (HD95) use the spacing. Origin and direction differences only warn,
    as nnU-Net does: headers written by different tools often disagree there while the
    voxels still match.

    Args:
        case: The case, for the messages.
        image: The image's geometry.
        label: The label's geometry.

    Raises:
        DataError: Shapes or spacings differ.
    """
    mismatches = geometry_mismatches(image, label)
    if "shape" in mismatches:
        raise _shape_mismatch(case, image.shape, label.shape)
    if "spacing" in mismatches:
        raise DataError(
            f"Case {case.case_id}: image {case.image} has voxel spacing {_rounded(image.spacing)} mm but label "
            f"{case.label} has {_rounded(label.spacing)} mm (z, y, x); resample the label onto the image grid "
            "(nearest neighbour) or correct the spacing in the label's header."
        )
    if "origin" in mismatches:
        warn_once(
            _logger,
            "Case %s: image %s has origin %s mm but label %s has %s mm (x, y, z); they are paired voxel by "
            "voxel, so check that the label is not shifted or resample it onto the image grid.",
            case.case_id, case.image, _rounded(image.origin), case.label, _rounded(label.origin),
        )
    if "direction" in mismatches:
        warn_once(
            _logger,
            "Case %s: image %s and label %s have different direction matrices %s and %s; they are paired "
            "voxel by voxel, so check that the label is not flipped or resample it onto the image grid.",
            case.case_id, case.image, case.label, _rounded(image.direction), _rounded(label.direction),
        )


def load_case(case: Case, label_only: bool = False) -> CaseArrays:
    """Read the image and label of one case.

    Args:
        case: A case from :func:`find_cases`.
        label_only: Read only the label (for scanning labels cheaply).

    Returns:
        The case's arrays, ``(D, H, W)`` each (a 2D image is one slice, ``D = 1``).

    Raises:
        DataError: Unreadable files, image and label of different shapes or spacings, or an
            image with NaN or infinite values.
    """
    if case.kind == "volume":
        label = label_geometry = None
        if case.label is not None:
            label, label_geometry = read_volume_with_geometry(case.label, label=True)
        image = None
        if not label_only or case.label is None:
            image, image_geometry = read_volume_with_geometry(case.image)
            check_finite(image, case.image, case.case_id)
        else:
            image_geometry = read_volume_geometry(case.image)  # header only: mismatches show without decoding
        if label_geometry is not None:
            check_geometry(case, image_geometry, label_geometry)
        depth = (label if label is not None else image).shape[0]
        return CaseArrays(image, label, image_geometry.spacing, np.arange(depth, dtype=np.int64))
    if case.kind == "synapse_volume":
        image, label = read_h5_volume(case.image, label_only=label_only)
        if image is not None:
            check_finite(image, case.image, case.case_id)
        return CaseArrays(image, label, None, np.arange(label.shape[0], dtype=np.int64))
    if case.kind == "synapse_slices":
        pairs = [read_npz_slice(path, label_only=label_only) for path in case.slice_files]
        for path, (image_slice, _) in zip(case.slice_files, pairs):
            if image_slice is not None:
                check_finite(image_slice, path, case.case_id)
        shapes = {label.shape for _, label in pairs}
        if len(shapes) > 1:
            raise DataError(
                f"Case {case.case_id} has slices of different shapes {sorted(shapes)} in {case.image}; "
                "resample its slices to one shape."
            )
        label = np.stack([label for _, label in pairs])
        image = None if label_only else np.stack([image for image, _ in pairs])
        return CaseArrays(image, label, None, np.asarray(case.slice_numbers, dtype=np.int64))
    if case.kind == "image2d":
        label = read_mask_2d(case.label) if case.label is not None else None
        image = None
        if not label_only or label is None:
            rgb = read_rgb(case.image)
            if label is not None and rgb.shape[:2] != label.shape:
                raise _shape_mismatch(case, rgb.shape[:2], label.shape)
            grey = bool((rgb == rgb[..., :1]).all())
            # Grey images are kept as one channel: the data module replicates it to RGB anyway.
            image = (rgb[None, ..., 0] if grey else rgb[None]).astype(np.float32) / 255.0
        return CaseArrays(image, None if label is None else label[None], None, np.zeros(1, dtype=np.int64))
    raise DataError(f"Case {case.case_id} has unknown kind {case.kind!r}; use one of {', '.join(CASE_KINDS)}.")
