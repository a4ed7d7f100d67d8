"""2D images with same-named masks whose pixel values are class indices::

    root/images/<name>.png|jpg|...
    root/masks/<name>.png
    root/dataset.json                  optional, class names as for nnU-Net

``vpt-check-data`` checks missing and extra masks, image/mask size, mask values outside
``dataset.json`` (when there is one), empty masks and unreadable files.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from vpt.data.classification import IMAGE_EXTENSIONS, read_rgb
from vpt.data.medical.io import read_mask_2d
from vpt.data.medical.layouts.base import (
    MASK_SUFFIXES,
    README,
    Case,
    CaseArrays,
    DatasetLayout,
    ScannedCase,
    shape_mismatch,
    visible_files,
)
from vpt.data.medical.layouts.checks import Findings, check_value_set, label_values, listed, read_dataset_json
from vpt.errors import DataError

__all__ = ["Folder2dLayout"]


class Folder2dLayout(DatasetLayout):
    """2D ``images/`` and ``masks/`` folders (already in [0, 1] once read as 8-bit images)."""

    name = "folder2d"
    kinds = ("image2d",)
    intensity = "unit"

    def detect(self, root: Path) -> bool:
        return (root / "images").is_dir()

    def scan(self, root: Path, findings: Findings) -> list[ScannedCase]:
        images_dir, masks_dir = root / "images", root / "masks"
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                findings.add(
                    "missing_folder",
                    f"2D data folder {root} has no {folder.name}/; add images/ and masks/ as described in {README}.",
                    path=folder,
                )
        images: dict[str, list[Path]] = defaultdict(list)
        masks: dict[str, list[Path]] = defaultdict(list)
        for folder, suffixes, found in ((images_dir, IMAGE_EXTENSIONS, images), (masks_dir, MASK_SUFFIXES, masks)):
            for path in visible_files(folder):
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
            findings.add("no_cases", f"{images_dir} holds no images; add them as described in {README}.", path=images_dir)
        scanned = []
        for name in sorted(set(images) | set(masks)):
            usable = True
            for found in (images[name], masks[name]):
                if len(found) > 1:
                    usable = False
                    findings.add(
                        "duplicate_case",
                        f"{len(found)} files are named {name} ({listed(p.name for p in found)}); keep one.",
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
                usable = False
            elif not masks[name]:
                findings.add(
                    "missing_label",
                    f"Image {findings.relative(images[name][0])} has no mask masks/{name}.png; add it or remove the image.",
                    name,
                    images[name][0],
                )
                usable = False
            record = Case(name, images[name][0], masks[name][0], kind="image2d") if usable else None
            scanned.append(ScannedCase("images", name, record, "cases", (images[name][:1], masks[name][:1])))
        return scanned

    def check(self, root: Path, findings: Findings, read_values: bool) -> None:
        declared = read_dataset_json(root, findings, required=False).label_indices
        scanned = self.scan(root, findings)
        findings.cases.update((item.group, item.case_id) for item in scanned)
        for item in scanned:
            self.check_case(root, findings, item, read_values, declared)

    def check_case(
        self, root: Path, findings: Findings, item: ScannedCase, read_values: bool, declared: frozenset[int] | None = None
    ) -> None:
        """Image and mask of one case: readable, the same size, mask values ``declared``
        (by ``dataset.json``; ``None``: any value from 0) and not all background."""
        image_files, mask_files = item.files
        if not read_values or not image_files or not mask_files:
            return
        name, image_path, mask_path = item.case_id, image_files[0], mask_files[0]
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
            return
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
        check_value_set(findings, label_values(mask), declared, name, mask_path, subject, "dataset.json", True)

    def load(self, case: Case, label_only: bool = False) -> CaseArrays:
        label = read_mask_2d(case.label) if case.label is not None else None
        image = None
        if not label_only or label is None:
            rgb = read_rgb(case.image)
            if label is not None and rgb.shape[:2] != label.shape:
                raise shape_mismatch(case, rgb.shape[:2], label.shape)
            grey = bool((rgb == rgb[..., :1]).all())
            # Grey images are kept as one channel: the data module replicates it to RGB anyway.
            image = (rgb[None, ..., 0] if grey else rgb[None]).astype(np.float32) / 255.0
        return CaseArrays(image, None if label is None else label[None], None, np.zeros(1, dtype=np.int64))
