"""Problems found in a data set, and the checks every layout shares (headers, label values,
NaN/inf), reported the way ``vpt-check-data`` prints them.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpt.data.medical.io import VolumeGeometry, read_volume_geometry, read_volume_with_geometry
from vpt.data.medical.layouts.base import README, class_names_from_dataset_json, geometry_mismatches, rounded
from vpt.errors import DataError

__all__ = ["LEVELS", "PROBLEM_LEVELS", "Problem", "Findings"]

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


class Findings:
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


def listed(values: Iterable[Any]) -> str:
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
class DatasetJson:
    """What ``dataset.json`` says that the check uses; ``None`` where it says nothing usable."""

    label_indices: frozenset[int] | None = None
    channels: frozenset[int] | None = None
    num_training: int | None = None


def read_dataset_json(root: Path, findings: Findings, required: bool) -> DatasetJson:
    path = root / "dataset.json"
    if not path.is_file():
        if required:
            findings.add(
                "missing_dataset_json",
                f"{path} does not exist; add a dataset.json with the class names under 'labels' as in {README}.",
                path=path,
            )
        return DatasetJson()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        findings.add("invalid_dataset_json", f"Cannot read {path} ({error}); fix it to be valid JSON.", path=path)
        return DatasetJson()
    if not isinstance(data, dict):
        findings.add(
            "invalid_dataset_json", f"{path} is not a JSON object; write it as {{\"labels\": ...}}.", path=path
        )
        return DatasetJson()
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
    return DatasetJson(label_indices, channels, num_training)


def label_values(label: np.ndarray) -> np.ndarray:
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


def check_value_set(
    findings: Findings,
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
        allowed = "0 or more" if declared is None else listed(sorted(declared))
        findings.add(
            "unknown_label_value",
            f"{subject} holds value(s) {listed(unknown)}, which {source} does not declare (declared: {allowed}); "
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


def count_non_finite(image: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """How many voxels are NaN or inf, and the index of the first (``(0, ...)`` when none)."""
    if image.size == 0 or not np.issubdtype(image.dtype, np.floating):
        return 0, ()
    # min and max propagate NaN and show infinities without a full-size mask for clean images.
    if np.isfinite(image.min()) and np.isfinite(image.max()):
        return 0, ()
    finite = np.isfinite(image)
    first = tuple(int(index) for index in np.unravel_index(int(np.argmin(finite)), image.shape))
    return int(finite.size - np.count_nonzero(finite)), first


def report_non_finite(findings: Findings, count: int, first: tuple[int, ...], case: str, path: Path) -> None:
    findings.add(
        "non_finite_image",
        f"Image {findings.relative(path)} holds {count} NaN or inf voxel(s), the first at index {first}; replace them "
        "with a finite value such as the background intensity, or remove the case.",
        case,
        path,
    )


def header(findings: Findings, case_id: str, path: Path, channel: int | None = None) -> VolumeGeometry | None:
    """A volume's geometry from its header (of ``channel`` for a multi-channel 4D file the
    loaders read one channel of), or ``None`` once its problem is reported."""
    try:
        geometry = read_volume_geometry(path, channel=channel)
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


def compare_geometry(
    findings: Findings, case_id: str, path: Path, geometry: VolumeGeometry, reference_path: Path,
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
            f"{this} has voxel spacing {rounded(geometry.spacing)} mm but {other} has {rounded(reference.spacing)} "
            "mm (z, y, x); resample the label onto the image grid (nearest neighbour) or correct the header.",
            case_id,
            path,
        )
    if "origin" in mismatches:
        findings.add(
            "origin_mismatch",
            f"{this} has origin {rounded(geometry.origin)} mm but {other} has {rounded(reference.origin)} mm "
            "(x, y, z); check that the label is not shifted, or copy the image's origin into its header.",
            case_id,
            path,
        )
    if "direction" in mismatches:
        findings.add(
            "direction_mismatch",
            f"{this} has direction {rounded(geometry.direction)} but {other} has {rounded(reference.direction)}; "
            "check that the label is not flipped, or resample it onto the image grid.",
            case_id,
            path,
        )


def read_label_values(findings: Findings, case_id: str, path: Path) -> np.ndarray | None:
    """The distinct values of a label volume, or ``None`` once its problem is reported."""
    try:
        label, _ = read_volume_with_geometry(path, label=True)
        return label_values(label)
    except DataError as error:
        rejection = str(error)
    # The label reader rejects NaN and fractions; read the voxels as an image to say which.
    try:
        values, _ = read_volume_with_geometry(path)
    except DataError:
        findings.add("unreadable", rejection, case_id, path)
        return None
    count, _ = count_non_finite(values)
    finite = values[np.isfinite(values)]
    fractions = np.unique(finite[np.abs(finite - np.rint(finite)) > 1e-3])
    parts = ([f"{count} NaN or inf voxel(s)"] if count else []) + (
        [f"fractional values {listed(rounded(fractions))}"] if fractions.size else []
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
