"""nnU-Net v2 and Medical Segmentation Decathlon folders, and vpt's phantoms (written in the
nnU-Net layout)::

    root/dataset.json                  class names under "labels"
    root/imagesTr/<case>_0000.nii.gz   nnU-Net v2 (channel 0000), or <case>.nii.gz (MSD)
    root/labelsTr/<case>.nii.gz
    root/imagesTs/ (+ labelsTs/)       optional; without labelsTs the cases are unlabelled

Volumes may be ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.mhd``; intensities are raw
scanner units (HU for CT) and are windowed later. vpt reads channel 0 (``_0000``, or the MSD
image; an MSD image with its modalities on a 4th axis, as the Decathlon ships BrainTumour and
Prostate, is read at channel 0 too); other channels are checked for presence and otherwise
ignored.

What ``vpt-check-data`` checks here, in depth: ``dataset.json`` (present, valid ``labels``,
``numTraining``, ``channel_names`` / ``modality``); images without labels and labels without
images in ``imagesTr``/``labelsTr`` and ``imagesTs``/``labelsTs``; incomplete channels;
files that are no volume; image/label size, spacing, origin and direction from the headers;
then, reading the voxels, NaN/inf image intensities, non-integer label values, label values
that ``dataset.json`` does not declare, and training labels that are all background.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpt.data.medical.io import (
    VOLUME_SUFFIXES,
    check_finite,
    read_volume_geometry,
    read_volume_with_geometry,
    volume_suffix,
)
from vpt.data.medical.layouts.base import (
    CHANNEL_NAME,
    README,
    Case,
    CaseArrays,
    DatasetLayout,
    ScannedCase,
    check_geometry,
    visible_files,
)
from vpt.data.medical.layouts.checks import (
    DatasetJson,
    Findings,
    compare_geometry,
    count_non_finite,
    check_value_set,
    header,
    listed,
    read_dataset_json,
    read_label_values,
    report_non_finite,
)
from vpt.errors import DataError

__all__ = ["NnUNetLayout", "PhantomLayout"]


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


class NnUNetLayout(DatasetLayout):
    """nnU-Net v2 raw data sets, and the Medical Segmentation Decathlon's (one naming rule
    tells them apart per file: an image named like its label is MSD's)."""

    name = "nnunet"
    kinds = ("volume",)
    intensity = "raw"

    def detect(self, root: Path) -> bool:
        return (root / "imagesTr").is_dir() or ((root / "dataset.json").is_file() and not (root / "images").is_dir())

    def scan(self, root: Path, findings: Findings) -> list[ScannedCase]:
        spec = read_dataset_json(root, findings, required=True)
        for name in ("imagesTr", "labelsTr"):
            if not (root / name).is_dir():
                findings.add(
                    "missing_folder",
                    f"nnU-Net data folder {root} has no {name}/; add it as described in {README}.",
                    path=root / name,
                )
        training = volume_cases(root / "imagesTr", root / "labelsTr", findings)
        if (root / "imagesTr").is_dir() and not any(case.images for case in training.values()):
            findings.add(
                "no_cases",
                f"{root / 'imagesTr'} holds no image volumes; add <case>_0000.nii.gz files as described in {README}.",
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
        test = volume_cases(root / "imagesTs", root / "labelsTs", findings)
        scanned = []
        for name, cases in (("Tr", training), ("Ts", test)):
            split = _split(root, name, cases, spec)
            for case_id in sorted(cases):
                files = cases[case_id]
                before = len(findings.problems)
                usable = check_case_files(root, findings, split, case_id, files)
                record = _case_record(case_id, files, split) if usable else None
                role = "cases" if split.training else ("test" if files.labels else "unlabeled")
                problems = tuple(findings.problems[before:])
                scanned.append(ScannedCase(name, case_id, record, role, (files, split), problems))
        return scanned

    def check_case(self, root: Path, findings: Findings, item: ScannedCase, read_values: bool) -> None:
        files, split = item.files
        if files.images:
            check_volume_case(root, findings, split, item.case_id, files, read_values)

    def load(self, case: Case, label_only: bool = False) -> CaseArrays:
        label = label_geometry = None
        if case.label is not None:
            label, label_geometry = read_volume_with_geometry(case.label, label=True)
        image = None
        if not label_only or case.label is None:
            image, image_geometry = read_volume_with_geometry(case.image, channel=case.channel)
            check_finite(image, case.image, case.case_id)
        else:
            # header only: mismatches show without decoding
            image_geometry = read_volume_geometry(case.image, channel=case.channel)
        if label_geometry is not None:
            check_geometry(case, image_geometry, label_geometry)
        depth = (label if label is not None else image).shape[0]
        return CaseArrays(image, label, image_geometry.spacing, np.arange(depth, dtype=np.int64))


class PhantomLayout(NnUNetLayout):
    """vpt's generated CT phantoms (:mod:`vpt.data.medical.phantom`): an nnU-Net folder with
    a marker file, written by the data module when asked for and read as nnU-Net data."""

    name = "phantoms"
    kinds = ()  # its cases are nnU-Net volumes, loaded by the nnunet layout

    def detect(self, root: Path) -> bool:
        from vpt.data.medical.phantom import PHANTOM_MARKER

        return (root / PHANTOM_MARKER).is_file()

    def prepare(self, root: Path, cases: int, seed: int, shape: Any) -> None:
        """Write (or refresh) the phantom cases in ``root``."""
        from vpt.data.medical.phantom import write_phantom_dataset

        write_phantom_dataset(root, cases, seed=seed, shape=shape)


def _split(root: Path, name: str, cases: dict[str, _VolumeCase], spec: DatasetJson) -> _Split:
    """What the cases of ``images<name>`` must have."""
    channels = spec.channels
    if channels is None:  # without dataset.json, the channels any case of the folder has
        channels = frozenset(c for case in cases.values() for c in case.images if c is not None) or None
    return _Split(
        name,
        training=name == "Tr",
        labels_expected=(root / f"labels{name}").is_dir(),
        channels=channels,
        channels_declared=spec.channels is not None,
        label_indices=spec.label_indices,
    )


def _case_record(case_id: str, files: _VolumeCase, split: _Split) -> Case | None:
    """The loaders' record of a case: its MSD image or channel 0, its label; ``None`` when the
    files do not make one unambiguous case (the scan reported why)."""
    if any(len(paths) > 1 for paths in files.images.values()) or len(files.labels) > 1:
        return None
    if None in files.images and len(files.images) > 1:
        return None
    msd_image = (files.images.get(None) or [None])[0]
    image = msd_image or (files.images.get(0) or [None])[0]
    if image is None or (split.training and not files.labels):
        return None
    # An MSD image may hold its modalities on a 4th axis (BrainTumour, Prostate): channel 0
    # is read, as nnU-Net's conversion makes it <case>_0000.
    channel = 0 if msd_image is not None else None
    return Case(case_id, image, files.labels[0] if files.labels else None, kind="volume", channel=channel)


def volume_cases(images_dir: Path, labels_dir: Path, findings: Findings) -> dict[str, _VolumeCase]:
    """Group the volume files of an images/labels folder pair by case, named as ``find_cases`` names them."""
    label_files: dict[str, list[Path]] = defaultdict(list)
    for path in visible_files(labels_dir):
        suffix = volume_suffix(path)
        if suffix is None:
            unknown_file(findings, path)
            continue
        label_files[path.name[: -len(suffix)]].append(path)
    cases: dict[str, _VolumeCase] = {}
    for path in visible_files(images_dir):
        suffix = volume_suffix(path)
        if suffix is None:
            unknown_file(findings, path)
            continue
        stem = path.name[: -len(suffix)]
        match = CHANNEL_NAME.match(stem)
        if stem in label_files or match is None:
            case_id, channel = stem, None  # MSD names the image like its label
        else:
            case_id, channel = match.group("case"), int(match.group("channel"))
        case = cases.setdefault(case_id, _VolumeCase(defaultdict(list), []))
        case.images[channel].append(path)
    for case_id, paths in label_files.items():
        cases.setdefault(case_id, _VolumeCase(defaultdict(list), [])).labels.extend(paths)
    return cases


def unknown_file(findings: Findings, path: Path) -> None:
    findings.add(
        "unknown_file",
        f"{findings.relative(path)} is not a volume ({', '.join(VOLUME_SUFFIXES)}) and is ignored; remove or "
        "convert it.",
        path=path,
    )


def check_volume_case(
    root: Path, findings: Findings, split: _Split, case_id: str, case: _VolumeCase, read_values: bool
) -> None:
    """Headers, then (with ``read_values``) voxels of one case that has an image (its file
    names were checked by the scan)."""
    image_paths = case.image_files()
    label_path = case.labels[0] if case.labels else None
    # An MSD-named image may hold its modalities on a 4th axis: the loaders read channel 0.
    msd_image = (case.images.get(None) or [None])[0]
    channels = {path: (0 if path == msd_image else None) for path in image_paths}
    geometries = {path: header(findings, case_id, path, channels.get(path)) for path in [*image_paths, *case.labels[:1]]}
    # Every channel is compared with the label, or with the first channel when there is no label.
    reference_path = label_path if label_path is not None and geometries[label_path] else image_paths[0]
    reference = geometries[reference_path]
    if reference is not None:
        for path in image_paths:
            if path != reference_path and geometries[path] is not None:
                compare_geometry(findings, case_id, path, geometries[path], reference_path, reference)
    if not read_values:
        return
    for path in image_paths:
        if geometries[path] is None:
            continue  # already reported; decoding it would only repeat the problem
        try:
            image, _ = read_volume_with_geometry(path, channel=channels[path])
        except DataError as error:
            findings.add("unreadable", str(error), case_id, path)
            continue
        count, first = count_non_finite(image)
        if count:
            report_non_finite(findings, count, first, case_id, path)
    if label_path is not None and geometries[label_path] is not None:
        values = read_label_values(findings, case_id, label_path)
        if values is not None:
            subject = f"Label {findings.relative(label_path)}"
            check_value_set(
                findings, values, split.label_indices, case_id, label_path, subject, "dataset.json", split.training
            )


def check_case_files(root: Path, findings: Findings, split: _Split, case_id: str, case: _VolumeCase) -> bool:
    """Report duplicate, missing and extra files of one case.

    Returns:
        Whether the case has an image, so its headers and voxels can be checked.
    """
    images_name, labels_name = f"images{split.name}", f"labels{split.name}"
    for paths in case.images.values():
        if len(paths) > 1:
            findings.add(
                "duplicate_case",
                f"Case {case_id} has {len(paths)} files for one image ({listed(p.name for p in paths)}); keep one.",
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
            f"Case {case_id} has {len(case.labels)} label files ({listed(p.name for p in case.labels)}); keep one.",
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
        stem = first_image.name[: -len(suffix)] if suffix else first_image.stem
        # <case>_0003 may be channel 3 of <case> or an MSD case named so: name both labels.
        alternative = f" (or {labels_name}/{stem}{suffix}, if {stem} is the case)" if stem != case_id else ""
        findings.add(
            kind,
            f"Image {findings.relative(first_image)} has no label {labels_name}/{case_id}{suffix}{alternative}"
            f"{consequence}; add the label or remove the image.",
            case_id,
            first_image,
        )
    present = {channel for channel in case.images if channel is not None}
    if present and (split.channels is not None or 0 not in present):
        missing = sorted((split.channels or frozenset()) - present)
        if 0 not in present and 0 not in missing:
            missing.insert(0, 0)
        if missing:
            names = [f"{case_id}_{channel:04d}{suffix}" for channel in missing]
            if split.channels is not None and set(missing) <= split.channels:
                source = "dataset.json's channel_names expects" if split.channels_declared else "other cases have"
            else:
                source = "is the image vpt reads (channel 0)"
            findings.add(
                "missing_channel",
                f"Case {case_id} lacks image channel(s) {listed(names)} in {images_name}/, which {source}; add them "
                "or remove the case.",
                case_id,
                root / images_name / names[0],
            )
        extra = sorted(present - split.channels) if split.channels_declared and split.channels is not None else []
        if extra:
            names = [f"{case_id}_{channel:04d}{suffix}" for channel in extra]
            findings.add(
                "extra_channel",
                f"Image channel(s) {listed(names)} of case {case_id} are not in dataset.json's channel_names and are "
                "ignored; add them to channel_names or remove the files.",
                case_id,
                root / images_name / names[0],
            )
    return True
