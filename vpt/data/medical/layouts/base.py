"""What every data set layout shares: the case records, the layout interface, ``dataset.json``
and the one geometry rule.

A layout (:class:`DatasetLayout`) is one way of laying a data set out on disk (nnU-Net v2,
the Medical Segmentation Decathlon, TransUNet's Synapse files, 2D image folders, vpt's
phantoms). One object per layout detects it, groups its files into cases, checks them and
loads them: ``vpt-check-data`` and the data module call the same object, so they see the same
cases by construction (the file grouping is one method, :meth:`DatasetLayout.scan`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vpt.data.loading import warn_once
from vpt.data.medical.io import VolumeGeometry
from vpt.errors import DataError

__all__ = [
    "SYNAPSE_CLASS_NAMES",
    "CASE_KINDS",
    "Case",
    "CaseIndex",
    "CaseArrays",
    "ScannedCase",
    "DatasetLayout",
    "class_names_from_dataset_json",
    "dataset_modality",
    "geometry_mismatches",
    "check_geometry",
]

_logger = logging.getLogger("vpt.data.medical.layouts")

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

README = "data/README.md"

CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

SYNAPSE_SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<number>\d+)\.npz$")

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")

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
        channel: For a volume file that may hold channels on a 4th axis (an MSD image), the
            channel to read; ``None``: the file must be 3D.
    """

    case_id: str
    image: Path
    label: Path | None = None
    kind: str = "volume"
    slice_files: tuple[Path, ...] = ()
    slice_numbers: tuple[int, ...] = ()
    channel: int | None = None


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


@dataclass(frozen=True)
class ScannedCase:
    """One case as a layout's :meth:`DatasetLayout.scan` grouped its files.

    Attributes:
        group: The folder or split it was found in: ``"Tr"``/``"Ts"`` (nnU-Net, MSD),
            ``"images"`` (2D folders), ``"train_npz"``/``"test_vol_h5"`` (Synapse).
        case_id: The case's name within its group.
        case: The record loaders read; ``None`` when the files cannot make a case (no image,
            no label where one is required, or two files for one), which the scan reported.
        role: Where loaders put it: ``"cases"`` (labelled, split into train/val/test),
            ``"test"`` (an official labelled test case) or ``"unlabeled"``.
        files: Layout-specific grouping the checks read (channels, slices), or ``None``.
        problems: The problems the scan reported for this case (in this group), when the
            layout records them; else its problems are found by case id.
    """

    group: str
    case_id: str
    case: Case | None
    role: str = "cases"
    files: Any = None
    problems: tuple[Any, ...] | None = None


class DatasetLayout:
    """One data set layout: detect it, group its files into cases, check and load them.

    Subclasses set :attr:`name`, :attr:`kinds` and :attr:`intensity` and implement
    :meth:`detect`, :meth:`scan`, :meth:`check_case` and :meth:`load`. :meth:`find_cases`
    (the loaders) and :meth:`check` (``vpt-check-data``) are built on :meth:`scan`.

    Attributes:
        name: The ``task.data.layout`` value.
        kinds: The :attr:`Case.kind` values it loads; each kind belongs to one layout.
        intensity: ``"raw"`` for scanner units to be windowed, ``"unit"`` for [0, 1].
        refused_at_load: Problem kinds a scan reports that stop a run at its start, as do
            error-level problems of a training case the scan could not make a record of; the
            others are legal or concern files loaders never read, and are logged once.
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    intensity: ClassVar[str] = "raw"
    refused_at_load: ClassVar[frozenset[str]] = frozenset(
        {"missing_folder", "no_cases", "bad_file_name", "duplicate_case", "missing_label"}
    )

    def detect(self, root: Path) -> bool:
        """Whether ``root`` (an existing folder) is laid out this way."""
        raise NotImplementedError

    def scan(self, root: Path, findings: Any) -> list[ScannedCase]:
        """Group the files of ``root`` into cases, reporting file-level problems (names,
        missing and duplicate files) to ``findings``; no file is decoded."""
        raise NotImplementedError

    def class_names(self, root: Path) -> tuple[str, ...] | None:
        """Class names by index, background first, ``None`` when the folder does not say.

        Raises:
            DataError: A ``dataset.json`` whose class names cannot be read.
        """
        json_path = root / "dataset.json"
        return class_names_from_dataset_json(json_path) if json_path.is_file() else None

    def check(self, root: Path, findings: Any, read_values: bool) -> None:
        """Every problem of the folder: the scan's, then each case's headers and (with
        ``read_values``) voxels."""
        scanned = self.scan(root, findings)
        findings.cases.update((item.group, item.case_id) for item in scanned)
        for item in sorted(scanned, key=lambda item: (item.group, item.case_id)):
            self.check_case(root, findings, item, read_values)

    def check_case(self, root: Path, findings: Any, item: ScannedCase, read_values: bool) -> None:
        """Headers and voxels of one scanned case (its file problems are already reported)."""
        raise NotImplementedError

    def find_cases(self, root: Path) -> CaseIndex:
        """The cases loaders use: the scan's, refused at its first problem that would make a
        run wrong (see :attr:`refused_at_load`), other problems logged once.

        Raises:
            DataError: A refused problem (its message, naming the folder), or a
                ``dataset.json`` whose class names cannot be read.
        """
        from vpt.data.medical.layouts.checks import Findings

        class_names = self.class_names(root)
        findings = Findings(root)
        scanned = self.scan(root, findings)
        # A training case the scan could not make a record of (no channel 0, say) stops the run
        # too, with the scan's words; a label without an image is only a stray file here.
        unusable = [item for item in scanned if item.case is None and item.role == "cases"]
        unusable_ids = {item.case_id for item in unusable if item.problems is None}
        unusable_problems = {id(problem) for item in unusable for problem in item.problems or ()}

        def stops_the_run(problem: Any) -> bool:
            if problem.kind in self.refused_at_load:
                return True
            of_unusable = id(problem) in unusable_problems or problem.case in unusable_ids
            return of_unusable and problem.kind != "extra_label"

        # A folder of official test cases alone can still be evaluated (vpt-evaluate split=test).
        has_test = any(item.role == "test" and item.case is not None for item in scanned)
        refused = [
            problem for problem in findings.problems
            if problem.level == "error" and stops_the_run(problem) and not (problem.kind == "no_cases" and has_test)
        ]
        if refused:
            message = refused[0].message
            raise DataError(message if str(root) in message else f"{root}: {message}")
        tolerated = [problem for problem in findings.problems if problem.kind not in self.refused_at_load]
        for kind in dict.fromkeys(problem.kind for problem in tolerated):
            same = [problem for problem in tolerated if problem.kind == kind]
            warn_once(
                _logger, "%s: %d %s problem(s) the loaders work around, e.g. %s (vpt-check-data %s lists them all).",
                root, len(same), kind, same[0].message, root,
            )
        roles: dict[str, list[Case]] = {"cases": [], "test": [], "unlabeled": []}
        for item in scanned:
            if item.case is not None:
                roles[item.role].append(item.case)
        ordered = {role: tuple(sorted(cases, key=lambda case: case.case_id)) for role, cases in roles.items()}
        return CaseIndex(
            self.name, root, class_names, ordered["cases"], ordered["test"], ordered["unlabeled"], self.intensity
        )

    def load(self, case: Case, label_only: bool = False) -> CaseArrays:
        """The arrays of one case (see :func:`vpt.data.medical.layouts.load_case`)."""
        raise NotImplementedError


def visible_files(folder: Path) -> list[Path]:
    """Sorted files of a folder, without hidden files (macOS ``._`` copies break readers); none
    when the folder does not exist."""
    if not folder.is_dir():
        return []
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


def shape_mismatch(case: Case, image_shape: tuple[int, ...], label_shape: tuple[int, ...]) -> DataError:
    return DataError(
        f"Case {case.case_id}: image {case.image} has shape {image_shape} but label {case.label} has shape "
        f"{label_shape}; resample the label onto the image grid or pair the right files."
    )


def rounded(values: tuple[float, ...]) -> tuple[float, ...]:
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
        raise shape_mismatch(case, image.shape, label.shape)
    if "spacing" in mismatches:
        raise DataError(
            f"Case {case.case_id}: image {case.image} has voxel spacing {rounded(image.spacing)} mm but label "
            f"{case.label} has {rounded(label.spacing)} mm (z, y, x); resample the label onto the image grid "
            "(nearest neighbour) or correct the spacing in the label's header."
        )
    if "origin" in mismatches:
        warn_once(
            _logger,
            "Case %s: image %s has origin %s mm but label %s has %s mm (x, y, z); they are paired voxel by "
            "voxel, so check that the label is not shifted or resample it onto the image grid.",
            case.case_id, case.image, rounded(image.origin), case.label, rounded(label.origin),
        )
    if "direction" in mismatches:
        warn_once(
            _logger,
            "Case %s: image %s and label %s have different direction matrices %s and %s; they are paired "
            "voxel by voxel, so check that the label is not flipped or resample it onto the image grid.",
            case.case_id, case.image, case.label, rounded(image.direction), rounded(label.direction),
        )
