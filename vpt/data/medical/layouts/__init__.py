"""Data set layouts: one class per way of laying a segmentation data set out on disk, in a
small registry that the data module and ``vpt-check-data`` share.

=============  ==========================================================================
name           what it reads (see ``data/README.md``)
=============  ==========================================================================
``phantoms``   vpt's generated CT phantoms: an nnU-Net folder with a ``vpt_phantoms.json``
``nnunet``     nnU-Net v2 raw data and Medical Segmentation Decathlon tasks
               (``imagesTr/<case>_0000.nii.gz`` or ``<case>.nii.gz``, ``labelsTr``,
               optional ``imagesTs``/``labelsTs``, ``dataset.json``)
``synapse``    TransUNet's Synapse files (``train_npz/*.npz``, ``test_vol_h5/*.h5``)
``folder2d``   2D ``images/`` with same-named ``masks/``
=============  ==========================================================================

Each layout (:class:`DatasetLayout`) detects itself, groups its files into cases
(:meth:`~DatasetLayout.scan`), checks them and loads them. :func:`find_cases` (the loaders)
and :func:`vpt.data.medical.integrity.examine_dataset` (``vpt-check-data``) both call the
layout's one ``scan``, so they see the same cases by construction: a case the checker finds
without an error is one the loaders use, and a problem that stops a run is the problem the
checker reports, in the same words. :func:`register_layout` adds a layout of one's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vpt.data.medical.layouts.base import (
    CASE_KINDS,
    README,
    SYNAPSE_CLASS_NAMES,
    Case,
    CaseArrays,
    CaseIndex,
    DatasetLayout,
    ScannedCase,
    check_geometry,
    class_names_from_dataset_json,
    dataset_modality,
    geometry_mismatches,
)
from vpt.data.medical.layouts.folder2d import Folder2dLayout
from vpt.data.medical.layouts.nnunet import NnUNetLayout, PhantomLayout
from vpt.data.medical.layouts.synapse import SynapseLayout
from vpt.errors import DataError
from vpt.messages import log_setup

__all__ = [
    "LAYOUTS",
    "LAYOUT_REGISTRY",
    "SYNAPSE_CLASS_NAMES",
    "CASE_KINDS",
    "Case",
    "CaseIndex",
    "CaseArrays",
    "DatasetLayout",
    "ScannedCase",
    "NnUNetLayout",
    "PhantomLayout",
    "SynapseLayout",
    "Folder2dLayout",
    "register_layout",
    "get_layout",
    "detect_layout",
    "find_cases",
    "load_case",
    "class_names_from_dataset_json",
    "dataset_modality",
    "check_geometry",
    "geometry_mismatches",
]

_logger = logging.getLogger(__name__)

#: The layouts by name, in the order auto-detection tries them (the most specific first).
LAYOUT_REGISTRY: dict[str, DatasetLayout] = {}


def register_layout(layout: DatasetLayout) -> DatasetLayout:
    """Add a layout (an instance of a :class:`DatasetLayout` subclass) under its ``name``.

    Register it at import time of a module the data module's worker processes import too
    (spawned workers do not see a layout registered later).

    Raises:
        ValueError: Another layout has that name, or a case kind is already another's.
    """
    if not layout.name or layout.name in LAYOUT_REGISTRY or layout.name == "auto":
        raise ValueError(f"A layout needs a new name, not {layout.name!r} ({', '.join(LAYOUT_REGISTRY)} are taken).")
    taken = {kind: other.name for other in LAYOUT_REGISTRY.values() for kind in other.kinds}
    shared = [kind for kind in layout.kinds if kind in taken]
    if shared:
        raise ValueError(f"Case kind(s) {shared} are already loaded by layout {taken[shared[0]]!r}; give {layout.name!r} its own kind.")
    LAYOUT_REGISTRY[layout.name] = layout
    return layout


for _layout in (PhantomLayout(), NnUNetLayout(), SynapseLayout(), Folder2dLayout()):
    register_layout(_layout)

#: The ``task.data.layout`` values besides ``"auto"``.
LAYOUTS = tuple(LAYOUT_REGISTRY)


def _missing_root(root: Path) -> DataError:
    return DataError(
        f"Data folder {root} does not exist; set task.data.root to a data set folder laid out as in {README}."
    )


def get_layout(name: str) -> DatasetLayout:
    """The registered layout called ``name``.

    Raises:
        DataError: No layout has that name.
    """
    try:
        return LAYOUT_REGISTRY[name]
    except KeyError:
        raise DataError(
            f"Layout {name!r} is not known; use auto or one of {', '.join(LAYOUT_REGISTRY)}."
        ) from None


def detect_layout(root: str | Path) -> str:
    """Tell the layout of a data set folder from what it holds.

    Args:
        root: The data set folder.

    Returns:
        The name of the first registered layout that recognises it.

    Raises:
        DataError: The folder is missing or matches no layout.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing_root(root)
    for name, layout in LAYOUT_REGISTRY.items():
        if layout.detect(root):
            return name
    raise DataError(
        f"Data folder {root} has none of imagesTr/ (nnU-Net), train_npz/ or test_vol_h5/ (Synapse), or "
        f"images/ + masks/ (2D); arrange it as described in {README}."
    )


def find_cases(root: str | Path, layout: str = "auto") -> CaseIndex:
    """List the cases of a data set folder.

    Args:
        root: The data set folder.
        layout: One of ``LAYOUTS``, or ``"auto"`` to detect it.

    Returns:
        The cases and class names found (no image is decoded).

    Raises:
        DataError: Missing folders, no cases, images without labels, two files for one
            case, bad ``dataset.json`` (the problem ``vpt-check-data`` reports, in its words).
    """
    root = Path(root).expanduser()
    if layout == "auto":
        layout = detect_layout(root)
    found = get_layout(layout)
    if not root.is_dir():
        raise _missing_root(root)
    index = found.find_cases(root)
    if not index.cases and not index.test:
        raise DataError(f"Data folder {root} holds no labelled cases; add cases laid out as described in {README}.")
    log_setup(
        _logger, logging.INFO, "%s (%s layout): %d labelled cases, %d official test cases, %d unlabelled.",
        root, layout, len(index.cases), len(index.test), len(index.unlabeled),
    )
    return index


def load_case(case: Case, label_only: bool = False) -> CaseArrays:
    """Read the image and label of one case, with the layout its kind belongs to.

    Args:
        case: A case from :func:`find_cases`.
        label_only: Read only the label (for scanning labels cheaply).

    Returns:
        The case's arrays, ``(D, H, W)`` each (a 2D image is one slice, ``D = 1``).

    Raises:
        DataError: Unreadable files, image and label of different shapes or spacings, or an
            image with NaN or infinite values.
    """
    for layout in LAYOUT_REGISTRY.values():
        if case.kind in layout.kinds:
            return layout.load(case, label_only)
    kinds = sorted({kind for layout in LAYOUT_REGISTRY.values() for kind in layout.kinds})
    raise DataError(f"Case {case.case_id} has unknown kind {case.kind!r}; use one of {', '.join(kinds)}.")
