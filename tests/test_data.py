"""Tests of vpt.data: splits, transforms, folder/CSV/synthetic data modules and input errors."""

from __future__ import annotations

import csv
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpt.backbones import create_vit
from vpt.data import (
    SHAPE_NAMES,
    ArrayDataset,
    CsvDataModule,
    ImageFolderDataModule,
    SyntheticShapesDataModule,
    build_transforms,
    generate_shapes,
    group_split,
    default_num_workers,
    resolve_num_workers,
    stratified_split,
    warn_once,
)
from vpt import messages
from vpt.data import loading
from vpt.errors import ConfigError, DataError

# Half-grey normalisation makes expected values easy: white -> +1, black -> -1.
HALF = (0.5, 0.5, 0.5)


def _write_image(path: Path, value: int = 255, size: tuple[int, int] = (20, 30)) -> Path:
    """Write a solid RGB image of (height, width) ``size`` with all channels ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)
    return path


def _make_class_folders(root: Path, counts: dict[str, int], value: int = 255) -> None:
    for name, count in counts.items():
        for index in range(count):
            _write_image(root / name / f"{index}.png", value)


def _write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("path", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- splits -----------------------------------------------------------------------------


def test_stratified_split_is_disjoint_complete_and_balanced() -> None:
    labels = np.repeat([0, 1, 2], [100, 40, 3])
    parts = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    for label, total in ((0, 100), (1, 40)):
        counts = {name: int((labels[indices] == label).sum()) for name, indices in parts.items()}
        assert abs(counts["train"] - 0.7 * total) <= 1
        assert abs(counts["val"] - 0.15 * total) <= 1
        assert abs(counts["test"] - 0.15 * total) <= 1
    # A class of three still reaches every split.
    assert all((labels[indices] == 2).sum() == 1 for indices in parts.values())


def test_stratified_split_is_seeded() -> None:
    labels = np.repeat([0, 1], 50)
    first = stratified_split(labels, (0.6, 0.2, 0.2), seed=1)
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=1)
    other = stratified_split(labels, (0.6, 0.2, 0.2), seed=2)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["val"], other["val"])


def test_group_split_keeps_groups_together() -> None:
    groups = np.repeat([f"patient{i}" for i in range(20)], np.arange(1, 21) % 5 + 1)
    parts = group_split(groups.tolist(), {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    joined = np.concatenate(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(len(groups)))
    owners = {name: set(groups[indices]) for name, indices in parts.items()}
    assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]
    assert all(len(indices) > 0 for indices in parts.values())
    assert abs(len(parts["train"]) - 0.6 * len(groups)) <= 6


# -- transforms -------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_transforms_give_normalised_tensor_of_requested_size(train: bool) -> None:
    image = np.full((40, 50, 3), 255, dtype=np.uint8)
    output = build_transforms((24, 16), HALF, HALF, train=train)(image=image)["image"]
    assert output.shape == (3, 24, 16) and output.dtype == torch.float32
    assert torch.allclose(output, torch.ones_like(output))


def test_eval_transform_is_a_plain_resize() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, 4:] = 255  # left half black, right half white
    output = build_transforms(16, HALF, HALF, train=False)(image=image)["image"]
    assert output[:, :, 0].max() == -1.0 and output[:, :, -1].min() == 1.0


# -- image folders ----------------------------------------------------------------------


def test_image_folder_layout_with_train_folder(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"dog": 8, "cat": 6, "bird": 5})
    _make_class_folders(tmp_path / "val", {"dog": 2, "cat": 2, "bird": 1})
    data = ImageFolderDataModule(
        tmp_path, image_size=(32, 24), mean=HALF, std=HALF, batch_size=4, test_fraction=0.2, val_fraction=0.1
    )
    # Known before setup, so the model head can be built first.
    assert data.class_names == ["bird", "cat", "dog"] and data.num_classes == 3
    data.setup("fit")
    sizes = {split: len(data.dataset(split)) for split in ("train", "val", "test")}
    assert sizes["val"] == 5  # the val folder is used as it is
    assert sizes["train"] + sizes["test"] == 19 and sizes["test"] >= 3  # test carved, every class
    assert set(data.split_labels("test").tolist()) == {0, 1, 2}
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 24) and labels.dtype == torch.int64
    assert torch.allclose(images, torch.ones_like(images))  # white, normalised with mean=std=0.5
    images, labels = next(iter(data.dataloader("val")))
    assert images.shape == (4, 3, 32, 24)
    assert torch.equal(labels, torch.tensor([0, 1, 1, 2]))  # fixed order: bird, cat, cat, dog


def test_image_folder_flat_layout_is_split_by_seed(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 20, "b": 10})
    (tmp_path / "a" / "notes.txt").write_text("not an image")

    def split_of(seed: int) -> dict[str, list[Path]]:
        data = ImageFolderDataModule(tmp_path, image_size=16, seed=seed, val_fraction=0.2, test_fraction=0.2)
        data.setup()
        return {split: [path for path, _ in data.dataset(split).items] for split in ("train", "val", "test")}

    first = split_of(0)
    assert [len(first[split]) for split in ("train", "val", "test")] == [18, 6, 6]
    assert first == split_of(0)
    assert first != split_of(1)
    assert not set(first["train"]) & set(first["val"])


def test_image_folder_eval_batch_normalisation_with_black_images(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"x": 4, "y": 4}, value=0)
    data = ImageFolderDataModule(tmp_path, image_size=8, mean=HALF, std=HALF, eval_batch_size=3)
    data.setup()
    images, _ = next(iter(data.test_dataloader()))
    assert images.shape[1:] == (3, 8, 8)
    assert torch.allclose(images, -torch.ones_like(images))


def test_image_folder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        ImageFolderDataModule(missing).num_classes


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    _write_image(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataModule(tmp_path).class_names


def test_image_folder_empty_class_folder(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"full": 3})
    (tmp_path / "hollow").mkdir()
    data = ImageFolderDataModule(tmp_path)
    with pytest.raises(DataError, match="hollow") as error:
        data.setup()
    assert "remove" in str(error.value)


def test_image_folder_val_class_unknown_to_train(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"a": 3, "b": 3})
    _make_class_folders(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"val.c"):
        ImageFolderDataModule(tmp_path).setup()


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "x.png").write_bytes(b"this is not a png file")
    data = ImageFolderDataModule(tmp_path, image_size=8, val_fraction=0.0, test_fraction=0.0)
    data.setup()
    with pytest.raises(DataError, match=r"x\.png.*corrupt"):
        for _ in data.dataloader("train"):
            pass


def test_sixteen_bit_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 4000, 16, dtype=np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # 16-bit grey PNG
    from vpt.data import read_rgb

    image = read_rgb(tmp_path / "deep.png")
    assert image.shape == (4, 16, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255 and 100 < image[0, 8, 0] < 160


# -- CSV --------------------------------------------------------------------------------


def test_csv_with_string_labels_and_relative_paths(tmp_path: Path) -> None:
    images = tmp_path / "images"
    rows = []
    for index in range(12):
        name = "benign" if index % 3 else "malignant"
        _write_image(images / f"{index}.png")
        rows.append((f"images/{index}.png", name))
    train = _write_csv(tmp_path / "train.csv", rows[:9])
    val = _write_csv(tmp_path / "val.csv", rows[9:])
    data = CsvDataModule(train, val_csv=val, image_size=16, batch_size=2, test_fraction=0.3)
    assert data.class_names == ["benign", "malignant"]
    data.setup()
    assert len(data.dataset("val")) == 3
    assert len(data.dataset("train")) + len(data.dataset("test")) == 9
    assert data.split_labels("val").tolist() == [1, 0, 0]  # 9 malignant, 10-11 benign
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and labels.dtype == torch.int64


def test_csv_with_integer_labels_and_image_root(tmp_path: Path) -> None:
    image_root = tmp_path / "pixels"
    rows = []
    for index in range(10):
        _write_image(image_root / f"{index}.jpg")
        rows.append((f"{index}.jpg", str(index % 2 * 3)))  # labels 0 and 3 only
    lists = tmp_path / "lists"
    lists.mkdir()
    train = _write_csv(lists / "train.csv", rows)
    data = CsvDataModule(train, image_root=image_root, image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert data.class_names == ["0", "1", "2", "3"]
    data.setup()
    assert set(np.concatenate([data.split_labels(s) for s in ("train", "val", "test")]).tolist()) == {0, 3}


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.csv"):
        CsvDataModule(tmp_path / "absent.csv").num_classes


def test_csv_missing_column(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", [("a.png", "x")], header=("file", "label"))
    with pytest.raises(DataError, match="'path'"):
        CsvDataModule(train).class_names


def test_csv_missing_image(tmp_path: Path) -> None:
    _write_image(tmp_path / "here.png")
    train = _write_csv(tmp_path / "train.csv", [("here.png", "a"), ("gone1.png", "b"), ("gone2.png", "b")])
    with pytest.raises(DataError, match=r"gone1\.png.*2 of 3"):
        CsvDataModule(train).setup()


def test_csv_negative_integer_label(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", [("a.png", "0"), ("b.png", "-1")])
    with pytest.raises(DataError, match="negative"):
        CsvDataModule(train).num_classes


# -- synthetic shapes -------------------------------------------------------------------


def test_generate_shapes_is_deterministic_and_balanced() -> None:
    images, labels = generate_shapes(num_classes=5, samples_per_class=30, size=32, seed=3)
    assert images.shape == (150, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [30] * 5
    again, again_labels = generate_shapes(num_classes=5, samples_per_class=30, size=32, seed=3)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    other, _ = generate_shapes(num_classes=5, samples_per_class=30, size=32, seed=4)
    assert not np.array_equal(images, other)


def test_generate_shapes_is_fast() -> None:
    generate_shapes(2, 2, 32, 0)  # warm-up outside the timing
    start = time.perf_counter()
    generate_shapes(num_classes=6, samples_per_class=200, size=32, seed=0)
    assert time.perf_counter() - start < 2.0


def test_generate_shapes_classes_are_separable() -> None:
    """A nearest-centroid classifier on shape silhouettes tells every class apart."""
    images, labels = generate_shapes(num_classes=6, samples_per_class=100, size=32, seed=0)
    # Foreground = pixels far from the border colour (shapes never touch the border), which
    # makes the features colour-invariant.
    gray = images.astype(np.float32).mean(axis=-1)
    border = np.concatenate([gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]], axis=1)
    foreground = np.abs(gray - np.median(border, axis=1)[:, None, None]) > 40
    # Centre each silhouette on its bounding box so position does not matter.
    features = []
    for mask in foreground:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8) * 255
        side = max(crop.shape)  # pad to a square so a bar does not stretch into a square
        canvas = np.zeros((side, side), dtype=np.uint8)
        top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        canvas[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        features.append(np.asarray(Image.fromarray(canvas).resize((12, 12)), dtype=np.float32).ravel() / 255)
    features = np.stack(features)
    train, test = np.arange(len(labels)) < 400, np.arange(len(labels)) >= 400
    centroids = np.stack([features[train & (labels == c)].mean(0) for c in range(6)])
    distances = ((features[test][:, None] - centroids[None]) ** 2).sum(-1)
    predictions = distances.argmin(1)
    recalls = [(predictions[labels[test] == c] == c).mean() for c in range(6)]
    assert min(recalls) > 0.8, f"nearest-centroid recall per class {np.round(recalls, 2)}; chance is 0.17"


def test_synthetic_shapes_data_module() -> None:
    data = SyntheticShapesDataModule(
        num_classes=3, samples_per_class=20, image_size=48, batch_size=8, val_fraction=0.25, test_fraction=0.25
    )
    assert data.class_names == list(SHAPE_NAMES[:3]) and data.num_classes == 3
    data.setup()
    assert [len(data.dataset(s)) for s in ("train", "val", "test")] == [30, 15, 15]
    for split in ("val", "test"):
        assert np.bincount(data.split_labels(split)).tolist() == [5, 5, 5]
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32
    assert labels.max() < 3


def test_array_dataset_rejects_wrong_layout() -> None:
    with pytest.raises(DataError, match="uint8 RGB"):
        ArrayDataset(np.zeros((2, 3, 8, 8), dtype=np.uint8), [0, 1])


# -- loader settings and setup warnings -------------------------------------------------


@pytest.fixture
def fresh_warn_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which warnings were given, so each test sees its own once-per-process warnings."""
    monkeypatch.setattr(messages, "_said", set())


def _batch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "task.data.batch_size" in record.getMessage()]


def test_batch_larger_than_training_set_warns_once(fresh_warn_once: None, caplog: pytest.LogCaptureFixture) -> None:
    def shapes(batch_size: int) -> SyntheticShapesDataModule:
        # 2 classes x 5 images, a fifth each carved out for val and test: 6 training images.
        return SyntheticShapesDataModule(
            num_classes=2, samples_per_class=5, image_size=8, batch_size=batch_size, val_fraction=0.2,
            test_fraction=0.2,
        )

    with caplog.at_level("WARNING"):
        for batch_size in (6, 4):
            data = shapes(batch_size)
            data.setup()
            next(iter(data.train_dataloader()))
    assert _batch_warnings(caplog) == [], "a batch of at most the training set is fine"
    with caplog.at_level("WARNING"):
        data = shapes(16)
        data.setup()
        data.setup("fit")
        images, _ = next(iter(data.train_dataloader()))
        shapes(16).setup()  # a second module in the same run
    (message,) = _batch_warnings(caplog)
    assert images.shape[0] == 6
    assert "task.data.batch_size=16 is larger than the 6 training images" in message
    assert "effective batch size" in message and "lower task.data.batch_size to 6 or less" in message


def test_warn_once_repeats_nothing(fresh_warn_once: None, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("vpt.test_warn_once")
    with caplog.at_level("WARNING", logger=logger.name):
        assert warn_once(logger, "%d apples", 3)
        assert not warn_once(logger, "3 apples")  # the same text, however it was formatted
        assert warn_once(logger, "%d apples", 4)
    assert [record.getMessage() for record in caplog.records] == ["3 apples", "4 apples"]


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (3, 2), (8, 7), (9, 8), (64, 8)])
def test_default_num_workers_leaves_a_core(cpus: int, workers: int) -> None:
    assert default_num_workers(cpus) == workers


def test_available_cpus_prefers_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loading.available_cpus() == 2 and default_num_workers() == 1
    monkeypatch.delattr(loading.os, "sched_getaffinity")  # as on macOS
    assert loading.available_cpus() == 32 and default_num_workers() == 8


def test_resolve_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "available_cpus", lambda: 4)
    assert resolve_num_workers(None) == resolve_num_workers("auto") == resolve_num_workers("AUTO") == 3
    assert resolve_num_workers(0) == 0 and resolve_num_workers(5) == 5 and resolve_num_workers("2") == 2
    for bad in (-1, True, 1.5, "many"):
        with pytest.raises(ConfigError, match="task.data.num_workers to 0 or more, or to null"):
            resolve_num_workers(bad)


def test_data_module_workers_and_pinning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "available_cpus", lambda: 3)
    data = SyntheticShapesDataModule(num_classes=2, samples_per_class=4, image_size=8, num_workers=None)
    assert data.num_workers == 2
    data = SyntheticShapesDataModule(num_classes=2, samples_per_class=4, image_size=8, num_workers=0)
    data.setup()
    loader = data.train_dataloader()
    assert loader.num_workers == 0
    assert loader.pin_memory == torch.cuda.is_available(), "pinned memory only helps copies to a GPU"


# -- input sizes that are no multiple of the patch size ----------------------------------

_TINY_VIT = dict(patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)


def _patch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "patch size" in record.getMessage()]


def test_vit_img_size_off_the_patch_grid_warns_naming_nearest_sizes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vpt.backbones.timm_vit"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-init warning
        create_vit("vit_tiny_patch16_224", pretrained=False, img_size=36, **_TINY_VIT)
    (message,) = _patch_warnings(caplog)
    assert "model.img_size=36 is not a multiple of the patch size 8" in message
    assert "set model.img_size to 32 or 40" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="vpt.backbones.timm_vit"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        create_vit("vit_tiny_patch16_224", pretrained=False, img_size=(32, 44), **_TINY_VIT)
    (message,) = _patch_warnings(caplog)
    assert "[32, 44]" in message and "[32, 40] or [32, 48]" in message


def test_vit_img_size_on_the_patch_grid_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vpt.backbones.timm_vit"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        create_vit("vit_tiny_patch16_224", pretrained=False, img_size=40, **_TINY_VIT)
        create_vit("vit_tiny_patch16_224", pretrained=False, **{**_TINY_VIT, "patch_size": 16})
    assert _patch_warnings(caplog) == []


def test_sam_img_size_off_the_patch_grid_names_nearest_sizes() -> None:
    from vpt.backbones.sam import build_sam

    with pytest.raises(ConfigError, match=r"multiple of its patch size 16, got 72; set model.img_size to 64 or 80"):
        build_sam("sam_tiny", pretrained=False, img_size=72)
