"""Image classification data: datasets and the Lightning data modules that serve them.

``ClassificationDataModule`` holds everything the sources share (transforms from the
backbone's input config, carving missing val/test splits, data loaders); a source subclass
only says which classes exist (``_scan``) and which ``(source, label)`` items each split
has (``_load_items``). Two sources ship here: a folder tree (``ImageFolderDataModule``) and
CSV lists (``CsvDataModule``).

A batch from any of the loaders is ``(images, labels)``: images a float32 tensor of shape
``(B, 3, H, W)`` normalised with the backbone's mean and std, labels an int64 tensor of
shape ``(B,)`` with class indices into ``class_names``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from vpt.data.loading import make_loader, resolve_num_workers, warn_batch_exceeds_training_set
from vpt.data.splits import stratified_split
from vpt.data.transforms import build_transforms, to_size
from vpt.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "read_rgb",
    "ImageListDataset",
    "ArrayDataset",
    "ClassificationDataModule",
    "ImageFolderDataModule",
    "CsvDataModule",
]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")

# An item is (source, label): a path for files on disk, an index for in-memory arrays.
Item = tuple[Any, int]
Transform = Callable[..., dict[str, Any]]

# Modes PIL cannot turn into RGB without clipping everything above 255 to white.
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as 8-bit RGB.

    Greyscale, palette and RGBA images are converted to RGB. 16-bit and float images
    (common in medical imaging) are min-max scaled per image to 0-255, because PIL's own
    conversion clips them.

    Args:
        path: Image file.

    Returns:
        uint8 array of shape ``(H, W, 3)``.

    Raises:
        DataError: The file is missing, corrupt or not an image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _HIGH_DEPTH_MODES:
                values = np.asarray(image, dtype=np.float32)
                if not np.isfinite(values).all():
                    raise DataError(
                        f"Image {path} holds NaN or infinite pixel values; replace them with finite values or "
                        "remove the image from the data."
                    )
                low, high = float(values.min()), float(values.max())
                values = (values - low) * (255.0 / max(high - low, 1e-6))
                gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as error:
        raise DataError(f"Image {path} does not exist; restore it or remove it from the data.") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports broken files through several exception types (SyntaxError for bad PNG chunks).
        raise DataError(f"Cannot read image {path} (corrupt or not an image); remove or replace it.") from error


def _apply(transform: Transform | None, image: np.ndarray) -> torch.Tensor:
    """Run an albumentations pipeline on ``(H, W, 3)`` uint8, or scale to [0, 1] without one."""
    if transform is None:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
    return transform(image=image)["image"]


class ImageListDataset(Dataset):
    """Images read from files, each with a class label.

    Args:
        items: ``(path, label)`` pairs.
        transform: Albumentations pipeline called as ``transform(image=array)``; ``None``
            only scales to [0, 1].
    """

    def __init__(self, items: Sequence[tuple[str | Path, int]], transform: Transform | None = None) -> None:
        self.items = [(Path(path), int(label)) for path, label in items]
        self.transform = transform

    @property
    def labels(self) -> np.ndarray:
        """Class label of every item, int64 of shape ``(N,)``."""
        return np.asarray([label for _, label in self.items], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Read, transform and return one item.

        Returns:
            ``(image, label)``: image float32 ``(3, H, W)``, label an int.
        """
        path, label = self.items[index]
        return _apply(self.transform, read_rgb(path)), label


class ArrayDataset(Dataset):
    """Images held in memory, each with a class label (synthetic or preloaded data).

    Args:
        images: uint8 RGB images of shape ``(N, H, W, 3)``.
        labels: Class labels of shape ``(N,)``.
        transform: Albumentations pipeline called as ``transform(image=array)``; ``None``
            only scales to [0, 1].
    """

    def __init__(
        self, images: np.ndarray, labels: Sequence[int] | np.ndarray, transform: Transform | None = None
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"Images of shape {images.shape} and type {images.dtype} are not usable; "
                "pass uint8 RGB images of shape (N, H, W, 3)."
            )
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images came with {len(labels)} labels; pass one label per image.")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Transform and return one item.

        Returns:
            ``(image, label)``: image float32 ``(3, H, W)``, label an int.
        """
        return _apply(self.transform, self.images[index]), int(self.labels[index])


class ClassificationDataModule(L.LightningDataModule):
    """Base of the classification data modules: splits, transforms and loaders.

    ``class_names`` and ``num_classes`` are available right after construction: the first
    access calls the subclass's ``_scan()``, which only lists folders or reads CSV text
    (no image is decoded), so a training script can build the model head before the
    Trainer runs. ``setup()`` then lists the items and carves missing splits.

    A split the source does not provide is carved out of the training items, stratified by
    class and seeded by ``seed``: with both val and test missing, ``val_fraction`` and
    ``test_fraction`` are fractions of all training items; with one missing, that one's
    fraction is.

    Args:
        image_size: Backbone input side, or ``(height, width)``.
        mean: Backbone normalisation mean per RGB channel, in [0, 1] units.
        std: Backbone normalisation standard deviation per RGB channel, in [0, 1] units.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; ``None`` uses ``batch_size``.
        num_workers: Loader worker processes; 0 loads in the main process, ``None`` (or
            ``"auto"``) uses one per CPU core but one, at most 8.
        augment: Whether training uses random resized crops and flips.
        seed: Seed of the split carving and of the augmentation stream.
        val_fraction: Share of the training items carved out as val when there is no val split.
        test_fraction: Share of the training items carved out as test when there is no test split.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int] = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str | None = 0,
        augment: bool = True,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(f"Batch size {batch_size}/{eval_batch_size} is not valid; use 1 or more.")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data; "
                "use fractions in [0, 1) that sum to less than 1."
            )
        # Plain tuples (not Hydra ListConfigs) so nothing unpicklable reaches a checkpoint.
        self.image_size = to_size(image_size)
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self._class_names: list[str] | None = None
        self._items: dict[str, list[Item]] | None = None
        self._datasets: dict[tuple[str, bool], Dataset] = {}

    # -- what a source subclass provides -------------------------------------------------

    def _scan(self) -> list[str]:
        """Find the class names cheaply (no image decoding); index = position in the list."""
        raise NotImplementedError(f"{type(self).__name__} must implement _scan().")

    def _load_items(self) -> dict[str, list[Item]]:
        """List the ``(source, label)`` items of ``"train"`` and of any of ``"val"``/``"test"``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_items().")

    def _make_dataset(self, items: list[Item], transform: Transform) -> Dataset:
        """Build the dataset of one split; sources whose items are not paths override this."""
        return ImageListDataset(items, transform)

    # -- classes and splits ---------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names; the label of a class is its position. Scanned on first access."""
        if self._class_names is None:
            self._class_names = list(self._scan())
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's head size). Scanned on first access."""
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        """List the items of every split, carving missing val/test out of train (idempotent)."""
        if self._items is not None:
            return
        items = self._load_items()
        if not items.get("train"):
            raise DataError(f"{type(self).__name__} found no training images; check the data paths in task.data.")
        self._items = self._complete_splits(items)
        sizes = ", ".join(f"{split} {len(self._items[split])}" for split in SPLITS)
        _logger.info("%s: %d classes; items: %s.", type(self).__name__, self.num_classes, sizes)
        warn_batch_exceeds_training_set(
            _logger, self.batch_size, len(self._items["train"]), "images", type(self).__name__
        )

    def _complete_splits(self, items: dict[str, list[Item]]) -> dict[str, list[Item]]:
        """Carve the missing val/test splits out of the training items, stratified by class."""
        missing = {
            split: fraction
            for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction))
            if split not in items
        }
        result = {split: list(items.get(split, [])) for split in SPLITS}
        carved = {split: fraction for split, fraction in missing.items() if fraction > 0}
        if not carved:
            return result
        train = result["train"]
        fractions = {"train": 1.0 - sum(carved.values()), **carved}
        parts = stratified_split([label for _, label in train], fractions, seed=self.seed)
        for split, indices in parts.items():
            result[split] = [train[index] for index in indices]
        for split, fraction in carved.items():
            _logger.info(
                "%s: no %s split given; carving %.0f%% of the training items out as %s "
                "(stratified by class, seed %d).",
                type(self).__name__, split, 100 * fraction, split, self.seed,
            )
        return result

    def split_labels(self, split: str) -> np.ndarray:
        """Class labels of one split after ``setup()``, int64 of shape ``(N,)``."""
        return np.asarray([label for _, label in self._split_items(split)], dtype=np.int64)

    def _split_items(self, split: str) -> list[Item]:
        if split not in SPLITS:
            raise ConfigError(f"Split {split!r} does not exist; use one of {', '.join(SPLITS)}.")
        self.setup()
        assert self._items is not None
        return self._items[split]

    # -- datasets and loaders -------------------------------------------------------------

    def dataset(self, split: str, train: bool = False) -> Dataset:
        """Dataset of one split, with training (random) or evaluation transforms.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            train: Whether to use the training transforms (only allowed for ``"train"``).

        Returns:
            A dataset of ``(image (3, H, W) float32, label int)`` items.
        """
        training = bool(train and split == "train")
        key = (split, training)
        # Cached so a reloaded train loader continues the augmentation stream instead of
        # restarting it from the seed.
        if key not in self._datasets:
            transform = build_transforms(
                self.image_size, self.mean, self.std, train=training, augment=self.augment,
                seed=self.seed if training else None,
            )
            self._datasets[key] = self._make_dataset(self._split_items(split), transform)
        return self._datasets[key]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return make_loader(dataset, batch_size, shuffle, drop_last, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches with augmentation; drops a last partial batch if one is left."""
        dataset = self.dataset("train", train=True)
        # Dropping only when more than one batch exists keeps tiny datasets trainable.
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=len(dataset) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, evaluation transforms."""
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order, evaluation transforms."""
        return self.dataloader("test")

    def dataloader(self, split: str) -> DataLoader:
        """Batches of any split in a fixed order with evaluation transforms (for evaluation).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            A loader of ``(images (B, 3, H, W) float32, labels (B,) int64)`` batches.
        """
        return self._loader(self.dataset(split, train=False), self.eval_batch_size, shuffle=False, drop_last=False)


def _is_data_folder(path: Path) -> bool:
    """Whether a folder may hold data (hidden and tool folders like ``__MACOSX`` do not)."""
    return path.is_dir() and not path.name.startswith((".", "__"))


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (nested folders included), sorted for a stable order."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith((".", "__"))]
        found.extend(
            Path(directory) / name
            for name in files
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


class ImageFolderDataModule(ClassificationDataModule):
    """Classification images in a folder tree, one sub-folder per class.

    Two layouts are understood:

    - ``root/train/<class>/*`` with optional ``root/val/<class>/*`` and ``root/test/<class>/*``;
      a missing val or test split is carved out of train.
    - ``root/<class>/*`` (no ``train/`` folder); val and test are carved out of all images.

    Class names are the training class folder names, sorted; images are files with an
    extension in ``IMAGE_EXTENSIONS``, searched in nested folders too.

    Args:
        root: The dataset folder.
        **kwargs: ``ClassificationDataModule`` arguments (image size, normalisation, batch size, ...).
    """

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()

    @property
    def _has_train_folder(self) -> bool:
        return (self.root / "train").is_dir()

    def _scan(self) -> list[str]:
        root = self.root
        if not root.is_dir():
            raise DataError(
                f"Image folder {root} does not exist; set task.data.root to a folder with one sub-folder per class."
            )
        if not self._has_train_folder and any((root / split).is_dir() for split in ("val", "test")):
            raise DataError(
                f"Image folder {root} has val/ or test/ but no train/; "
                f"add {root / 'train'} with one sub-folder per class."
            )
        train_dir = root / "train" if self._has_train_folder else root
        names = sorted(path.name for path in train_dir.iterdir() if _is_data_folder(path))
        if not names:
            raise DataError(
                f"Image folder {train_dir} has no class sub-folders; put the images of each class in a sub-folder "
                "named after the class."
            )
        return names

    def _load_items(self) -> dict[str, list[Item]]:
        names = self.class_names
        if not self._has_train_folder:
            return {"train": self._list_split(self.root, names, "train")}
        items = {"train": self._list_split(self.root / "train", names, "train")}
        for split in ("val", "test"):
            if (self.root / split).is_dir():
                items[split] = self._list_split(self.root / split, names, split)
        return items

    def _list_split(self, folder: Path, class_names: list[str], split: str) -> list[Item]:
        """List ``(path, label)`` for every image of one split folder."""
        index = {name: position for position, name in enumerate(class_names)}
        class_folders = sorted(path for path in folder.iterdir() if _is_data_folder(path))
        items: list[Item] = []
        for class_folder in class_folders:
            if class_folder.name not in index:
                raise DataError(
                    f"Class folder {class_folder} has no matching class in {self.root / 'train'}; "
                    "rename it to a training class or add that class to train/."
                )
            images = _list_images(class_folder)
            if not images:
                raise DataError(
                    f"Class folder {class_folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "remove the folder or add images to it."
                )
            items.extend((path, index[class_folder.name]) for path in images)
        absent = sorted(set(class_names) - {path.name for path in class_folders})
        if split != "train" and absent:
            _logger.warning("%s has no images of class(es) %s; their %s scores will be undefined.",
                            folder, ", ".join(absent), split)
        return items


class CsvDataModule(ClassificationDataModule):
    """Classification images listed in CSV files with ``path`` and ``label`` columns.

    A label is a class name or a class index. If every label in the CSVs is an integer,
    labels are indices and the class names are ``"0"`` to ``str(max label)``; otherwise the
    class names are the sorted labels of the training CSV. Relative paths resolve against
    ``image_root`` or, without it, the folder of the CSV that lists them. A missing val or
    test CSV is carved out of the training rows.

    Args:
        train_csv: CSV of the training images.
        val_csv: CSV of the validation images, optional.
        test_csv: CSV of the test images, optional.
        image_root: Folder that relative image paths resolve against, optional.
        **kwargs: ``ClassificationDataModule`` arguments (image size, normalisation, batch size, ...).
    """

    def __init__(
        self,
        train_csv: str | Path,
        val_csv: str | Path | None = None,
        test_csv: str | Path | None = None,
        image_root: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.csv_files = {
            split: Path(path).expanduser()
            for split, path in (("train", train_csv), ("val", val_csv), ("test", test_csv))
            if path is not None
        }
        self.image_root = Path(image_root).expanduser() if image_root is not None else None
        self._rows: dict[str, list[tuple[Path, str, int]]] | None = None
        self._integer_labels = False

    def _read_rows(self) -> dict[str, list[tuple[Path, str, int]]]:
        """Read every CSV once: split -> ``(resolved path, raw label, line number)``."""
        if self._rows is not None:
            return self._rows
        rows: dict[str, list[tuple[Path, str, int]]] = {}
        for split, csv_file in self.csv_files.items():
            if not csv_file.is_file():
                raise DataError(f"CSV file {csv_file} does not exist; fix task.data.{split}_csv.")
            base = self.image_root if self.image_root is not None else csv_file.parent
            # utf-8-sig drops the byte-order mark that spreadsheet programs write.
            with open(csv_file, newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = [column.strip() for column in next(reader, [])]
                if "path" not in header or "label" not in header:
                    raise DataError(
                        f"CSV file {csv_file} has columns {header} but needs a header with 'path' and 'label' columns."
                    )
                path_column, label_column = header.index("path"), header.index("label")
                split_rows = []
                for line, row in enumerate(reader, start=2):
                    if not any(cell.strip() for cell in row):
                        continue
                    cells = [cell.strip() for cell in row] + [""] * len(header)  # short rows read as blanks
                    if not cells[path_column] or not cells[label_column]:
                        raise DataError(f"Line {line} of {csv_file} lacks a path or a label; fill it in or remove it.")
                    split_rows.append((base / Path(cells[path_column]).expanduser(), cells[label_column], line))
            if not split_rows:
                raise DataError(f"CSV file {csv_file} lists no images; add rows of path,label.")
            rows[split] = split_rows
        self._rows = rows
        return rows

    def _scan(self) -> list[str]:
        rows = self._read_rows()
        labels = [(split, label, line) for split, split_rows in rows.items() for _, label, line in split_rows]
        self._integer_labels = all(_is_integer(label) for _, label, _ in labels)
        if self._integer_labels:
            for split, label, line in labels:
                if int(label) < 0:
                    raise DataError(
                        f"Label {label} on line {line} of {self.csv_files[split]} is negative; "
                        "use class indices 0, 1, 2, ... or class names."
                    )
            return [str(index) for index in range(max(int(label) for _, label, _ in labels) + 1)]
        return sorted({label for _, label, _ in rows["train"]})

    def _load_items(self) -> dict[str, list[Item]]:
        names = self.class_names
        index = {name: position for position, name in enumerate(names)}
        items: dict[str, list[Item]] = {}
        for split, split_rows in self._read_rows().items():
            csv_file = self.csv_files[split]
            split_items: list[Item] = []
            for path, label, line in split_rows:
                if self._integer_labels:
                    split_items.append((path, int(label)))
                elif label in index:
                    split_items.append((path, index[label]))
                else:
                    raise DataError(
                        f"Label {label!r} on line {line} of {csv_file} does not occur in {self.csv_files['train']}; "
                        "fix the label or add training images of that class."
                    )
            missing = [path for path, _ in split_items if not path.is_file()]
            if missing:
                raise DataError(
                    f"Image {missing[0]} listed in {csv_file} does not exist ({len(missing)} of "
                    f"{len(split_items)} listed images are missing); fix the paths or set task.data.image_root."
                )
            items[split] = split_items
        return items


def _is_integer(text: str) -> bool:
    """Whether a CSV cell is an integer such as ``3`` or ``-1``."""
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None
