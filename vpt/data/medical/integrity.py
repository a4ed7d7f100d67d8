"""Check a whole data set folder at once and list every problem, like nnU-Net's
``verify_dataset_integrity`` but without stopping at the first one.

:func:`find_cases` and :func:`load_case` raise on the first bad case, which is right at the
start of a run but makes fixing a data set a loop of one error per attempt.
:func:`check_dataset` walks the folder itself and returns every :class:`Problem`;
:func:`examine_dataset` also says how many cases it checked.

What is checked depends on the layout (see :mod:`vpt.data.medical.layouts`):

- ``"nnunet"`` (nnU-Net v2 and Medical Segmentation Decathlon), in depth: ``dataset.json``
  (present, valid ``labels``, ``numTraining``, ``channel_names`` / ``modality``); images
  without labels and labels without images in ``imagesTr``/``labelsTr`` and
  ``imagesTs``/``labelsTs``; incomplete channels (``<case>_0000``, ``_0001``, ...); files
  that are no volume; image/label size, spacing, origin and direction from the headers;
  then, reading the voxels, NaN/inf image intensities, non-integer label values, label
  values that ``dataset.json`` does not declare, and training labels that are all
  background.
- ``"folder2d"``: missing and extra masks, image/mask size, mask values outside
  ``dataset.json`` (when there is one), empty masks, unreadable files.
- ``"synapse"`` (TransUNet's npz/h5): file names, slices of one case with different
  shapes, NaN/inf intensities, label values outside the 9 Synapse classes, empty training
  cases, unreadable files. The files store no geometry, so none is compared.

Each problem has a level. ``"error"`` means a loader or nnU-Net would reject the data, or
would silently train on something wrong (a label shifted by a different grid, a class
index with no name). ``"warning"`` marks what is legal but often a mistake. As nnU-Net does,
only size and spacing mismatches are errors: headers written by different tools often
disagree on origin and direction while the voxels still match, so those are warnings.
``numTraining`` is only bookkeeping (nothing reads it), an empty training label is a
legitimate negative case, and extra channels and stray files are ignored by the loaders;
these are warnings too. :data:`PROBLEM_LEVELS` lists every kind with its level.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpt.data.classification import IMAGE_EXTENSIONS, read_rgb
from vpt.data.medical.io import (
    VOLUME_SUFFIXES,
    VolumeGeometry,
    read_h5_volume,
    read_mask_2d,
    read_npz_slice,
    read_volume_geometry,
    read_volume_with_geometry,
    volume_suffix,
)
from vpt.data.medical.layouts import (
    # The naming rules find_cases uses: the check must see exactly the cases the loaders see.
    _CHANNEL,
    _MASK_SUFFIXES,
    _SYNAPSE_SLICE,
    LAYOUTS,
    SYNAPSE_CLASS_NAMES,
    class_names_from_dataset_json,
    detect_layout,
    geometry_mismatches,
)
from vpt.errors import DataError

__all__ = ["LEVELS", "PROBLEM_LEVELS", "DatasetCheck", "Problem", "check_dataset", "examine_dataset"]

_logger = logging.getLogger(__name__)

LEVELS = ("error", "warning")

#: Every kind of problem, with its level (see the module docstring for why).
PROBLEM_LEVELS: dict[str, str] = {
    "missing_folder": "error",  # imagesTr/, labelsTr/ (or images/, masks/) absent
    "missing_dataset_json": "error",
    "invalid_dataset_json": "error",  # unreadable JSON, bad "labels", "channel_names" or "numTraining"
    "no_cases": "error",  # no image at all in imagesTr/ (or images/, train_npz/)
    "bad_file_name": "error",  # a Synapse slice file not named <case>_slice<k>.npz
    "duplicate_case": "error",  # one case (or channel, or slice) in two files
    "missing_label": "error",  # a training image without its label
    "extra_label": "error",  # a label without its image
    "missing_channel": "error",  # <case>_0001 expected by dataset.json but absent
    "unreadable": "error",  # a file its reader rejects
    "not_3d": "error",  # a volume that is not one 3D channel
    "size_mismatch": "error",
    "spacing_mismatch": "error",
    "unknown_label_value": "error",  # a label value dataset.json does not declare
    "non_integer_label": "error",  # fractions, NaN or inf in a label
    "non_finite_image": "error",  # NaN or inf intensities
    "origin_mismatch": "warning",
    "direction_mismatch": "warning",
    "num_training_mismatch": "warning",
    "empty_label": "warning",  # a training label that is all background
    "extra_channel": "warning",  # a channel file beyond dataset.json's channel_names
    "unlabelled_test_case": "warning",  # an imagesTs/ image without a labelsTs/ label
    "unknown_file": "warning",  # a file the loaders ignore (not a volume, not an image)
}

_README = "data/README.md"
# How many offending values a message lists before it says "...".
_SHOWN_VALUES = 10


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set.

    Attributes:
        case: The case it concerns, ``None`` for the data set as a whole.
        file: The file it concerns, relative to the data set folder, ``None`` when none.
        kind: One of :data:`PROBLEM_LEVELS`' keys.
        message: One sentence saying what is wrong and how to fix it.
        level: ``"error"`` or ``"warning"``, as :data:`PROBLEM_LEVELS` gives for ``kind``.
    """

    case: str | None
    file: str | None
    kind: str
    message: str
    level: str = "error"


@dataclass(frozen=True)
class DatasetCheck:
    """What :func:`examine_dataset` found.

    Attributes:
        layout: The layout the folder was checked as.
        cases: How many cases (training and test, labelled or not) were checked.
        problems: As :func:`check_dataset` returns them.
    """

    layout: str
    cases: int
    problems: list[Problem]
    #: The cases checked as ``(folder or split, case id)``, sorted: ``("Tr", "case_001")``,
    #: ``("Ts", ...)``, ``("images", ...)`` (2D folders), ``("train_npz", ...)`` / ``("test_vol_h5", ...)``.
    case_ids: tuple[tuple[str, str], ...] = ()


class _Findings:
    """The problems found so far, and the cases looked at; paths are stored relative to the
    data set folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[Problem] = []
        # (split or folder, case id): the same id in a training and a test folder is two cases.
        self.cases: set[tuple[str, str]] = set()

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def add(self, kind: str, message: str, case: str | None = None, path: Path | None = None) -> None:
        file = None if path is None else self.relative(path)
        self.problems.append(Problem(case, file, kind, message, PROBLEM_LEVELS[kind]))


def check_dataset(root: str | Path, layout: str = "auto", read_values: bool = True) -> list[Problem]:
    """List every problem of a data set folder (:func:`examine_dataset`'s problems).

    Args:
        root: The data set folder.
        layout: One of ``LAYOUTS``, or ``"auto"`` to detect it as :func:`find_cases` does.
        read_values: Also read every voxel (NaN/inf, label values, empty labels); ``False``
            checks only names and headers, which is much faster for large sets.

    Returns:
        The problems, data set level ones first, then by case id (file order within a case).

    Raises:
        DataError: The folder does not exist, matches no layout, or ``layout`` is unknown.
    """
    return examine_dataset(root, layout, read_values).problems


def examine_dataset(root: str | Path, layout: str = "auto", read_values: bool = True) -> DatasetCheck:
    """Check a data set folder: every problem, and how many cases were checked.

    Args:
        root: The data set folder.
        layout: One of ``LAYOUTS``, or ``"auto"`` to detect it as :func:`find_cases` does.
        read_values: See :func:`check_dataset`.

    Returns:
        The layout, the number of cases checked (each case id of each folder pair, labelled
        or not, with problems or not) and the problems.

    Raises:
        DataError: As :func:`check_dataset`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist; pass the folder of a data set laid out as in {_README}.")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"Layout {layout!r} is not known; use auto or one of {', '.join(LAYOUTS)}.")
    findings = _Findings(root)
    checker = {"nnunet": _check_nnunet, "synapse": _check_synapse, "folder2d": _check_folder2d}[layout]
    checker(root, findings, read_values)
    problems = sorted(findings.problems, key=lambda problem: (problem.case is not None, problem.case or ""))
    errors = sum(problem.level == "error" for problem in problems)
    _logger.info(
        "%s (%s layout): %d cases, %d errors, %d warnings.", root, layout, len(findings.cases), errors, len(problems) - errors
    )
    return DatasetCheck(layout, len(findings.cases), problems, tuple(sorted(findings.cases)))


# -- shared helpers -------------------------------------------------------------------------


def _visible_files(folder: Path) -> list[Path]:
    """Sorted files of a folder, hidden ones left out (macOS ``._`` copies), as the loaders do."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def _listed(values: Iterable[Any]) -> str:
    values = list(values)
    shown = ", ".join(str(value) for value in values[:_SHOWN_VALUES])
    return shown + (", ..." if len(values) > _SHOWN_VALUES else "")


def _is_whole_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit()


def _declared_indices(labels: dict[str, Any]) -> frozenset[int]:
    """The class indices a ``labels`` mapping that :func:`class_names_from_dataset_json` accepted declares.

    Gaps are not filled: a voxel of an index the file never names is still reported.
    """
    indices = set()
    for key, value in labels.items():
        # MSD writes {"1": "liver"}, nnU-Net v2 {"liver": 1}.
        indices.add(int(key) if isinstance(value, str) and _is_whole_number(key) else int(value))
    return frozenset(indices)


@dataclass(frozen=True)
class _DatasetJson:
    """What ``dataset.json`` says that the check uses; ``None`` where it says nothing usable."""

    label_indices: frozenset[int] | None = None
    channels: frozenset[int] | None = None
    num_training: int | None = None


def _read_dataset_json(root: Path, findings: _Findings, required: bool) -> _DatasetJson:
    path = root / "dataset.json"
    if not path.is_file():
        if required:
            findings.add(
                "missing_dataset_json",
                f"{path} does not exist; add a dataset.json with the class names under 'labels' as in {_README}.",
                path=path,
            )
        return _DatasetJson()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        findings.add("invalid_dataset_json", f"Cannot read {path} ({error}); fix it to be valid JSON.", path=path)
        return _DatasetJson()
    if not isinstance(data, dict):
        findings.add(
            "invalid_dataset_json", f"{path} is not a JSON object; write it as {{\"labels\": ...}}.", path=path
        )
        return _DatasetJson()
    label_indices = None
    try:
        class_names_from_dataset_json(path)
        label_indices = _declared_indices(data["labels"])
    except DataError as error:
        findings.add("invalid_dataset_json", str(error), path=path)
        labels = data.get("labels")
        if isinstance(labels, dict) and len(labels) == 1:
            # Background only: still check the label files against it, so the values they hold are named.
            try:
                declared = _declared_indices(labels)
            except (TypeError, ValueError):
                declared = frozenset()
            label_indices = declared if declared == frozenset({0}) else None
    channels = None
    # nnU-Net v2 names channels "channel_names", the Decathlon "modality"; both {"0": "CT"}.
    channel_key = "channel_names" if "channel_names" in data else "modality" if "modality" in data else None
    if channel_key is not None:
        names = data[channel_key]
        if isinstance(names, dict) and names and all(_is_whole_number(key) for key in names):
            channels = frozenset(int(key) for key in names)
        else:
            findings.add(
                "invalid_dataset_json",
                f"{path} has {channel_key} {names!r}; write it as {{\"0\": \"CT\", \"1\": ...}} with one entry per "
                "image channel.",
                path=path,
            )
    num_training = None
    if "numTraining" in data:
        if _is_whole_number(data["numTraining"]):
            num_training = int(data["numTraining"])
        else:
            findings.add(
                "invalid_dataset_json",
                f"{path} has numTraining {data['numTraining']!r}; set it to the number of training cases.",
                path=path,
            )
    return _DatasetJson(label_indices, channels, num_training)


def _label_values(label: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label array, sorted.

    Counted slice by slice, so a large CT label needs no full-size int64 copy (as
    ``np.bincount`` or ``np.unique`` on the whole volume would).
    """
    if label.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(label.min()), int(label.max())
    if high - low > 65535:
        return np.unique(label).astype(np.int64)
    counts = np.zeros(high - low + 1, dtype=np.int64)
    for plane in label.reshape(label.shape[0], -1) if label.ndim > 1 else label[None]:
        counts += np.bincount(plane.astype(np.int64) - low, minlength=counts.size)
    return np.flatnonzero(counts) + low


def _check_value_set(
    findings: _Findings,
    values: np.ndarray,
    declared: frozenset[int] | None,
    case: str,
    path: Path,
    subject: str,
    source: str,
    training: bool,
) -> None:
    """Report label values ``declared`` lacks (negatives when nothing is declared), and empty training labels.

    Args:
        findings: Where to report.
        values: The distinct values of the label(s), sorted.
        declared: The class indices allowed, ``None`` when the data set declares none.
        case: The case.
        path: The file (or folder) the values came from.
        subject: What holds the values, to start the message (``"Label labelsTr/a.nii.gz"``).
        source: What declares the classes, for the message (``"dataset.json"``).
        training: Whether the label is a training label, which should not be all background.
    """
    if declared is None:
        unknown = [int(value) for value in values if value < 0]
    else:
        unknown = [int(value) for value in values if int(value) not in declared]
    if unknown:
        allowed = "0 or more" if declared is None else _listed(sorted(declared))
        findings.add(
            "unknown_label_value",
            f"{subject} holds value(s) {_listed(unknown)}, which {source} does not declare (declared: {allowed}); "
            f"fix the label{' or add the class(es) to dataset.json' if source == 'dataset.json' else ''}.",
            case,
            path,
        )
    if training and values.size and not np.any(values != 0):
        findings.add(
            "empty_label",
            f"{subject} is all background; check that it is the right file, or keep it as a case without "
            "foreground.",
            case,
            path,
        )


def _count_non_finite(image: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """How many voxels are NaN or inf, and the index of the first (``(0, ...)`` when none)."""
    if image.size == 0 or not np.issubdtype(image.dtype, np.floating):
        return 0, ()
    # min and max propagate NaN and show infinities without a full-size mask for clean images.
    if np.isfinite(image.min()) and np.isfinite(image.max()):
        return 0, ()
    finite = np.isfinite(image)
    first = tuple(int(index) for index in np.unravel_index(int(np.argmin(finite)), image.shape))
    return int(finite.size - np.count_nonzero(finite)), first


def _report_non_finite(findings: _Findings, count: int, first: tuple[int, ...], case: str, path: Path) -> None:
    findings.add(
        "non_finite_image",
        f"Image {findings.relative(path)} holds {count} NaN or inf voxel(s), the first at index {first}; replace them "
        "with a finite value such as the background intensity, or remove the case.",
        case,
        path,
    )


# -- nnU-Net / Medical Segmentation Decathlon -----------------------------------------------


@dataclass
class _VolumeCase:
    """The files of one case in an images/labels folder pair."""

    images: dict[int | None, list[Path]]  # by channel; None for an MSD-style <case>.<ext>
    labels: list[Path]

    def image_files(self) -> list[Path]:
        """One file per channel, the MSD-style image (if any) first, then by channel."""
        order = sorted(self.images, key=lambda channel: -1 if channel is None else channel)
        return [self.images[channel][0] for channel in order]


@dataclass(frozen=True)
class _Split:
    """One images/labels folder pair (``Tr`` or ``Ts``) and what its cases must have.

    Attributes:
        name: ``"Tr"`` or ``"Ts"``.
        training: Whether an image without label is an error (``Tr``) or may be unlabelled.
        labels_expected: Whether the labels folder exists, so a missing label is worth a warning.
        channels: The channel numbers every case needs, ``None`` when unknown.
        channels_declared: Whether ``channels`` come from ``dataset.json`` (else from other cases).
        label_indices: The class indices ``dataset.json`` declares, ``None`` when unknown.
    """

    name: str
    training: bool
    labels_expected: bool
    channels: frozenset[int] | None
    channels_declared: bool
    label_indices: frozenset[int] | None


def _check_nnunet(root: Path, findings: _Findings, read_values: bool) -> None:
    spec = _read_dataset_json(root, findings, required=True)
    for name in ("imagesTr", "labelsTr"):
        if not (root / name).is_dir():
            findings.add(
                "missing_folder",
                f"nnU-Net data folder {root} has no {name}/; add it as described in {_README}.",
                path=root / name,
            )
    training = _volume_cases(root / "imagesTr", root / "labelsTr", findings)
    if (root / "imagesTr").is_dir() and not any(case.images for case in training.values()):
        findings.add(
            "no_cases",
            f"{root / 'imagesTr'} holds no image volumes; add <case>_0000.nii.gz files as described in {_README}.",
            path=root / "imagesTr",
        )
    # Counted over images and labels alike, so a missing file is reported once, as missing.
    if spec.num_training is not None and spec.num_training != len(training):
        findings.add(
            "num_training_mismatch",
            f"dataset.json says numTraining is {spec.num_training} but imagesTr/ and labelsTr/ hold {len(training)} "
            f"cases; set numTraining to {len(training)} (or add the missing cases).",
            path=root / "dataset.json",
        )
    test = _volume_cases(root / "imagesTs", root / "labelsTs", findings)
    for name, cases in (("Tr", training), ("Ts", test)):
        channels = spec.channels
        if channels is None:  # without dataset.json, the channels any case of the folder has
            channels = frozenset(c for case in cases.values() for c in case.images if c is not None) or None
        split = _Split(
            name,
            training=name == "Tr",
            labels_expected=(root / f"labels{name}").is_dir(),
            channels=channels,
            channels_declared=spec.channels is not None,
            label_indices=spec.label_indices,
        )
        for case_id in sorted(cases):
            findings.cases.add((name, case_id))
            _check_volume_case(root, findings, split, case_id, cases[case_id], read_values)


def _volume_cases(images_dir: Path, labels_dir: Path, findings: _Findings) -> dict[str, _VolumeCase]:
    """Group the volume files of an images/labels folder pair by case, named as ``find_cases`` names them."""
    label_files: dict[str, list[Path]] = defaultdict(list)
    for path in _visible_files(labels_dir):
        suffix = volume_suffix(path)
        if suffix is None:
            _unknown_file(findings, path)
            continue
        label_files[path.name[: -len(suffix)]].append(path)
    cases: dict[str, _VolumeCase] = {}
    for path in _visible_files(images_dir):
        suffix = volume_suffix(path)
        if suffix is None:
            _unknown_file(findings, path)
            continue
        stem = path.name[: -len(suffix)]
        match = _CHANNEL.match(stem)
        if stem in label_files or match is None:
            case_id, channel = stem, None  # MSD names the image like its label
        else:
            case_id, channel = match.group("case"), int(match.group("channel"))
        case = cases.setdefault(case_id, _VolumeCase(defaultdict(list), []))
        case.images[channel].append(path)
    for case_id, paths in label_files.items():
        cases.setdefault(case_id, _VolumeCase(defaultdict(list), [])).labels.extend(paths)
    return cases


def _unknown_file(findings: _Findings, path: Path) -> None:
    findings.add(
        "unknown_file",
        f"{findings.relative(path)} is not a volume ({', '.join(VOLUME_SUFFIXES)}) and is ignored; remove or "
        "convert it.",
        path=path,
    )


def _check_volume_case(
    root: Path, findings: _Findings, split: _Split, case_id: str, case: _VolumeCase, read_values: bool
) -> None:
    """Names, then headers, then (with ``read_values``) voxels of one case."""
    if not _check_case_files(root, findings, split, case_id, case):
        return
    image_paths = case.image_files()
    label_path = case.labels[0] if case.labels else None
    geometries = {path: _header(findings, case_id, path) for path in [*image_paths, *case.labels[:1]]}
    # Every channel is compared with the label, or with the first channel when there is no label.
    reference_path = label_path if label_path is not None and geometries[label_path] else image_paths[0]
    reference = geometries[reference_path]
    if reference is not None:
        for path in image_paths:
            if path != reference_path and geometries[path] is not None:
                _compare_geometry(findings, case_id, path, geometries[path], reference_path, reference)
    if not read_values:
        return
    for path in image_paths:
        if geometries[path] is None:
            continue  # already reported; decoding it would only repeat the problem
        try:
            image, _ = read_volume_with_geometry(path)
        except DataError as error:
            findings.add("unreadable", str(error), case_id, path)
            continue
        count, first = _count_non_finite(image)
        if count:
            _report_non_finite(findings, count, first, case_id, path)
    if label_path is not None and geometries[label_path] is not None:
        values = _read_label_values(findings, case_id, label_path)
        if values is not None:
            subject = f"Label {findings.relative(label_path)}"
            _check_value_set(
                findings, values, split.label_indices, case_id, label_path, subject, "dataset.json", split.training
            )


def _check_case_files(root: Path, findings: _Findings, split: _Split, case_id: str, case: _VolumeCase) -> bool:
    """Report duplicate, missing and extra files of one case.

    Returns:
        Whether the case has an image, so its headers and voxels can be checked.
    """
    images_name, labels_name = f"images{split.name}", f"labels{split.name}"
    for paths in case.images.values():
        if len(paths) > 1:
            findings.add(
                "duplicate_case",
                f"Case {case_id} has {len(paths)} files for one image ({_listed(p.name for p in paths)}); keep one.",
                case_id,
                paths[1],
            )
    if None in case.images and len(case.images) > 1:
        findings.add(
            "duplicate_case",
            f"Case {case_id} has both an MSD-style image {case.images[None][0].name} and per-channel images "
            f"{case_id}_XXXX; keep one naming.",
            case_id,
            case.images[None][0],
        )
    if len(case.labels) > 1:
        findings.add(
            "duplicate_case",
            f"Case {case_id} has {len(case.labels)} label files ({_listed(p.name for p in case.labels)}); keep one.",
            case_id,
            case.labels[1],
        )
    if not case.images:
        findings.add(
            "extra_label",
            f"Label {findings.relative(case.labels[0])} has no image in {images_name}/; add "
            f"{images_name}/{case_id}_0000{volume_suffix(case.labels[0])} or remove the label.",
            case_id,
            case.labels[0],
        )
        return False
    first_image = case.image_files()[0]
    suffix = volume_suffix(first_image)
    if not case.labels and (split.training or split.labels_expected):
        kind = "missing_label" if split.training else "unlabelled_test_case"
        consequence = "" if split.training else ", so it is not tested"
        findings.add(
            kind,
            f"Image {findings.relative(first_image)} has no label {labels_name}/{case_id}{suffix}{consequence}; add "
            "the label or remove the image.",
            case_id,
            first_image,
        )
    present = {channel for channel in case.images if channel is not None}
    if present and split.channels is not None:
        missing = sorted(split.channels - present)
        if missing:
            names = [f"{case_id}_{channel:04d}{suffix}" for channel in missing]
            source = "dataset.json's channel_names expects" if split.channels_declared else "other cases have"
            findings.add(
                "missing_channel",
                f"Case {case_id} lacks image channel(s) {_listed(names)} in {images_name}/, which {source}; add them "
                "or remove the case.",
                case_id,
                root / images_name / names[0],
            )
        extra = sorted(present - split.channels) if split.channels_declared else []
        if extra:
            names = [f"{case_id}_{channel:04d}{suffix}" for channel in extra]
            findings.add(
                "extra_channel",
                f"Image channel(s) {_listed(names)} of case {case_id} are not in dataset.json's channel_names and are "
                "ignored; add them to channel_names or remove the files.",
                case_id,
                root / images_name / names[0],
            )
    return True


def _header(findings: _Findings, case_id: str, path: Path) -> VolumeGeometry | None:
    """A volume's geometry from its header, or ``None`` once its problem is reported."""
    try:
        geometry = read_volume_geometry(path)
    except DataError as error:
        findings.add("unreadable", str(error), case_id, path)
        return None
    if len(geometry.shape) != 3:
        findings.add(
            "not_3d",
            f"Volume {findings.relative(path)} has shape {geometry.shape} (z, y, x, ...) but one 3D channel is "
            "expected; split it into one file per channel (<case>_0000, <case>_0001, ...).",
            case_id,
            path,
        )
        return None
    return geometry


def _rounded(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(round(float(value), 4) for value in values)


def _compare_geometry(
    findings: _Findings, case_id: str, path: Path, geometry: VolumeGeometry, reference_path: Path,
    reference: VolumeGeometry,
) -> None:
    """Report how ``path``'s grid differs from ``reference_path``'s (the label, or channel 0)."""
    this, other = findings.relative(path), findings.relative(reference_path)
    # The loaders' own rule, so the check reports what training would refuse or warn about.
    mismatches = geometry_mismatches(reference, geometry)
    if "shape" in mismatches:
        findings.add(
            "size_mismatch",
            f"{this} has shape {geometry.shape} but {other} has {reference.shape} (z, y, x); resample one onto the "
            "other's grid or pair the right files.",
            case_id,
            path,
        )
    if "spacing" in mismatches:
        findings.add(
            "spacing_mismatch",
            f"{this} has voxel spacing {_rounded(geometry.spacing)} mm but {other} has {_rounded(reference.spacing)} "
            "mm (z, y, x); resample the label onto the image grid (nearest neighbour) or correct the header.",
            case_id,
            path,
        )
    if "origin" in mismatches:
        findings.add(
            "origin_mismatch",
            f"{this} has origin {_rounded(geometry.origin)} mm but {other} has {_rounded(reference.origin)} mm "
            "(x, y, z); check that the label is not shifted, or copy the image's origin into its header.",
            case_id,
            path,
        )
    if "direction" in mismatches:
        findings.add(
            "direction_mismatch",
            f"{this} has direction {_rounded(geometry.direction)} but {other} has {_rounded(reference.direction)}; "
            "check that the label is not flipped, or resample it onto the image grid.",
            case_id,
            path,
        )


def _read_label_values(findings: _Findings, case_id: str, path: Path) -> np.ndarray | None:
    """The distinct values of a label volume, or ``None`` once its problem is reported."""
    try:
        label, _ = read_volume_with_geometry(path, label=True)
        return _label_values(label)
    except DataError as error:
        rejection = str(error)
    # The label reader rejects NaN and fractions; read the voxels as an image to say which.
    try:
        values, _ = read_volume_with_geometry(path)
    except DataError:
        findings.add("unreadable", rejection, case_id, path)
        return None
    count, _ = _count_non_finite(values)
    finite = values[np.isfinite(values)]
    fractions = np.unique(finite[np.abs(finite - np.rint(finite)) > 1e-3])
    parts = ([f"{count} NaN or inf voxel(s)"] if count else []) + (
        [f"fractional values {_listed(_rounded(fractions))}"] if fractions.size else []
    )
    if not parts:  # rejected for another reason (dimensions, ...): say what the reader said
        findings.add("unreadable", rejection, case_id, path)
        return None
    findings.add(
        "non_integer_label",
        f"Label {findings.relative(path)} holds {' and '.join(parts)}, but labels must be class indices; resample it "
        "with nearest-neighbour interpolation or replace those voxels with the right class.",
        case_id,
        path,
    )
    return None


# -- 2D image and mask folders --------------------------------------------------------------


def _check_folder2d(root: Path, findings: _Findings, read_values: bool) -> None:
    spec = _read_dataset_json(root, findings, required=False)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            findings.add(
                "missing_folder",
                f"2D data folder {root} has no {folder.name}/; add images/ and masks/ as described in {_README}.",
                path=folder,
            )
    images: dict[str, list[Path]] = defaultdict(list)
    masks: dict[str, list[Path]] = defaultdict(list)
    for folder, suffixes, found in ((images_dir, IMAGE_EXTENSIONS, images), (masks_dir, _MASK_SUFFIXES, masks)):
        for path in _visible_files(folder):
            if path.suffix.lower() in suffixes:
                found[path.stem].append(path)
            else:
                findings.add(
                    "unknown_file",
                    f"{findings.relative(path)} is not one of {', '.join(suffixes)} and is ignored; remove or "
                    "convert it.",
                    path=path,
                )
    if images_dir.is_dir() and not images:
        findings.add("no_cases", f"{images_dir} holds no images; add them as described in {_README}.", path=images_dir)
    for name in sorted(set(images) | set(masks)):
        findings.cases.add(("images", name))
        for found in (images[name], masks[name]):
            if len(found) > 1:
                findings.add(
                    "duplicate_case",
                    f"{len(found)} files are named {name} ({_listed(p.name for p in found)}); keep one.",
                    name,
                    found[1],
                )
        if not images[name]:
            findings.add(
                "extra_label",
                f"Mask {findings.relative(masks[name][0])} has no image in images/; add the image or remove the mask.",
                name,
                masks[name][0],
            )
            continue
        image_path = images[name][0]
        if not masks[name]:
            findings.add(
                "missing_label",
                f"Image {findings.relative(image_path)} has no mask masks/{name}.png; add it or remove the image.",
                name,
                image_path,
            )
            continue
        if not read_values:
            continue
        mask_path = masks[name][0]
        try:
            mask = read_mask_2d(mask_path)
        except DataError as error:
            findings.add("unreadable", str(error), name, mask_path)
            mask = None
        try:
            image = read_rgb(image_path)
        except DataError as error:
            findings.add("unreadable", str(error), name, image_path)
            image = None
        if mask is None:
            continue
        if image is not None and image.shape[:2] != mask.shape:
            findings.add(
                "size_mismatch",
                f"Image {findings.relative(image_path)} is {image.shape[:2]} (H, W) but mask "
                f"{findings.relative(mask_path)} is {mask.shape}; resize the mask (nearest neighbour) or pair the "
                "right files.",
                name,
                mask_path,
            )
        subject = f"Mask {findings.relative(mask_path)}"
        _check_value_set(
            findings, _label_values(mask), spec.label_indices, name, mask_path, subject, "dataset.json", True
        )


# -- Synapse (TransUNet npz / h5) -----------------------------------------------------------


def _h5_case_id(path: Path) -> str:
    return re.sub(r"(\.npy)?\.(h5|hdf5)$", "", path.name)  # as find_cases names them


def _check_synapse(root: Path, findings: _Findings, read_values: bool) -> None:
    declared = frozenset(range(len(SYNAPSE_CLASS_NAMES)))
    source = "Synapse's 9 classes"  # no dataset.json: TransUNet's fixed organ list
    train_dir, test_dir = root / "train_npz", root / "test_vol_h5"
    slices: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in _visible_files(train_dir):
        match = _SYNAPSE_SLICE.match(path.name)
        if match is not None:
            slices[match.group("case")][int(match.group("number"))].append(path)
        elif path.name.endswith(".npz"):
            findings.add(
                "bad_file_name",
                f"Slice file {findings.relative(path)} is not named <case>_slice<k>.npz; rename it so slices group "
                "into cases.",
                path=path,
            )
        else:
            message = f"{findings.relative(path)} is not an .npz slice and is ignored; remove it."
            findings.add("unknown_file", message, path=path)
    volumes = []
    for path in _visible_files(test_dir):
        if path.name.endswith((".h5", ".hdf5")):
            volumes.append(path)
        else:
            message = f"{findings.relative(path)} is not an .h5 volume and is ignored; remove it."
            findings.add("unknown_file", message, path=path)
    if not slices and not volumes:
        findings.add(
            "no_cases",
            f"Synapse data folder {root} has no train_npz/*.npz or test_vol_h5/*.h5 files; add TransUNet's "
            f"preprocessed files as described in {_README}.",
        )
    findings.cases.update(("train_npz", case_id) for case_id in slices)
    findings.cases.update(("test_vol_h5", _h5_case_id(path)) for path in volumes)
    for case_id in sorted(slices):
        by_number = slices[case_id]
        for number in sorted(by_number):
            if len(by_number[number]) > 1:
                findings.add(
                    "duplicate_case",
                    f"Case {case_id} has {len(by_number[number])} files for slice {number} "
                    f"({_listed(p.name for p in by_number[number])}); keep one.",
                    case_id,
                    by_number[number][1],
                )
        if read_values:
            first_files = [by_number[number][0] for number in sorted(by_number)]
            _check_synapse_slices(findings, case_id, first_files, declared, source)
    if not read_values:
        return
    for path in volumes:
        case_id = _h5_case_id(path)
        try:
            image, label = read_h5_volume(path)
        except DataError as error:
            findings.add("unreadable", str(error), case_id, path)
            continue
        count, first = _count_non_finite(image)
        if count:
            _report_non_finite(findings, count, first, case_id, path)
        subject = f"Label of {findings.relative(path)}"
        _check_value_set(findings, _label_values(label), declared, case_id, path, subject, source, training=False)


def _check_synapse_slices(
    findings: _Findings, case_id: str, paths: list[Path], declared: frozenset[int], source: str
) -> None:
    """One training case: its slices' shapes, intensities and labels, each reported once per case."""
    shapes: dict[tuple[int, ...], Path] = {}
    values: set[int] = set()
    bad_images: list[tuple[Path, int]] = []
    for path in paths:
        try:
            image, label = read_npz_slice(path)
        except DataError as error:
            findings.add("unreadable", str(error), case_id, path)
            continue
        shapes.setdefault(label.shape, path)
        values.update(int(value) for value in _label_values(label))
        count, _ = _count_non_finite(image)
        if count:
            bad_images.append((path, count))
    if len(shapes) > 1:
        examples = list(shapes.values())  # the first slice file of each shape
        findings.add(
            "size_mismatch",
            f"Case {case_id} has slices of shapes {_listed(shapes)} (first {findings.relative(examples[0])}, then "
            f"{findings.relative(examples[1])}); resample its slices to one shape.",
            case_id,
            examples[1],
        )
    if bad_images:
        total = sum(count for _, count in bad_images)
        findings.add(
            "non_finite_image",
            f"Case {case_id} has {total} NaN or inf voxel(s) in {len(bad_images)} slice file(s), the first "
            f"{findings.relative(bad_images[0][0])}; replace them with a finite value or remove those slices.",
            case_id,
            bad_images[0][0],
        )
    if shapes:
        subject = f"Case {case_id} ({findings.relative(paths[0].parent)}/)"
        values_found = np.asarray(sorted(values), dtype=np.int64)
        _check_value_set(findings, values_found, declared, case_id, paths[0], subject, source, training=True)
