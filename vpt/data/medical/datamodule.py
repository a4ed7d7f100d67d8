"""Lightning data module for slice-wise segmentation of 3D volumes (and 2D images).

Cases, never slices, are split into train/val/test, so no patient appears in two splits.
Training and validation see 2D slices at the backbone's input size; testing sees whole
volumes, one case per batch, with the label at its original resolution so that 3D Dice and
HD95 are computed on the data set's own grid.

Batches:

- ``train_dataloader`` / ``val_dataloader`` / ``dataloader(split)``: ``{"image": (B, 3, H, W)
  float32 normalised, "mask": (B, H, W) int64, "case": list[str], "slice": (B,) int64}``.
- ``test_dataloader`` / ``dataloader(split, volumes=True)``: batch size 1, ``{"image":
  (1, D, 3, H, W) float32 normalised, "label": (1, D, H0, W0) int64 at the original
  resolution, "spacing": (1, 3) float32 mm (z, y, x) or NaN when unknown, "valid_size":
  (1, 2), "case": [str]}``. :meth:`vpt.tasks.SegmentationTask.predict_volume` turns the
  slices into logits (whole, or tile by tile), cuts them to ``valid_size``, resizes them
  bilinearly to ``(H0, W0)`` and takes the argmax; the ``(D, H0, W0)`` volume is scored.

Intensities: CT (raw HU, nnU-Net layout) is clipped to ``window`` and scaled to [0, 1];
with ``window=None`` each volume is scaled by its 0.5/99.5 percentiles instead (MRI and
other units). Synapse files and 2D images are already in [0, 1] and are used as they are.
The three input channels are slices z-1, z, z+1 with ``context_slices=1`` (else slice z
three times), normalised with the backbone's ``mean``/``std``. By default slices are
resized to ``image_size`` regardless of their pixel spacing, as TransUNet and SAMed do;
``spacing`` / ``patch_size`` resample them to a pixel size and work on tiles instead
(:mod:`vpt.data.medical.slicing`).

Memory: with ``cache=True`` (the default) each case is read, checked and scaled once into
``.npy`` files under ``cache_dir`` (see :mod:`vpt.data.medical.cache`) and every item reads
its one slice from the memory-mapped file, so RAM does not grow with the number of cases.
``cache=False`` keeps the chosen train/val slices in memory instead (float16).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vpt.data.classification import SPLITS
from vpt.data.medical.cache import VolumeCache, resolve_cache_dir
from vpt.data.medical.io import read_npz_slice, read_volume_geometry
from vpt.data.medical.layouts import (
    LAYOUT_REGISTRY,
    Case,
    CaseArrays,
    CaseIndex,
    PhantomLayout,
    dataset_modality,
    find_cases,
    get_layout,
    load_case,
)
from vpt.data.medical.orientation import DisplayOrientation, display_orientation
from vpt.data.medical.phantom import (
    DEFAULT_PHANTOM_SHAPE,
    PHANTOM_CLASS_NAMES,
    PHANTOM_MARKER,
)
from vpt.data.medical.slice_inputs import SegmentationPreprocessing
from vpt.data.medical.slice_sources import CachedSlice, MemorySlice, SliceSource, SynapseSliceFile
from vpt.data.medical.slicing import SliceGeometry, context_stack
from vpt.data.medical.transforms import build_segmentation_transforms, to_model_input
from vpt.data.medical.windowing import ABDOMEN_WINDOW, UnitIntensity, label_dtype
from vpt.data.preprocessing import Preprocessing
from vpt.data.splits import group_split
from vpt.data.loading import make_loader, resolve_num_workers, warn_batch_exceeds_training_set, warn_once
from vpt.data.transforms import to_size
from vpt.errors import ConfigError, DataError
from vpt.messages import log_setup

__all__ = ["VolumeSegmentationDataModule", "SliceDataset", "VolumeDataset", "check_label_values", "binary_mask_as_classes"]

_logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def check_label_values(label: np.ndarray, num_classes: int, case_id: str, source: Path | str | None) -> None:
    """Check that a label array holds class indices ``0 .. num_classes - 1``.

    Args:
        label: Integer label array, any shape.
        num_classes: Number of classes including the background.
        case_id: The case, for the error message.
        source: The file the label came from, for the error message.

    Raises:
        DataError: A negative value, or a value of ``num_classes`` or more.
    """
    if label.size == 0:
        return
    low, high = int(label.min()), int(label.max())
    if low < 0:
        raise DataError(
            f"Label {source} of case {case_id} holds the negative value {low}; labels must be class indices "
            f"0 to {num_classes - 1}, so fix the label file."
        )
    if high >= num_classes:
        raise DataError(
            f"Label {source} of case {case_id} holds the value {high} but only {num_classes} classes are named; "
            f"name at least {high + 1} classes (dataset.json 'labels', or task.class_names=[...]) or fix the labels."
        )


def binary_mask_as_classes(label: np.ndarray, num_classes: int, case_id: str, source: Path | str | None) -> np.ndarray:
    """Read a binary mask stored as 0/255 (a common image-editor export) as 0/1.

    Only for two-class data whose labels hold exactly the values 0 and 255; anything else is
    returned unchanged (and :func:`check_label_values` judges it).

    Returns:
        ``label`` with 255 replaced by 1, or ``label`` itself.
    """
    if num_classes != 2 or label.size == 0 or int(label.max()) != 255:
        return label
    if not np.isin(label, (0, 255)).all():
        return label
    warn_once(_logger, "Binary masks stored as 0/255 (first seen: case %s, %s) are read as 0/1.", case_id, source)
    return (label == 255).astype(label.dtype)


def _in_plane(spacing: Sequence[float] | None) -> tuple[float, float] | None:
    """The in-plane (y, x) part of a (z, y, x) spacing."""
    return None if spacing is None else (float(spacing[1]), float(spacing[2]))


@dataclass(frozen=True)
class _CasePreprocessor:
    """Reads, checks and scales one case as the cache stores it: a small picklable callable.

    Attributes:
        to_unit: The data set's intensity rule.
        num_classes: Number of classes, to check (and type) the labels.
    """

    to_unit: UnitIntensity
    num_classes: int

    def __call__(self, case: Case) -> CaseArrays:
        """The case with its whole image in [0, 1] (float16) and its label as checked class indices.

        Raises:
            DataError: Unreadable files, NaN/inf, geometry mismatch, or bad label values.
        """
        arrays = load_case(case)
        assert arrays.image is not None and arrays.label is not None, "cached cases are labelled"
        label = binary_mask_as_classes(arrays.label, self.num_classes, case.case_id, case.label)
        check_label_values(label, self.num_classes, case.case_id, case.label)
        arrays.label = label.astype(label_dtype(self.num_classes), copy=False)
        # Scaled as a whole volume, so percentile scaling is the same as without the cache.
        arrays.image = self.to_unit(arrays.image, case.case_id, case.image).astype(np.float16)
        return arrays


@dataclass(frozen=True)
class _SliceRecord:
    """One training/validation slice: where it is read from, and where it lies."""

    case_id: str
    slice_number: int
    source: SliceSource
    spacing: tuple[float, float] | None = None  # in-plane (y, x) mm, None when unknown
    shape: tuple[int, int] = (0, 0)  # (H, W) of the slice as stored
    tile: tuple[int, int] | None = None  # validation tile origin (y, x) on the network grid

    def stored_label(self) -> np.ndarray:
        """The slice's label as stored, ``(H, W)`` class indices."""
        return self.source.stored_label()


class SliceDataset(Dataset):
    """2D slices of the training or validation cases with their masks.

    Args:
        records: The slices (in memory or as Synapse ``.npz`` files).
        transform: Pipeline from :func:`build_segmentation_transforms`.
        mean: Backbone normalisation mean, [0, 1] units.
        std: Backbone normalisation standard deviation, [0, 1] units.
        num_classes: Number of classes (sets the mask type).
        geometry: Context slices, resampling and tiles (:class:`SliceGeometry`); ``None``
            is one slice, whole, resized by ``transform``.
    """

    def __init__(
        self,
        records: Sequence[_SliceRecord],
        transform: A.Compose,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        geometry: SliceGeometry | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform  # the name reseed_worker_transform looks for
        self.mean, self.std = tuple(mean), tuple(std)
        self.mask_dtype = label_dtype(num_classes)
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One transformed slice.

        Returns:
            ``{"image": (3, H, W) float32, "mask": (H, W) int64, "case": str, "slice": int}``.
        """
        record = self.records[index]
        context = self.geometry.context_slices if self.geometry is not None else 0
        image, label = record.source.read(context)
        image = image.astype(np.float32)
        label = label.astype(self.mask_dtype, copy=False)
        if self.geometry is not None:
            image = self.geometry.network_plane(image, record.spacing)
            label = self.geometry.network_label(label, record.spacing)
            if record.tile is not None:
                (top, left), (height, width) = record.tile, self.geometry.patch_size  # type: ignore[misc]
                image, label = image[top : top + height, left : left + width], label[top : top + height, left : left + width]
        out = self.transform(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(label))
        return {
            "image": to_model_input(out["image"], self.mean, self.std),
            "mask": torch.from_numpy(out["mask"].astype(np.int64)),
            "case": record.case_id,
            "slice": record.slice_number,
        }


class VolumeDataset(Dataset):
    """Whole cases for evaluation: network inputs of every slice and the original-resolution label.

    Args:
        cases: The cases, one item each.
        to_unit: Turns a case's image into [0, 1] (windowing or scaling), shape kept.
        inputs: Turns [0, 1] slices into network inputs (context, resampling, resize or
            tiles, normalisation): the object ``vpt-predict`` rebuilds from the run's record.
        num_classes: Number of classes, to check the labels.
        cache: Where the cases' preprocessed arrays are read from (built on first use);
            ``None`` reads and scales the source files per item.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        to_unit: Callable[[np.ndarray, Case], np.ndarray],
        inputs: SegmentationPreprocessing,
        num_classes: int,
        cache: VolumeCache | None = None,
    ) -> None:
        self.cases = list(cases)
        self.to_unit = to_unit
        self.inputs = inputs
        self.num_classes = int(num_classes)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One case.

        Returns:
            ``{"image": (D, 3, H, W) float32, "label": (D, H0, W0) int64, "spacing": (3,)
            float32 (NaN when unknown), "case": str, "valid_size": (2,) int64}``: with tiles
            ``(H, W)`` is the resampled slice padded to a tile at least, and ``valid_size``
            the part of it that is the slice (the rest is padding); else ``(H, W)`` is the
            model's input size and ``valid_size`` equals it.
        """
        case = self.cases[index]
        if self.cache is not None:
            cached = self.cache.entry(case)
            unit, label, spacing = cached.image(), cached.label(), cached.spacing
        else:
            arrays = load_case(case)
            assert arrays.image is not None and arrays.label is not None, "evaluation cases are labelled"
            label = binary_mask_as_classes(arrays.label, self.num_classes, case.case_id, case.label)
            check_label_values(label, self.num_classes, case.case_id, case.label)
            unit, spacing = self.to_unit(arrays.image, case.case_id, case.image), arrays.spacing
        in_plane = tuple(spacing[1:]) if spacing is not None else None
        image = self.inputs.volume_inputs(unit, 0, len(unit), spacing=in_plane)
        valid = self.inputs.valid_size(tuple(np.shape(label)[1:3]), in_plane) or tuple(image.shape[-2:])
        spacing = spacing if spacing is not None else (float("nan"),) * 3
        return {
            "valid_size": torch.tensor(valid, dtype=torch.int64),
            "image": image,
            "label": torch.from_numpy(np.asarray(label).astype(np.int64)),
            "spacing": torch.tensor(spacing, dtype=torch.float32),
            "case": case.case_id,
        }

    def display_slices(self, index: int, positions: Sequence[int]) -> tuple[np.ndarray, DisplayOrientation]:
        """Slices of one case for pictures: the data's own pixels, not the network input.

        Args:
            index: The case, as for ``self[index]``.
            positions: Slice indices of the case.

        Returns:
            ``(planes, orientation)``: ``(K, H0, W0)`` float32 in [0, 1] on the label's grid
            (``(K, H0, W0, 3)`` for colour images), as stored, and the turn that shows them
            as radiologists read them (from the image header; none without one).
        """
        case = self.cases[index]
        if self.cache is not None:
            unit = self.cache.entry(case).image()
        else:
            unit = self.to_unit(load_case(case).image, case.case_id, case.image)  # type: ignore[arg-type]
        planes = np.stack([np.asarray(unit[int(position)], dtype=np.float32) for position in positions])
        direction = read_volume_geometry(case.image, channel=case.channel).direction if case.kind == "volume" else None
        return np.clip(planes, 0.0, 1.0), display_orientation(direction)


class VolumeSegmentationDataModule(L.LightningDataModule):
    """Slice-wise segmentation data from an nnU-Net, Synapse or 2D-folder data set.

    ``class_names`` and ``num_classes`` are available right after construction (they only
    list folders and read ``dataset.json``), so the model head can be built before the
    Trainer runs. ``setup()`` splits the cases; the cases of a split are read when its
    loader is first asked for (in the main process): with ``cache`` each is preprocessed once
    into memory-mapped files that workers and DDP processes share, without it the chosen
    slices are kept in memory (shared with forked workers).

    Splits are by case and seeded: Synapse's ``test_vol_h5`` (or nnU-Net's ``imagesTs`` with
    ``labelsTs``) is the test split and ``val_fraction`` of the other cases becomes val;
    without an official test split, ``val_fraction`` and ``test_fraction`` of the cases
    become val and test.

    Training and validation use every slice with foreground plus a seeded
    ``empty_slice_fraction`` of the empty ones (chosen once per case, so the set is the same
    every epoch); ``slices_per_volume`` then caps the slices per case. 2D images are always
    used. ``empty_slice_fraction=1`` uses all slices, as TransUNet does.

    Args:
        root: The data set folder.
        layout: ``"auto"`` or a registered layout (:data:`vpt.data.medical.layouts.LAYOUTS`:
            ``"nnunet"``, ``"synapse"``, ``"folder2d"``, ``"phantoms"``).
        num_classes: Number of classes including the background; ``None`` takes the
            layout's class names (``dataset.json``; Synapse's 9).
        image_size: Backbone input side, or ``(height, width)``.
        mean: Backbone normalisation mean per RGB channel, in [0, 1] units.
        std: Backbone normalisation standard deviation per RGB channel, in [0, 1] units.
        window: CT window ``(low, high)`` in HU applied to raw volumes; ``None`` scales each
            volume by its percentiles (non-CT); ``"auto"`` picks by ``dataset.json``'s
            modality (CT: the abdomen window, else percentiles). Not applied to data already
            in [0, 1].
        batch_size: Training batch size (slices).
        eval_batch_size: Validation batch size (slices); ``None`` uses ``batch_size``.
        num_workers: Loader worker processes; 0 loads in the main process, ``None`` (or
            ``"auto"``) uses one per CPU core but one, at most 8.
        val_fraction: Share of the (non-test) cases used for validation.
        test_fraction: Share of the cases used for testing when there is no official test split.
        seed: Seed of the case split, the slice sampling and the augmentation stream.
        augment: Whether training slices get random affine and intensity changes.
        slices_per_volume: Most slices a case contributes to train/val; ``None`` for no cap.
        empty_slice_fraction: Share of a volume's label-free slices used for train/val.
        generate_phantoms: Write phantom CT cases to ``root`` first when it holds no data.
        num_phantoms: Number of phantom cases to write.
        phantom_seed: Seed of the phantom cases (separate from ``seed``, so another split
            seed does not change the data).
        phantom_shape: ``(D, H, W)`` of each phantom case.
        cache: Preprocess each case once into ``.npy`` files under ``cache_dir`` and read
            slices from them memory-mapped (RAM stays flat as cases are added; processes
            share the files). ``False`` keeps the train/val slices in memory.
        cache_dir: The cache folder; ``None`` uses ``<root>/.vpt_cache``, or a folder under
            the system temp dir when ``root`` cannot be written. Entries are keyed by the
            preprocessing settings and rebuilt when a source file changes.
        context_slices: 1 feeds slices z-1, z, z+1 as the three input channels (2.5D;
            edges clamp); 0 repeats slice z (see :mod:`vpt.data.medical.slicing`).
        spacing: Resample slices to this in-plane pixel size in mm (one number or
            ``[y, x]``) and work on tiles; ``None`` keeps the data's pixels.
        patch_size: Tile side in (resampled) pixels: training crops, validation tiles and
            overlapping tiles for whole-slice prediction; ``None`` with ``spacing`` set
            uses the model's input size, and with neither, whole slices are resized to it.
        tile_overlap: Overlap of the prediction tiles, [0, 1).
    """

    def __init__(
        self,
        root: str | Path,
        layout: str = "auto",
        num_classes: int | None = None,
        image_size: int | Sequence[int] = 1024,
        mean: Sequence[float] = _IMAGENET_MEAN,
        std: Sequence[float] = _IMAGENET_STD,
        window: Sequence[float] | str | None = ABDOMEN_WINDOW,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | str | None = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        augment: bool = True,
        slices_per_volume: int | None = None,
        empty_slice_fraction: float = 0.1,
        generate_phantoms: bool = False,
        num_phantoms: int = 12,
        phantom_seed: int = 0,
        phantom_shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        context_slices: int = 0,
        spacing: float | Sequence[float] | None = None,
        patch_size: int | Sequence[int] | None = None,
        tile_overlap: float = 0.5,
    ) -> None:
        super().__init__()
        if layout != "auto" and layout not in LAYOUT_REGISTRY:
            raise ConfigError(
                f"Layout {layout!r} is not known; set task.data.layout to auto or one of {', '.join(LAYOUT_REGISTRY)}."
            )
        if num_classes is not None and num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is not valid; count the background, so use 2 or more.")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(f"Batch size {batch_size}/{eval_batch_size} is not valid; use 1 or more.")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training cases; "
                "use fractions in [0, 1) that sum to less than 1."
            )
        if not 0 <= empty_slice_fraction <= 1:
            raise ConfigError(f"empty_slice_fraction={empty_slice_fraction} is not valid; use a value in [0, 1].")
        if slices_per_volume is not None and slices_per_volume < 1:
            raise ConfigError(f"slices_per_volume={slices_per_volume} is not valid; use 1 or more, or null for all.")
        if isinstance(window, str):
            if window != "auto":
                raise ConfigError(f"task.data.window={window!r} is not valid; use [low, high] in HU, null, or auto.")
        elif window is not None:
            window = tuple(float(value) for value in window)
            if len(window) != 2 or not window[0] < window[1]:
                raise ConfigError(
                    f"CT window {window} is not valid; set task.data.window to [low, high] with low < high, or null."
                )
        # Plain tuples (not Hydra ListConfigs) so nothing unpicklable reaches a checkpoint.
        self.root = Path(root).expanduser()
        self.layout = layout
        self.requested_num_classes = num_classes
        self.image_size = to_size(image_size)
        self.geometry = SliceGeometry.from_options(self.image_size, context_slices, spacing, patch_size, tile_overlap)
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"Normalisation mean {self.mean} / std {self.std} is not valid; give three values each, std > 0."
            )
        self.window = window
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.slices_per_volume = slices_per_volume
        self.empty_slice_fraction = float(empty_slice_fraction)
        self.generate_phantoms = bool(generate_phantoms)
        self.num_phantoms = int(num_phantoms)
        self.phantom_seed = int(phantom_seed)
        self.phantom_shape = tuple(int(side) for side in phantom_shape)
        self.cache = bool(cache)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._volume_cache: VolumeCache | None = None
        self._index: CaseIndex | None = None
        self._class_names: list[str] | None = None
        self._split_cases: dict[str, list[Case]] | None = None
        self._records: dict[str, list[_SliceRecord]] = {}
        self._datasets: dict[tuple[str, bool], Dataset] = {}
        self._unit_intensity: UnitIntensity | None = None

    # -- data on disk ---------------------------------------------------------------------

    def _wants_phantoms(self) -> bool:
        """Whether phantoms go to ``root``: asked for, and root is empty or holds phantoms."""
        if not self.generate_phantoms:
            return False
        if not self.root.is_dir() or (self.root / PHANTOM_MARKER).is_file():
            return True
        return not any(not path.name.startswith(".") for path in self.root.iterdir())

    def prepare_data(self) -> None:
        """Write the phantom cases when asked for (Lightning runs this on one process per node)."""
        if self._wants_phantoms():
            phantoms = get_layout("phantoms")
            assert isinstance(phantoms, PhantomLayout)
            phantoms.prepare(self.root, self.num_phantoms, seed=self.phantom_seed, shape=self.phantom_shape)

    def case_index(self) -> CaseIndex:
        """The cases and class names found in ``root`` (listed once, no image decoded)."""
        if self._index is None:
            self.prepare_data()
            self._index = find_cases(self.root, self.layout)
        return self._index

    @property
    def class_names(self) -> list[str]:
        """Class names by index, background first."""
        if self._class_names is None:
            if self._wants_phantoms():
                # Known without the files, so no process writes phantoms just to learn the names.
                names: Sequence[str] | None = PHANTOM_CLASS_NAMES
            else:
                names = self.case_index().class_names
            wanted = self.requested_num_classes
            if names is None:
                if wanted is None:
                    raise DataError(
                        f"Data folder {self.root} does not name its classes; set task.data.num_classes or add a "
                        "dataset.json with 'labels'."
                    )
                names = ["background", *(f"class_{index}" for index in range(1, wanted))]
            elif wanted is not None and wanted != len(names):
                _logger.warning(
                    "num_classes=%d differs from the %d classes named in %s; using %d.",
                    wanted, len(names), self.root, wanted,
                )
                names = [*names[:wanted], *(f"class_{index}" for index in range(len(names), wanted))]
            self._class_names = list(names)
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes including the background (the model's output channels)."""
        return len(self.class_names)

    # -- splits ---------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Split the cases into train/val/test by case (idempotent); slices are read later."""
        if self._split_cases is not None:
            return
        index = self.case_index()
        cases = list(index.cases)
        if index.test:
            fractions = {"train": 1.0 - self.val_fraction, "val": self.val_fraction}
        else:
            fractions = {
                "train": 1.0 - self.val_fraction - self.test_fraction,
                "val": self.val_fraction,
                "test": self.test_fraction,
            }
        split: dict[str, list[Case]] = {name: [] for name in SPLITS}
        if cases:
            # One item per case, so group_split keeps every case (patient) in one split.
            parts = group_split([case.case_id for case in cases], fractions, seed=self.seed)
            for name, indices in parts.items():
                split[name] = [cases[position] for position in indices]
        if index.test:
            split["test"] = list(index.test)
        self._split_cases = split
        log_setup(
            _logger, logging.INFO, "%s: %d classes; cases: train %d, val %d, test %d%s (seed %d).",
            self.root, self.num_classes, len(split["train"]), len(split["val"]), len(split["test"]),
            " (official test split)" if index.test else "", self.seed,
        )

    def check_split_sizes(self, required: Sequence[str] | None = None) -> None:
        """Refuse a data set with too few cases for the requested splits, before any training.

        Args:
            required: The splits that must get a case; by default the training split and
                each split the fractions (or an official test split) ask for. A training run
                passes all three: it validates every epoch and ends with a test.

        Raises:
            DataError: a required split without a case; the message names the split, the
                setting that emptied it and the change that fills it (more cases, a larger
                fraction, or smaller ones when the training split is the empty one).
        """
        self.setup()
        assert self._split_cases is not None
        counts = {name: len(cases) for name, cases in self._split_cases.items()}
        official_test = bool(self.case_index().test)
        if required is None:
            wanted = {"train": True, "val": self.val_fraction > 0, "test": self.test_fraction > 0 or official_test}
            required = [name for name in SPLITS if wanted[name]]
        empty = [name for name in SPLITS if name in required and counts[name] == 0]
        if not empty:
            return
        total = len(self.case_index().cases)
        gave = (
            f"task.data.val_fraction={self.val_fraction}, task.data.test_fraction={self.test_fraction} gave "
            f"train {counts['train']}, val {counts['val']}, test {counts['test']}"
        )
        carved = [name for name in ("train", "val", "test") if name in required and not (name == "test" and official_test)]
        if total < len(carved):
            raise DataError(
                f"{self.root} has {total} labelled training case(s), but a run needs one for each of the "
                f"{'/'.join(carved)} splits ({len(carved)}); add cases (to only score a trained model on these, use "
                "vpt-evaluate split=all)."
            )
        name = empty[0]
        if name == "train":
            raise DataError(
                f"The train split of {self.root} has no cases ({gave}); lower task.data.val_fraction and "
                "task.data.test_fraction so that they leave training cases."
            )
        fraction = self.val_fraction if name == "val" else self.test_fraction
        key = f"task.data.{name}_fraction"
        why = "every epoch is validated on it" if name == "val" else "every run ends with a test on it"
        if fraction <= 0:
            raise DataError(
                f"{key}={fraction} leaves the {name} split of {self.root} empty, but {why}; set {key} to at least "
                f"{1 / total:.2g} ({total} cases)."
            )
        raise DataError(
            f"The {name} split of {self.root} has no cases ({gave}); raise {key} to at least {1 / total:.2g} "
            f"({total} cases) or add cases."
        )

    def cases(self, split: str) -> list[Case]:
        """The cases of one split after ``setup()``.

        Args:
            split: ``"train"``, ``"val"``, ``"test"``, or ``"all"`` (every labelled case).

        Returns:
            The split's cases, sorted by case id.
        """
        if split == "all":  # every labelled case, for scoring a model on a folder of cases
            index = self.case_index()
            return sorted([*index.cases, *index.test], key=lambda case: case.case_id)
        if split not in SPLITS:
            raise ConfigError(f"Split {split!r} does not exist; use one of {', '.join(SPLITS)} (or all).")
        self.setup()
        assert self._split_cases is not None
        return list(self._split_cases[split])

    # -- intensities and slices -----------------------------------------------------------

    def resolved_window(self) -> tuple[float, float] | None:
        """The CT window in use: ``window`` as configured, or for ``"auto"`` the abdomen window
        when ``dataset.json`` says the first channel is CT and ``None`` (per-volume percentile
        scaling) for every other modality (MR, ultrasound, ...) or when it does not say."""
        if self.window != "auto":
            return self.window  # type: ignore[return-value]
        modality = dataset_modality(self.root)
        if modality is not None and modality.strip().upper() == "CT":
            log_setup(_logger, logging.INFO, "%s: dataset.json says CT; windowing to %s HU (set task.data.window to change).", self.root, ABDOMEN_WINDOW)
            return ABDOMEN_WINDOW
        log_setup(
            _logger, logging.INFO, "%s: dataset.json says %s; scaling each volume by its 0.5/99.5 percentiles (task.data.window=[low,high] "
            "to window instead).", self.root, modality or "no modality",
        )
        return None

    def _intensity(self) -> UnitIntensity:
        """The rule that maps this data set's images to [0, 1]."""
        if self._unit_intensity is None:
            intensity = self.case_index().intensity
            window = self.resolved_window()
            if intensity == "unit" and window is not None:
                log_setup(_logger, logging.INFO, "%s images are already in [0, 1]; the CT window %s is not applied.", self.root, window)
            self._unit_intensity = UnitIntensity(intensity, window)
        return self._unit_intensity

    def volume_cache(self) -> VolumeCache | None:
        """The on-disk cache of preprocessed cases, or ``None`` with ``cache=False``."""
        if not self.cache:
            return None
        if self._volume_cache is None:
            intensity = self._intensity()
            num_classes = self.num_classes
            # Everything that changes the stored arrays; source files are checked per entry.
            settings = {
                "root": str(self.root.resolve()),
                "intensity": intensity.intensity,
                "window": list(intensity.window) if intensity.window is not None else None,
                "num_classes": num_classes,
                "label_dtype": np.dtype(label_dtype(num_classes)).name,
                "binary_0_255_as_0_1": num_classes == 2,
                "image_dtype": "float16",
            }
            self._volume_cache = VolumeCache(
                resolve_cache_dir(self.cache_dir, self.root), settings, _CasePreprocessor(intensity, num_classes)
            )
            log_setup(_logger, logging.INFO, "%s: preprocessed cases are cached in %s.", self.root, self._volume_cache.folder)
        return self._volume_cache

    def _select_slices(self, foreground: np.ndarray, case_id: str) -> np.ndarray:
        """Positions of the slices a case contributes to train/val.

        Args:
            foreground: ``(D,)`` bool, whether each slice has a labelled voxel.
            case_id: Seeds the choice together with ``seed``, so it does not depend on order.

        Returns:
            Sorted int64 positions.
        """
        if len(foreground) == 1:
            return np.zeros(1, dtype=np.int64)
        rng = np.random.default_rng([self.seed, zlib.crc32(case_id.encode("utf-8"))])
        empty = np.flatnonzero(~foreground)
        keep = int(round(self.empty_slice_fraction * len(empty)))
        chosen = np.concatenate([np.flatnonzero(foreground), rng.choice(empty, keep, replace=False)])
        if self.slices_per_volume is not None and len(chosen) > self.slices_per_volume:
            chosen = rng.choice(chosen, self.slices_per_volume, replace=False)
        return np.sort(chosen).astype(np.int64)

    def _slice_records(self, split: str) -> list[_SliceRecord]:
        """Read and check the labels of one split and keep its chosen slices (once per split)."""
        if split in self._records:
            return self._records[split]
        num_classes = self.num_classes
        mask_dtype = label_dtype(num_classes)
        cache = self.volume_cache()
        records: list[_SliceRecord] = []
        for case in self.cases(split):
            if case.kind == "synapse_slices":
                # Slices stay in their files and are read per item; only the labels are read now.
                labels, shapes = [], []
                for path in case.slice_files:
                    _, label = read_npz_slice(path, label_only=True)
                    check_label_values(label, num_classes, case.case_id, path)
                    labels.append(label.any())
                    shapes.append((int(label.shape[0]), int(label.shape[1])))
                last = len(case.slice_files) - 1
                for position in self._select_slices(np.asarray(labels), case.case_id):
                    neighbours = (case.slice_files[max(position - 1, 0)], case.slice_files[min(position + 1, last)])
                    source = SynapseSliceFile(case.slice_files[position], neighbours, case.case_id)
                    records.append(_SliceRecord(case.case_id, int(case.slice_numbers[position]), source, shape=shapes[position]))
                continue
            if cache is not None:
                # Only the case's entry (paths) is kept; items read their slice from the mapped file.
                cached = cache.entry(case)
                label_volume = cached.label()
                foreground = np.asarray(label_volume.reshape(len(label_volume), -1).any(axis=1))
                shape = (int(label_volume.shape[1]), int(label_volume.shape[2]))
                del label_volume
                for position in self._select_slices(foreground, case.case_id):
                    records.append(_SliceRecord(
                        case.case_id, cached.slice_numbers[position], CachedSlice(cached, int(position)),
                        spacing=_in_plane(cached.spacing), shape=shape,
                    ))
                continue
            arrays = load_case(case)
            assert arrays.image is not None and arrays.label is not None, "training cases are labelled"
            arrays.label = binary_mask_as_classes(arrays.label, num_classes, case.case_id, case.label)
            check_label_values(arrays.label, num_classes, case.case_id, case.label)
            positions = self._select_slices(arrays.label.reshape(len(arrays.label), -1).any(axis=1), case.case_id)
            # Scaled as a whole volume (percentile scaling must match the test volumes'), then only
            # the chosen slices are kept, in half precision: [0, 1] needs no more.
            unit = self._intensity()(arrays.image, case.case_id, case.image)
            context = self.geometry.context_slices
            images = [context_stack(unit, int(position), context).astype(np.float16) for position in positions]
            del unit
            labels = arrays.label[positions].astype(mask_dtype)
            shape = (int(arrays.label.shape[1]), int(arrays.label.shape[2]))
            for offset, position in enumerate(positions):
                records.append(_SliceRecord(
                    case.case_id, int(arrays.slice_numbers[position]), MemorySlice(images[offset], labels[offset]),
                    spacing=_in_plane(arrays.spacing), shape=shape,
                ))
        if not records and self.cases(split):
            _logger.warning(
                "The %s cases of %s have no labelled slice and empty_slice_fraction=%s keeps no empty one.",
                split, self.root, self.empty_slice_fraction,
            )
        if split == "train":
            warn_batch_exceeds_training_set(_logger, self.batch_size, len(records), "slices", str(self.root))
        self._records[split] = records
        return records

    def class_voxel_counts(self, split: str) -> np.ndarray:
        """Labelled voxels of each class over one train/val split, for judging whether it can
        rank epochs (see :mod:`vpt.training.selection`).

        The split's slices are every labelled slice of its cases (plus some empty ones), so
        the foreground counts are those of the whole cases.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            ``(num_classes,)`` int64, background first.
        """
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for record in self._slice_records(split):
            label = np.asarray(record.stored_label()).ravel().astype(np.int64, copy=False)
            counts += np.bincount(label, minlength=self.num_classes)[: self.num_classes]
        return counts

    def check_cases(self, splits: Sequence[str] = SPLITS) -> int:
        """Read every case of the given splits once and raise on the first problem.

        Meant for the start of a run, so that a bad case fails it in minutes rather than
        after hours of training: unreadable files, NaN or infinite image values, image and
        label of different shapes or spacings, and label values outside ``0 ..
        num_classes - 1``. The train and val slices read here are kept for training, so
        those splits are not read twice.

        Args:
            splits: Which of ``"train"``, ``"val"``, ``"test"`` to check.

        Returns:
            The number of cases checked.

        Raises:
            DataError: The first problem found, naming its case and file.
        """
        checked = 0
        cache = self.volume_cache()
        for split in splits:
            cases = self.cases(split)
            if split != "test":
                self._slice_records(split)  # reads and checks every volume of the split
            for case in cases:
                # Test volumes are only read at test time, and Synapse slice images only per item.
                if split == "test" and cache is not None and case.kind != "synapse_slices":
                    cache.entry(case)  # built (and so checked) now, reused at test time
                elif split == "test" or case.kind == "synapse_slices":
                    arrays = load_case(case)
                    if arrays.label is not None:
                        label = binary_mask_as_classes(arrays.label, self.num_classes, case.case_id, case.label)
                        check_label_values(label, self.num_classes, case.case_id, case.label)
            checked += len(cases)
        _logger.info("%s: checked %d cases of the %s split(s).", self.root, checked, "/".join(splits))
        return checked

    # -- datasets and loaders -------------------------------------------------------------

    def dataset(self, split: str, train: bool = False) -> SliceDataset:
        """Slice dataset of one split, with training (random) or evaluation transforms.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            train: Whether to use the training transforms (only for ``"train"``).

        Returns:
            A dataset of ``{"image", "mask", "case", "slice"}`` items.
        """
        training = bool(train and split == "train")
        key = (split, training)
        # Cached so a reloaded train loader continues the augmentation stream.
        if key not in self._datasets:
            records = self._slice_records(split)
            if not records:
                raise DataError(
                    f"The {split} split of {self.root} has no slices ({len(self.cases(split))} cases); add cases "
                    "or change task.data.val_fraction/test_fraction."
                )
            # The record's values (the object saved with the weights and rebuilt by vpt-predict),
            # with the training augmentation on top for the training split.
            inputs = self.evaluation_inputs()
            geometry = inputs.geometry
            assert geometry is not None, "a volume data module always has a slice geometry"
            transform = build_segmentation_transforms(
                inputs.image_size, train=training, augment=self.augment, seed=self.seed if training else None,
                crop_size=geometry.patch_size if training else None,
            )
            if geometry.tiled and not training:
                # Evaluation sees every part of a slice once: a grid of tiles over it.
                records = [
                    replace(record, tile=origin)
                    for record in records
                    for origin in geometry.tiles(geometry.network_shape(record.shape, record.spacing))
                ]
            self._datasets[key] = SliceDataset(records, transform, inputs.mean, inputs.std, self.num_classes, geometry)
        return self._datasets[key]  # type: ignore[return-value]

    def volume_dataset(self, split: str) -> VolumeDataset:
        """Whole-case dataset of one split for 3D evaluation (see the module docstring)."""
        cases = self.cases(split)
        if not cases:
            raise DataError(
                f"The {split} split of {self.root} has no cases; add cases or change "
                "task.data.val_fraction/test_fraction."
            )
        return VolumeDataset(cases, self._intensity(), self.evaluation_inputs(), self.num_classes, cache=self.volume_cache())

    def preprocessing_record(self) -> Preprocessing:
        """This data set's preprocessing resolved to numbers (intensity rule with its modality,
        context, pixel size, tiles, input size, mean/std, class names): the record a run saves
        with its weights, from which ``vpt-predict`` rebuilds everything."""
        metadata = {"input_size": self.image_size, "mean": self.mean, "std": self.std, "class_names": self.class_names}
        return Preprocessing.from_datamodule("segmentation", self, metadata)

    def evaluation_inputs(self) -> SegmentationPreprocessing:
        """How test and validation volumes become network inputs: built from
        :meth:`preprocessing_record`, as ``vpt-predict`` builds it from the saved copy."""
        return SegmentationPreprocessing.from_preprocessing(self.preprocessing_record())

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training slices; drops a last partial batch if more than one batch exists."""
        dataset = self.dataset("train", train=True)
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=len(dataset) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation slices in a fixed order."""
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Test volumes, one case per batch."""
        return self.dataloader("test", volumes=True)

    def dataloader(self, split: str, volumes: bool = False) -> DataLoader:
        """Batches of any split in a fixed order, without augmentation.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            volumes: Whole cases (batch size 1) instead of slices.

        Returns:
            A loader of slice or volume batches (see the module docstring).
        """
        if volumes:
            # Volumes at the model's size are large; pinning each would copy it once more.
            return self._loader(self.volume_dataset(split), 1, shuffle=False, drop_last=False, pin_memory=False)
        return self._loader(self.dataset(split, train=False), self.eval_batch_size, shuffle=False, drop_last=False)

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, pin_memory: bool | None = None
    ) -> DataLoader:
        return make_loader(dataset, batch_size, shuffle, drop_last, self.num_workers, pin_memory)
