"""Classification data: layouts, splits, transforms, generated shapes, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vpt.data import (
    CsvDataModule,
    ImageFolderDataModule,
    SyntheticShapesDataModule,
    generate_shapes,
    group_split,
    stratified_split,
)
from vpt.errors import DataError

HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _write(path, value: int = 255, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size + 4, 3), value, np.uint8)).save(path)


def _folder(root, classes=("benign", "malignant"), per_class=10) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _write(root / name / f"{i}.png", value=40 + 100 * c)


def test_stratified_split_is_disjoint_complete_balanced_and_seeded() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    split = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    indices = np.concatenate(list(split.values()))
    assert sorted(indices.tolist()) == list(range(100))
    for part in split.values():
        assert set(np.unique(labels[part])) == {0, 1, 2}  # every class in every split
    assert abs(len(split["train"]) - 70) <= 3
    again = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    other = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=4)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert any(not np.array_equal(split[k], other[k]) for k in split)


def test_group_split_keeps_groups_together() -> None:
    groups = np.repeat([f"case{i}" for i in range(10)], 7)
    split = group_split(groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    seen = {}
    for name, part in split.items():
        for group in set(groups[part]):
            assert group not in seen, f"{group} in {seen.get(group)} and {name}"
            seen[group] = name
    assert len(seen) == 10


def test_image_folder_without_splits_is_split_and_normalised(tmp_path) -> None:
    _folder(tmp_path / "imgs", per_class=10)
    dm = ImageFolderDataModule(tmp_path / "imgs", image_size=16, batch_size=4, augment=False, **HALF)
    assert dm.class_names == ["benign", "malignant"] and dm.num_classes == 2
    dm.setup("fit")
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 20 and sizes["val"] >= 2 and sizes["test"] >= 2
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
    # value 40 -> (40/255 - 0.5)/0.5, value 140 -> (140/255 - 0.5)/0.5: normalisation applied
    expected = torch.tensor([(40 + 100 * int(label)) / 255.0 for label in labels]) * 2 - 1
    torch.testing.assert_close(images.mean(dim=(1, 2, 3)), expected, atol=1e-3, rtol=0)


def test_image_folder_with_train_val_test(tmp_path) -> None:
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _folder(tmp_path / split, per_class=n)
    dm = ImageFolderDataModule(tmp_path, image_size=(12, 8), batch_size=4)
    dm.setup("fit")
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [12, 4, 6]
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 12, 8)


def test_csv_lists_with_names_and_integers(tmp_path) -> None:
    _folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=6)
    rows = ["path,label"] + [f"imgs/{n}/{i}.png,{n}" for n in "abc" for i in range(6)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dm = CsvDataModule(train_csv=str(tmp_path / "train.csv"), image_size=8, batch_size=2)
    assert dm.class_names == ["a", "b", "c"]
    dm.setup("fit")
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 18
    rows = ["path,label"] + [f"{tmp_path}/imgs/{n}/{i}.png,{k}" for k, n in enumerate("abc") for i in range(6)]
    (tmp_path / "ints.csv").write_text("\n".join(rows) + "\n")
    assert CsvDataModule(train_csv=str(tmp_path / "ints.csv")).class_names == ["0", "1", "2"]


def test_synthetic_shapes_are_deterministic_balanced_and_learnable_signal() -> None:
    images, labels = generate_shapes(num_classes=4, samples_per_class=50, size=32, seed=0)
    again, _ = generate_shapes(num_classes=4, samples_per_class=50, size=32, seed=0)
    other, _ = generate_shapes(num_classes=4, samples_per_class=50, size=32, seed=1)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert np.bincount(labels).tolist() == [50, 50, 50, 50]
    # The shapes differ in form, not colour: a nearest-centroid classifier on the
    # "how far from the background" map separates them well above chance (0.25).
    def contrast(batch: np.ndarray) -> np.ndarray:
        flat = batch.astype(np.float32)
        border = np.concatenate([flat[:, 0], flat[:, -1]], axis=1).mean(axis=1, keepdims=True)
        return np.abs(flat - border[:, None]).sum(-1).reshape(len(batch), -1)

    train_x, test_x = contrast(images), contrast(other)
    _, test_y = generate_shapes(num_classes=4, samples_per_class=50, size=32, seed=1)
    centroids = np.stack([train_x[labels == c].mean(0) for c in range(4)])
    predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test_y).mean() > 0.4


def test_synthetic_shapes_datamodule(tmp_path) -> None:
    dm = SyntheticShapesDataModule(num_classes=3, samples_per_class=20, image_size=24, batch_size=8)
    assert dm.num_classes == 3 and len(dm.class_names) == 3
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 24, 24) and labels.dtype == torch.int64


def test_missing_root_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        ImageFolderDataModule(tmp_path / "nope").class_names


def test_empty_class_folder_is_named(tmp_path) -> None:
    _folder(tmp_path, per_class=3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        dm = ImageFolderDataModule(tmp_path)
        dm.class_names
        dm.setup("fit")


def test_unreadable_image_is_named(tmp_path) -> None:
    _folder(tmp_path, per_class=4)
    broken = tmp_path / "benign" / "broken.png"
    broken.write_bytes(b"this is not a png")
    dm = ImageFolderDataModule(tmp_path, image_size=8, batch_size=64, val_fraction=0.0, test_fraction=0.0)
    dm.setup("fit")
    with pytest.raises(DataError, match="broken.png"):
        for _ in dm.train_dataloader():
            pass
    assert broken.read_bytes() == b"this is not a png"  # nothing touched


def test_csv_errors(tmp_path) -> None:
    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(DataError, match="path"):
        CsvDataModule(train_csv=str(tmp_path / "bad.csv")).class_names
    (tmp_path / "missing.csv").write_text("path,label\nnot_there.png,a\nalso_not.png,b\n")
    with pytest.raises(DataError, match="not_there.png"):
        dm = CsvDataModule(train_csv=str(tmp_path / "missing.csv"))
        dm.class_names
        dm.setup("fit")
    with pytest.raises(DataError, match="nothing.csv"):
        CsvDataModule(train_csv=str(tmp_path / "nothing.csv")).class_names
