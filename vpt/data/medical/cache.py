"""On-disk cache of preprocessed cases, memory-mapped while training.

Each case is read, checked and scaled once; its [0, 1] image (float16) and its label
(uint8/uint16 class indices) are then kept as ``.npy`` files::

    <cache_dir>/<settings key>/<case_id>.image.npy
    <cache_dir>/<settings key>/<case_id>.label.npy
    <cache_dir>/<settings key>/<case_id>.json      manifest, written last

Datasets open them with ``np.load(..., mmap_mode="r")`` and read one slice per item, so the
memory a run needs does not grow with the number of cases, and loader workers and DDP
processes share the files through the page cache instead of each holding a copy.

The settings key hashes everything that changes the arrays for every case (the data set
folder, the intensity rule and its window, the label handling, the format version). Each
manifest also records the case's source files with their size and modification time; an
entry whose sources changed, or whose files are missing or unreadable, is rebuilt (not an
error). Files are written atomically, so two processes building the same entry at once
leave one complete copy (the last writer's; both write the same arrays).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpt.atomic import atomic_path, atomic_write_text
from vpt.data.medical.layouts import Case, CaseArrays

__all__ = ["CACHE_FORMAT_VERSION", "CachedCase", "VolumeCache", "resolve_cache_dir"]

_logger = logging.getLogger(__name__)

# Bump when the stored arrays change meaning (dtype, scaling), so old entries are not reused.
CACHE_FORMAT_VERSION = 1

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class CachedCase:
    """One cache entry: where its arrays live and the small facts kept beside them.

    Attributes:
        case_id: The case.
        image_file: ``(D, H, W)`` (or ``(D, H, W, 3)``) float16 [0, 1] image, ``.npy``.
        label_file: ``(D, H, W)`` uint8/uint16 class indices, ``.npy``.
        spacing: Voxel size in mm ``(z, y, x)``, ``None`` when unknown.
        slice_numbers: ``(D,)`` slice number of each slice.
    """

    case_id: str
    image_file: Path
    label_file: Path
    spacing: tuple[float, float, float] | None
    slice_numbers: tuple[int, ...]

    def image(self) -> np.ndarray:
        """The image, memory-mapped read-only (nothing is read until indexed)."""
        return np.load(self.image_file, mmap_mode="r")

    def label(self) -> np.ndarray:
        """The label, memory-mapped read-only."""
        return np.load(self.label_file, mmap_mode="r")


def resolve_cache_dir(cache_dir: str | Path | None, root: Path) -> Path:
    """The cache folder: ``cache_dir``, or ``<root>/.vpt_cache``, or one under the temp dir.

    Args:
        cache_dir: The configured folder; ``None`` for ``<root>/.vpt_cache``.
        root: The data set folder.

    Returns:
        A folder that exists and can be written; when the wanted one cannot be, a folder
        under the system temp dir named after ``root`` (said in one info line).
    """
    wanted = Path(cache_dir).expanduser() if cache_dir is not None else root / ".vpt_cache"
    if _writable(wanted):
        return wanted
    digest = hashlib.sha256(str(root.resolve()).encode("utf-8")).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / "vpt_cache" / f"{root.name}-{digest}"
    fallback.mkdir(parents=True, exist_ok=True)
    _logger.info("Cache folder %s cannot be written; caching preprocessed cases in %s instead.", wanted, fallback)
    return fallback


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError:
        return False
    return True


def _source_files(case: Case) -> list[Path]:
    files = [case.image] if case.label is None or case.label == case.image else [case.image, case.label]
    return [*files, *case.slice_files]


def _fingerprint(case: Case) -> list[list[Any]]:
    """Path, size and modification time of each source file (a change makes the entry stale)."""
    fingerprint = []
    for path in _source_files(case):
        stat = path.stat()
        fingerprint.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return fingerprint


class VolumeCache:
    """Builds and finds the cache entries of one data set under one set of settings.

    Args:
        cache_dir: The cache folder (see :func:`resolve_cache_dir`).
        settings: Everything that changes the stored arrays (JSON-serialisable); hashed
            into the key, together with :data:`CACHE_FORMAT_VERSION`.
        build: Reads and checks one case and returns its ``CaseArrays`` with the image
            already in [0, 1] (float16 is taken) and the label as stored class indices.
    """

    def __init__(self, cache_dir: Path, settings: dict[str, Any], build: Callable[[Case], CaseArrays]) -> None:
        # Through JSON once, so it compares equal to the copy read back from a manifest.
        self.settings = json.loads(json.dumps({"format": CACHE_FORMAT_VERSION, **settings}))
        encoded = json.dumps(self.settings, sort_keys=True).encode("utf-8")
        self.key = hashlib.sha256(encoded).hexdigest()[:16]
        self.folder = Path(cache_dir) / self.key
        self._build = build

    def _stem(self, case_id: str) -> str:
        stem = _UNSAFE_NAME.sub("_", case_id)
        if stem != case_id:  # keep two ids that differ only in unsafe characters apart
            stem += "-" + hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:8]
        return stem

    def paths(self, case_id: str) -> tuple[Path, Path, Path]:
        """``(image.npy, label.npy, manifest.json)`` of one case."""
        stem = self._stem(case_id)
        return (self.folder / f"{stem}.image.npy", self.folder / f"{stem}.label.npy", self.folder / f"{stem}.json")

    def entry(self, case: Case) -> CachedCase:
        """The case's entry, built first when missing, stale or unreadable.

        Raises:
            DataError: From ``build``: the case itself is bad (unreadable, NaN, geometry, labels).
        """
        fingerprint = _fingerprint(case)
        found = self._read_entry(case, fingerprint)
        if found is not None:
            return found
        return self._write_entry(case, fingerprint)

    def _read_entry(self, case: Case, fingerprint: list[list[Any]]) -> CachedCase | None:
        image_file, label_file, manifest_file = self.paths(case.case_id)
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            if manifest.get("settings") != self.settings or manifest.get("sources") != fingerprint:
                _logger.info("Cache entry of case %s is stale; rebuilding it.", case.case_id)
                return None
            image = np.load(image_file, mmap_mode="r")
            label = np.load(label_file, mmap_mode="r")
            if list(image.shape) != manifest["image_shape"] or list(label.shape) != manifest["label_shape"]:
                raise ValueError("shape differs from the manifest")
            del image, label
            spacing = manifest["spacing"]
            return CachedCase(
                case.case_id, image_file, label_file,
                tuple(float(value) for value in spacing) if spacing is not None else None,  # type: ignore[arg-type]
                tuple(int(number) for number in manifest["slice_numbers"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            _logger.info("Cache entry of case %s is unreadable (%s); rebuilding it.", case.case_id, error)
            return None

    def _write_entry(self, case: Case, fingerprint: list[list[Any]]) -> CachedCase:
        arrays = self._build(case)
        assert arrays.image is not None and arrays.label is not None, "cached cases are labelled"
        image_file, label_file, manifest_file = self.paths(case.case_id)
        image = np.ascontiguousarray(arrays.image, dtype=np.float16)
        label = np.ascontiguousarray(arrays.label)
        # atomic_path keeps the .npy suffix on its temporary file, so np.save adds none.
        with atomic_path(image_file) as tmp:
            np.save(tmp, image)
        with atomic_path(label_file) as tmp:
            np.save(tmp, label)
        spacing = None if arrays.spacing is None else [float(value) for value in arrays.spacing]
        slice_numbers = [int(number) for number in arrays.slice_numbers]
        manifest = {
            "case_id": case.case_id,
            "settings": self.settings,
            "sources": fingerprint,
            "image_shape": list(image.shape),
            "label_shape": list(label.shape),
            "spacing": spacing,
            "slice_numbers": slice_numbers,
        }
        # The manifest is written last: an entry without one is incomplete and gets rebuilt.
        atomic_write_text(manifest_file, json.dumps(manifest, indent=1))
        return CachedCase(
            case.case_id, image_file, label_file,
            tuple(spacing) if spacing is not None else None,  # type: ignore[arg-type]
            tuple(slice_numbers),
        )
