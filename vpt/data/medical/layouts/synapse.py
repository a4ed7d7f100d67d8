"""TransUNet's preprocessed Synapse multi-organ CT::

    root/train_npz/<case>_slice<k>.npz   2D slices, arrays "image" and "label"
    root/test_vol_h5/<case>.npy.h5       3D volumes (D, H, W), datasets "image" and "label"

TransUNet's preprocessing already clipped the images to [-125, 275] HU and scaled them to
[0, 1], and kept no spacing, so Synapse distances are in voxels. ``vpt-check-data`` checks
file names, slices of one case with different shapes, NaN/inf intensities, label values
outside the 9 Synapse classes, empty training cases and unreadable files; the files store no
geometry, so none is compared.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from vpt.data.medical.io import check_finite, read_h5_volume, read_npz_slice
from vpt.data.medical.layouts.base import (
    README,
    SYNAPSE_CLASS_NAMES,
    SYNAPSE_SLICE_NAME,
    Case,
    CaseArrays,
    DatasetLayout,
    ScannedCase,
    visible_files,
)
from vpt.data.medical.layouts.checks import (
    Findings,
    check_value_set,
    count_non_finite,
    label_values,
    listed,
    report_non_finite,
)
from vpt.errors import DataError

__all__ = ["SynapseLayout"]

_DECLARED = frozenset(range(len(SYNAPSE_CLASS_NAMES)))
_SOURCE = "Synapse's 9 classes"  # no dataset.json: TransUNet's fixed organ list


class SynapseLayout(DatasetLayout):
    """TransUNet's Synapse ``train_npz`` slices and ``test_vol_h5`` volumes."""

    name = "synapse"
    kinds = ("synapse_slices", "synapse_volume")
    intensity = "unit"

    def detect(self, root: Path) -> bool:
        return (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir()

    def class_names(self, root: Path) -> tuple[str, ...]:
        return SYNAPSE_CLASS_NAMES

    def scan(self, root: Path, findings: Findings) -> list[ScannedCase]:
        train_dir, test_dir = root / "train_npz", root / "test_vol_h5"
        slices: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
        for path in visible_files(train_dir):
            match = SYNAPSE_SLICE_NAME.match(path.name)
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
        for path in visible_files(test_dir):
            if path.name.endswith((".h5", ".hdf5")):
                volumes.append(path)
            else:
                message = f"{findings.relative(path)} is not an .h5 volume and is ignored; remove it."
                findings.add("unknown_file", message, path=path)
        if not slices and not volumes:
            findings.add(
                "no_cases",
                f"Synapse data folder {root} has no train_npz/*.npz or test_vol_h5/*.h5 files; add TransUNet's "
                f"preprocessed files as described in {README}.",
            )
        scanned = []
        for case_id in sorted(slices):
            by_number = slices[case_id]
            duplicated = False
            for number in sorted(by_number):
                if len(by_number[number]) > 1:
                    duplicated = True
                    findings.add(
                        "duplicate_case",
                        f"Case {case_id} has {len(by_number[number])} files for slice {number} "
                        f"({listed(p.name for p in by_number[number])}); keep one.",
                        case_id,
                        by_number[number][1],
                    )
            numbers = sorted(by_number)
            files = tuple(by_number[number][0] for number in numbers)
            record = None if duplicated else Case(
                case_id, train_dir, train_dir, kind="synapse_slices", slice_files=files, slice_numbers=tuple(numbers)
            )
            scanned.append(ScannedCase("train_npz", case_id, record, "cases", files))
        for path in volumes:
            case_id = _h5_case_id(path)
            scanned.append(ScannedCase("test_vol_h5", case_id, Case(case_id, path, path, kind="synapse_volume"), "test", path))
        return scanned

    def check_case(self, root: Path, findings: Findings, item: ScannedCase, read_values: bool) -> None:
        if not read_values:
            return
        if item.group == "train_npz":
            _check_synapse_slices(findings, item.case_id, list(item.files), _DECLARED, _SOURCE)
            return
        path = item.files
        try:
            image, label = read_h5_volume(path)
        except DataError as error:
            findings.add("unreadable", str(error), item.case_id, path)
            return
        count, first = count_non_finite(image)
        if count:
            report_non_finite(findings, count, first, item.case_id, path)
        subject = f"Label of {findings.relative(path)}"
        check_value_set(findings, label_values(label), _DECLARED, item.case_id, path, subject, _SOURCE, training=False)

    def load(self, case: Case, label_only: bool = False) -> CaseArrays:
        if case.kind == "synapse_volume":
            image, label = read_h5_volume(case.image, label_only=label_only)
            if image is not None:
                check_finite(image, case.image, case.case_id)
            return CaseArrays(image, label, None, np.arange(label.shape[0], dtype=np.int64))
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


def _h5_case_id(path: Path) -> str:
    return re.sub(r"(\.npy)?\.(h5|hdf5)$", "", path.name)  # as find_cases names them


def _check_synapse_slices(
    findings: Findings, case_id: str, paths: list[Path], declared: frozenset[int], source: str
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
        values.update(int(value) for value in label_values(label))
        count, _ = count_non_finite(image)
        if count:
            bad_images.append((path, count))
    if len(shapes) > 1:
        examples = list(shapes.values())  # the first slice file of each shape
        findings.add(
            "size_mismatch",
            f"Case {case_id} has slices of shapes {listed(shapes)} (first {findings.relative(examples[0])}, then "
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
        check_value_set(findings, values_found, declared, case_id, paths[0], subject, source, training=True)
