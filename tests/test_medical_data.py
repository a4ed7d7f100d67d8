"""Medical segmentation data: volume I/O, windowing, layouts, phantoms and the data module.

Every file is written under pytest's tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from vpt.data.medical import (
    SYNAPSE_CLASS_NAMES,
    VolumeSegmentationDataModule,
    class_names_from_dataset_json,
    detect_layout,
    find_cases,
    generate_phantom,
    load_case,
    read_volume,
    window_ct,
    write_phantom_dataset,
    write_volume,
)
from vpt import messages
from vpt.data import loading
from vpt.data.medical import phantom as phantom_module
from vpt.errors import ConfigError, DataError

# (z, y, x) sizes and spacings that differ on every axis, so a swapped axis cannot pass.
SHAPE = (3, 4, 5)
SPACING = (2.5, 0.8, 0.6)
SMALL_PHANTOM = (12, 40, 40)


def asymmetric_volume() -> np.ndarray:
    """A (z, y, x) volume whose every voxel is distinct: value = 100 z + 10 y + x."""
    z, y, x = np.meshgrid(*(np.arange(side) for side in SHAPE), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.int16)


def batch_summary(batch: dict) -> dict:
    return {key: (tuple(value.shape), value.dtype) if torch.is_tensor(value) else value for key, value in batch.items()}


# -- reading and writing volumes ------------------------------------------------------------


def test_read_nifti_written_by_nibabel_is_zyx(tmp_path: Path) -> None:
    volume = asymmetric_volume()
    z, y, x = SPACING
    # nibabel stores (x, y, z): the file holds the transposed array and x-first zooms.
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([x, y, z, 1.0])), str(tmp_path / "v.nii.gz"))
    array, spacing = read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(array, volume)
    assert array.dtype == np.float32
    assert spacing == pytest.approx(SPACING)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_read_volume_written_by_simpleitk_is_zyx(tmp_path: Path, suffix: str) -> None:
    volume = asymmetric_volume()
    image = sitk.GetImageFromArray(volume)  # ITK arrays are (z, y, x); spacing is (x, y, z)
    image.SetSpacing(tuple(reversed(SPACING)))
    sitk.WriteImage(image, str(tmp_path / f"v{suffix}"))
    array, spacing = read_volume(tmp_path / f"v{suffix}")
    np.testing.assert_array_equal(array, volume)
    assert spacing == pytest.approx(SPACING)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_volume_round_trip(tmp_path: Path, suffix: str) -> None:
    volume = asymmetric_volume()
    path = write_volume(tmp_path / f"v{suffix}", volume, SPACING)
    array, spacing = read_volume(path)
    np.testing.assert_array_equal(array, volume)
    assert spacing == pytest.approx(SPACING)
    label, _ = read_volume(write_volume(tmp_path / f"l{suffix}", (volume % 3).astype(np.uint8), SPACING), label=True)
    assert np.issubdtype(label.dtype, np.integer)
    np.testing.assert_array_equal(label, volume % 3)
    # The header agrees with what nibabel itself reports for NIfTI.
    if suffix.startswith(".nii"):
        assert nib.load(str(path)).shape == SHAPE[::-1]


def test_read_volume_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "v.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_volume(tmp_path / "v.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="broken.nii.gz"):
        read_volume(tmp_path / "broken.nii.gz")
    write_volume(tmp_path / "soft.nii.gz", np.full(SHAPE, 0.5, dtype=np.float32))
    with pytest.raises(DataError, match="non-integer"):
        read_volume(tmp_path / "soft.nii.gz", label=True)


# -- windowing ------------------------------------------------------------------------------


def test_window_ct_edges() -> None:
    hu = np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0])
    np.testing.assert_allclose(window_ct(hu), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert window_ct(hu).dtype == np.float32
    np.testing.assert_allclose(window_ct(hu, low=-1000, high=3000), (hu + 1000) / 4000, atol=1e-6)
    with pytest.raises(ConfigError, match="low < high"):
        window_ct(hu, low=100, high=100)


# -- layouts --------------------------------------------------------------------------------


def write_case(folder: Path, name: str, label: np.ndarray, image: np.ndarray | None = None) -> None:
    """Write one nnU-Net case: image HU = 100 * label unless given."""
    image = (100.0 * label).astype(np.int16) if image is None else image
    write_volume(folder / "imagesTr" / f"{name}_0000.nii.gz", image, SPACING)
    write_volume(folder / "labelsTr" / f"{name}.nii.gz", label.astype(np.uint8), SPACING)


def write_dataset_json(folder: Path, labels: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))


def test_nnunet_layout_v2(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"background": 0, "spleen": 2, "liver": 1})
    label = np.zeros(SHAPE, dtype=np.uint8)
    for name in ("b_case", "a_case"):
        write_case(tmp_path, name, label)
    # Another channel of a multi-modal case is not a case of its own.
    write_volume(tmp_path / "imagesTr" / "a_case_0001.nii.gz", label, SPACING)
    write_volume(tmp_path / "imagesTs" / "c_case_0000.nii.gz", label, SPACING)
    assert detect_layout(tmp_path) == "nnunet"
    index = find_cases(tmp_path)
    assert index.class_names == ("background", "liver", "spleen")
    assert [case.case_id for case in index.cases] == ["a_case", "b_case"]
    assert index.cases[0].label == tmp_path / "labelsTr" / "a_case.nii.gz"
    assert [case.case_id for case in index.unlabeled] == ["c_case"] and not index.test
    arrays = load_case(index.cases[0])
    assert arrays.image.shape == SHAPE and arrays.spacing == pytest.approx(SPACING)


def test_nnunet_layout_msd(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"0": "background", "2": "tumour", "1": "liver"})
    label = np.zeros(SHAPE, dtype=np.uint8)
    write_volume(tmp_path / "imagesTr" / "liver_0.nii.gz", label, SPACING)
    write_volume(tmp_path / "labelsTr" / "liver_0.nii.gz", label, SPACING)
    (tmp_path / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS resource fork")
    index = find_cases(tmp_path)
    assert index.class_names == ("background", "liver", "tumour")
    assert [case.case_id for case in index.cases] == ["liver_0"]
    assert class_names_from_dataset_json(tmp_path / "dataset.json")[0] == "background"


def test_nnunet_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="README"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="README"):
        find_cases(tmp_path / "empty")
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "none" / folder).mkdir(parents=True)
    with pytest.raises(DataError, match="imagesTr holds no image volumes"):
        find_cases(tmp_path / "none")
    write_volume(tmp_path / "orphan" / "imagesTr" / "x_0000.nii.gz", np.zeros(SHAPE), SPACING)
    (tmp_path / "orphan" / "labelsTr").mkdir()
    with pytest.raises(DataError, match="x_0000.nii.gz has no label"):
        find_cases(tmp_path / "orphan")


def write_synapse(root: Path, cases: dict[str, int], test_cases: tuple[str, ...] = ("case0001",)) -> None:
    """TransUNet's layout: per-slice npz files for training, h5 volumes for testing."""
    rng = np.random.default_rng(0)
    (root / "train_npz").mkdir(parents=True)
    for case, depth in cases.items():
        for k in range(depth):
            label = np.zeros((8, 8), dtype=np.float32)
            label[2:5, 2 + k % 3 : 5] = 1 + k % 8
            image = rng.random((8, 8), dtype=np.float32)
            np.savez(root / "train_npz" / f"{case}_slice{k:03d}.npz", image=image, label=label)
    (root / "test_vol_h5").mkdir()
    for case in test_cases:
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as data:
            data["image"] = rng.random((3, 10, 12), dtype=np.float32)
            data["label"] = np.full((3, 10, 12), 8, dtype=np.float32)


def test_synapse_layout(tmp_path: Path) -> None:
    write_synapse(tmp_path, {"case0005": 12, "case0006": 2})
    assert detect_layout(tmp_path) == "synapse"
    index = find_cases(tmp_path)
    assert index.class_names == SYNAPSE_CLASS_NAMES and len(SYNAPSE_CLASS_NAMES) == 9
    assert SYNAPSE_CLASS_NAMES[5] == "liver" and SYNAPSE_CLASS_NAMES[3] == "kidney_left"
    assert [case.case_id for case in index.cases] == ["case0005", "case0006"]
    # Slice 10 sorts after slice 2 by number, not by name.
    assert index.cases[0].slice_numbers == tuple(range(12))
    assert [case.case_id for case in index.test] == ["case0001"]
    arrays = load_case(index.cases[0])
    assert arrays.image.shape == (12, 8, 8) and arrays.label.shape == (12, 8, 8) and arrays.spacing is None
    test = load_case(index.test[0])
    assert test.image.shape == (3, 10, 12) and test.label.dtype == np.uint8


def test_synapse_datamodule_uses_official_test(tmp_path: Path) -> None:
    write_synapse(tmp_path, {"case0005": 4, "case0006": 4, "case0007": 4})
    module = VolumeSegmentationDataModule(tmp_path, image_size=16, val_fraction=0.34, batch_size=2)
    module.setup()
    assert module.num_classes == 9
    assert [case.case_id for case in module.cases("test")] == ["case0001"]
    assert len(module.cases("val")) == 1 and len(module.cases("train")) == 2
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].dtype == torch.int64
    volume = next(iter(module.test_dataloader()))
    assert volume["image"].shape == (1, 3, 3, 16, 16)
    assert volume["label"].shape == (1, 3, 10, 12)
    assert torch.isnan(volume["spacing"]).all() and volume["spacing"].shape == (1, 3)


def write_folder2d(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((10, 14), dtype=np.uint8)
    mask[2:6, 3:9] = 2
    Image.fromarray(mask * 100).save(root / "images" / "grey.png")
    Image.fromarray(np.stack([mask * 50, mask * 10, mask], axis=-1)).save(root / "images" / "colour.jpg")
    for name in ("grey", "colour"):
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")


def test_folder2d_layout(tmp_path: Path) -> None:
    write_folder2d(tmp_path)
    assert detect_layout(tmp_path) == "folder2d"
    index = find_cases(tmp_path)
    assert [case.case_id for case in index.cases] == ["colour", "grey"] and index.class_names is None
    grey, colour = load_case(index.cases[1]), load_case(index.cases[0])
    assert grey.image.shape == (1, 10, 14) and colour.image.shape == (1, 10, 14, 3)
    assert grey.label.shape == (1, 10, 14) and int(grey.label.max()) == 2
    with pytest.raises(DataError, match="num_classes"):
        VolumeSegmentationDataModule(tmp_path).class_names
    module = VolumeSegmentationDataModule(tmp_path, num_classes=3, image_size=8, val_fraction=0, test_fraction=0)
    batch = next(iter(module.dataloader("train")))
    assert batch["image"].shape == (2, 3, 8, 8) and int(batch["mask"].max()) == 2
    (tmp_path / "masks" / "grey.png").unlink()
    with pytest.raises(DataError, match="grey.png has no mask"):
        find_cases(tmp_path)


# -- phantoms -------------------------------------------------------------------------------


def test_phantom_is_deterministic_and_plausible() -> None:
    image, label, spacing = generate_phantom(seed=3)
    again, label_again, _ = generate_phantom(seed=3)
    other, label_other, _ = generate_phantom(seed=4)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(label, label_again)
    assert not np.array_equal(label, label_other) and not np.allclose(image, other)
    assert image.shape == label.shape == (32, 96, 96) and image.dtype == np.float32 and label.dtype == np.uint8
    assert spacing == (2.5, 0.8, 0.8)
    assert set(np.unique(label)) == set(range(9)), "all 8 organs and the background"
    assert 40 <= image[label == 5].mean() <= 80, "liver"
    assert image[:, :4, :4].mean() < -900, "air outside the body"
    assert np.percentile(image, 99.9) > 300, "bone"
    assert image[label == 1].mean() > image[label == 5].mean(), "enhanced aorta is brighter than liver"
    # Small organs are missing from some slices, as in real scans.
    assert not (label == 2).any(axis=(1, 2)).all()


def test_write_phantom_dataset_skips_complete_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_phantom_dataset(tmp_path / "phantoms", num_cases=2, seed=1, shape=SMALL_PHANTOM)
    index = find_cases(root)
    assert index.class_names == SYNAPSE_CLASS_NAMES
    assert [case.image.name for case in index.cases] == ["phantom_000_0000.nii.gz", "phantom_001_0000.nii.gz"]
    image, spacing = read_volume(index.cases[0].image)
    assert image.shape == SMALL_PHANTOM and spacing == pytest.approx((2.5, 0.8, 0.8))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete phantom set was regenerated")

    monkeypatch.setattr(phantom_module, "generate_phantom", fail)
    write_phantom_dataset(root, num_cases=2, seed=1, shape=SMALL_PHANTOM)
    with pytest.raises(AssertionError, match="regenerated"):
        write_phantom_dataset(root, num_cases=3, seed=1, shape=SMALL_PHANTOM)
    write_dataset_json(tmp_path / "real", {"background": 0})
    with pytest.raises(DataError, match="did not generate"):
        write_phantom_dataset(tmp_path / "real")


# -- the data module ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), num_cases=8, seed=0, shape=SMALL_PHANTOM)


def test_patient_level_split(phantom_root: Path) -> None:
    def split_ids(seed: int) -> dict[str, list[str]]:
        module = VolumeSegmentationDataModule(phantom_root, seed=seed, val_fraction=0.25, test_fraction=0.25)
        return {split: [case.case_id for case in module.cases(split)] for split in ("train", "val", "test")}

    first = split_ids(0)
    all_ids = [case_id for ids in first.values() for case_id in ids]
    assert len(all_ids) == len(set(all_ids)) == 8, "every case in exactly one split"
    assert [len(first[split]) for split in ("train", "val", "test")] == [4, 2, 2]
    assert split_ids(0) == first
    assert any(split_ids(seed) != first for seed in (1, 2, 3))


def test_datamodule_batches(phantom_root: Path) -> None:
    module = VolumeSegmentationDataModule(
        phantom_root, image_size=(24, 32), batch_size=3, val_fraction=0.25, test_fraction=0.25
    )
    assert module.class_names == list(SYNAPSE_CLASS_NAMES) and module.num_classes == 9
    module.setup("fit")
    train_cases = {case.case_id for case in module.cases("train")}
    batch = next(iter(module.train_dataloader()))
    assert batch_summary(batch) == {
        "image": ((3, 3, 24, 32), torch.float32),
        "mask": ((3, 24, 32), torch.int64),
        "case": batch["case"],
        "slice": ((3,), torch.int64),
    }
    assert set(batch["case"]) <= train_cases
    val = next(iter(module.val_dataloader()))
    assert set(val["case"]) <= {case.case_id for case in module.cases("val")}
    assert int(val["mask"].max()) < 9

    volume = next(iter(module.test_dataloader()))
    case = module.cases("test")[0]
    assert volume["case"] == [case.case_id]
    assert volume["image"].shape == (1, SMALL_PHANTOM[0], 3, 24, 32) and volume["image"].dtype == torch.float32
    label, spacing = read_volume(case.label, label=True)
    assert volume["label"].dtype == torch.int64
    np.testing.assert_array_equal(volume["label"][0].numpy(), label)  # original resolution, untouched
    torch.testing.assert_close(volume["spacing"][0], torch.tensor(spacing, dtype=torch.float32))
    assert len(module.dataloader("val", volumes=True)) == 2


def test_empty_slice_sampling(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    label = np.zeros((20, 8, 8), dtype=np.uint8)
    label[5:8, 2:5, 2:5] = 1
    write_case(tmp_path, "only", label)

    def train_slices(**kwargs: object) -> list[int]:
        module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0, **kwargs)
        return sorted(int(module.dataset("train")[i]["slice"]) for i in range(len(module.dataset("train"))))

    assert train_slices(empty_slice_fraction=0.0) == [5, 6, 7]
    assert len(train_slices()) == 3 + round(0.1 * 17)
    assert train_slices(empty_slice_fraction=1.0) == list(range(20))
    assert len(train_slices(empty_slice_fraction=1.0, slices_per_volume=4)) == 4


def test_augmentation_moves_image_and_mask_together(tmp_path: Path) -> None:
    # The image is its own label: 800 HU inside the object, 0 HU outside, and the window (0, 800)
    # makes that 1 and 0. Whatever geometry the augmentation draws, it must move both alike.
    write_dataset_json(tmp_path, {"background": 0, "object": 1})
    label = np.zeros((6, 40, 40), dtype=np.uint8)
    label[:, 8:30, 12:22] = 1
    label[:, 8:14, 22:34] = 1  # an L shape: rotations and shifts show
    write_case(tmp_path, "case", label, image=800 * label.astype(np.int16))
    module = VolumeSegmentationDataModule(
        tmp_path, image_size=40, window=(0, 800), val_fraction=0, test_fraction=0, seed=3,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )
    dataset = module.dataset("train", train=True)
    moved = 0
    for index in range(len(dataset)):
        item = dataset[index]
        image = item["image"] * 0.25 + 0.5
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]), "grey replicated to RGB"
        foreground, mask = image[0] > 0.5, item["mask"] == 1
        iou = (foreground & mask).sum() / (foreground | mask).sum()
        assert iou > 0.85, f"image and mask disagree after augmentation (IoU {iou:.2f})"
        moved += int(not torch.equal(item["mask"], torch.from_numpy(label[0].astype(np.int64))))
    assert moved >= 1, "the training transform should change the geometry"


def test_shape_mismatch_names_the_case(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    write_volume(tmp_path / "imagesTr" / "crooked_0000.nii.gz", np.zeros((4, 8, 8), np.int16), SPACING)
    write_volume(tmp_path / "labelsTr" / "crooked.nii.gz", np.zeros((4, 8, 9), np.uint8), SPACING)
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match=r"Case crooked: .*\(4, 8, 8\).*\(4, 8, 9\)"):
        module.dataset("train")


def test_label_values_out_of_range_name_the_case(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1, "other": 2})
    label = np.zeros((4, 8, 8), dtype=np.uint8)
    label[1, 2, 2] = 5
    write_case(tmp_path, "bad", label)
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match=r"case bad holds the value 5 but only 3 classes are named; name at least 6 classes"):
        module.dataset("train")
    # Naming six classes, as the message says (here in dataset.json), makes the case usable.
    write_dataset_json(tmp_path, {"background": 0, "organ": 1, "other": 2, "c3": 3, "c4": 4, "c5": 5})
    fixed = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    assert len(fixed.dataset("train")) >= 1


def test_negative_labels_name_the_case(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    label = np.zeros((4, 8, 8), dtype=np.int16)
    label[0, 0, 0] = -1
    write_volume(tmp_path / "imagesTr" / "minus_0000.nii.gz", np.zeros((4, 8, 8), np.int16), SPACING)
    write_volume(tmp_path / "labelsTr" / "minus.nii.gz", label, SPACING)
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match="case minus holds the negative value -1"):
        module.dataset("train")


def test_datamodule_generates_phantoms_into_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "organ_seg_synthetic"
    module = VolumeSegmentationDataModule(
        root, generate_phantoms=True, num_phantoms=3, phantom_shape=SMALL_PHANTOM, image_size=16,
        val_fraction=0.34, test_fraction=0.0,
    )
    assert module.num_classes == 9 and not root.exists(), "class names come without writing files"
    module.prepare_data()
    module.setup()
    assert len(module.cases("train")) + len(module.cases("val")) == 3
    assert next(iter(module.train_dataloader()))["image"].shape[1:] == (3, 16, 16)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="window"):
        VolumeSegmentationDataModule(tmp_path, window=(300, 100))
    with pytest.raises(ConfigError, match="layout"):
        VolumeSegmentationDataModule(tmp_path, layout="dicom")
    with pytest.raises(ConfigError, match="empty_slice_fraction"):
        VolumeSegmentationDataModule(tmp_path, empty_slice_fraction=2.0)


# -- data checks: non-finite images, geometry, batch size -----------------------------------


@pytest.fixture(autouse=True)
def fresh_warn_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which warnings were given, so each test sees its own once-per-process warnings."""
    monkeypatch.setattr(messages, "_said", set())


def organ_label(depth: int = 4) -> np.ndarray:
    label = np.zeros((depth, 8, 8), dtype=np.uint8)
    label[:, 2:6, 3:6] = 1
    return label


def write_nnunet_with_test_split(root: Path, bad_value: float | None = None, bad_case: str = "test_b") -> Path:
    """Three training and two official test cases; ``bad_value`` is planted in one voxel of ``bad_case``."""
    write_dataset_json(root, {"background": 0, "organ": 1})
    label = organ_label()
    for name in ("train_a", "train_b", "train_c"):
        write_case(root, name, label)
    for name in ("test_a", "test_b"):
        image = (100.0 * label).astype(np.float32)
        if name == bad_case and bad_value is not None:
            image[2, 5, 1] = bad_value
        write_volume(root / "imagesTs" / f"{name}_0000.nii.gz", image, SPACING)
        write_volume(root / "labelsTs" / f"{name}.nii.gz", label, SPACING)
    if bad_case.startswith("train") and bad_value is not None:
        image = (100.0 * label).astype(np.float32)
        image[2, 5, 1] = bad_value
        write_volume(root / "imagesTr" / f"{bad_case}_0000.nii.gz", image, SPACING)
    return root


def nnunet_module(root: Path, **kwargs: object) -> VolumeSegmentationDataModule:
    options: dict = dict(image_size=8, val_fraction=0.34, empty_slice_fraction=1.0, batch_size=2)
    return VolumeSegmentationDataModule(root, **{**options, **kwargs})


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_test_volume_names_case_and_file(tmp_path: Path, bad_value: float) -> None:
    root = write_nnunet_with_test_split(tmp_path, bad_value)
    module = nnunet_module(root)
    assert [case.case_id for case in module.cases("test")] == ["test_a", "test_b"]
    expected = (
        r"Case test_b: image .*imagesTs/test_b_0000\.nii\.gz holds 1 non-finite voxel.*\(2, 5, 1\).*remove the case"
    )
    # Where the test loop reads it, and in the check a run makes at its start.
    with pytest.raises(DataError, match=expected):
        list(module.test_dataloader())
    with pytest.raises(DataError, match=expected):
        module.check_cases()
    # The training and validation cases are clean: checking only them passes.
    assert module.check_cases(splits=("train", "val")) == 3


def test_non_finite_training_volume_fails_before_training(tmp_path: Path) -> None:
    root = write_nnunet_with_test_split(tmp_path, np.nan, bad_case="train_b")
    module = nnunet_module(root, val_fraction=0.0)
    with pytest.raises(DataError, match=r"Case train_b: image .*train_b_0000\.nii\.gz holds 1 non-finite"):
        module.train_dataloader()
    with pytest.raises(DataError, match="Case train_b"):
        nnunet_module(root, val_fraction=0.0).check_cases(splits=("train",))


def test_check_cases_passes_clean_data_and_keeps_slices(phantom_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = VolumeSegmentationDataModule(phantom_root, image_size=16, val_fraction=0.25, test_fraction=0.25)
    assert module.check_cases() == 8
    from vpt.data.medical import datamodule as datamodule_module

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("training cases were read a second time")

    monkeypatch.setattr(datamodule_module, "load_case", fail)
    assert len(module.dataset("train")) > 0 and len(module.dataset("val")) > 0


def test_non_finite_synapse_files_name_the_case(tmp_path: Path) -> None:
    write_synapse(tmp_path, {"case0005": 3, "case0006": 3}, test_cases=("case0001", "case0002"))
    with np.load(tmp_path / "train_npz" / "case0006_slice001.npz") as data:
        image, label = data["image"].copy(), data["label"]
    image[4, 4] = np.nan
    np.savez(tmp_path / "train_npz" / "case0006_slice001.npz", image=image, label=label)
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0.0, batch_size=1)
    with pytest.raises(DataError, match=r"Case case0006: image .*case0006_slice001\.npz holds 1 non-finite"):
        module.check_cases(splits=("train",))
    dataset = module.dataset("train")
    bad = [index for index, record in enumerate(dataset.records) if record.source.path.name == "case0006_slice001.npz"]
    dataset[0]  # clean slices still load
    with pytest.raises(DataError, match="Case case0006"):
        dataset[bad[0]]
    with h5py.File(tmp_path / "test_vol_h5" / "case0002.npy.h5", "r+") as data:
        data["image"][1, 2, 3] = np.inf
    with pytest.raises(DataError, match=r"Case case0002: image .*case0002\.npy\.h5 holds 1 non-finite"):
        module.check_cases(splits=("test",))


def test_nan_in_a_label_is_named_as_such(tmp_path: Path) -> None:
    label = organ_label().astype(np.float32)
    label[0, 0, 0] = np.nan
    write_volume(tmp_path / "l.nii.gz", label, SPACING)
    with pytest.raises(DataError, match=r"l\.nii\.gz holds NaN or infinite values"):
        read_volume(tmp_path / "l.nii.gz", label=True)


def write_mismatched_spacing(root: Path, label_spacing: tuple[float, float, float]) -> None:
    write_dataset_json(root, {"background": 0, "organ": 1})
    label = organ_label()
    write_volume(root / "imagesTr" / "tilted_0000.nii.gz", (100 * label).astype(np.int16), SPACING)
    write_volume(root / "labelsTr" / "tilted.nii.gz", label, label_spacing)


def test_spacing_mismatch_names_case_and_both_spacings(tmp_path: Path) -> None:
    write_mismatched_spacing(tmp_path, (2.5, 0.8, 0.7))
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    expected = (
        r"Case tilted: image .* spacing \(2\.5, 0\.8, 0\.6\) mm but label .*tilted\.nii\.gz "
        r"has \(2\.5, 0\.8, 0\.7\)"
    )
    with pytest.raises(DataError, match=expected + r".*resample the label"):
        module.check_cases()
    (case,) = find_cases(tmp_path).cases
    with pytest.raises(DataError, match=expected):
        load_case(case, label_only=True)  # the header-only path checks too


def test_spacing_within_rounding_is_accepted(tmp_path: Path) -> None:
    write_mismatched_spacing(tmp_path, (2.5, 0.8, 0.6 * (1 + 2e-4)))
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    assert module.check_cases() == 1


def test_shape_mismatch_is_found_by_check_cases(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    write_volume(tmp_path / "imagesTr" / "crooked_0000.mha", np.zeros((4, 8, 8), np.int16), SPACING)
    write_volume(tmp_path / "labelsTr" / "crooked.mha", np.zeros((4, 8, 9), np.uint8), SPACING)
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match=r"Case crooked: .*\(4, 8, 8\).*\(4, 8, 9\)"):
        module.check_cases()


def test_origin_mismatch_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    label = organ_label()
    write_volume(tmp_path / "imagesTr" / "moved_0000.mha", (100 * label).astype(np.int16), SPACING)
    shifted = sitk.GetImageFromArray(label)
    shifted.SetSpacing(tuple(reversed(SPACING)))
    shifted.SetOrigin((0.0, 0.0, 10.0))  # (x, y, z): 4 slices higher, same grid
    (tmp_path / "labelsTr").mkdir()
    sitk.WriteImage(shifted, str(tmp_path / "labelsTr" / "moved.mha"))
    (case,) = find_cases(tmp_path).cases
    with caplog.at_level("WARNING", logger="vpt.data.medical.layouts"):
        load_case(case)
        load_case(case)
    warnings = [record.getMessage() for record in caplog.records if "origin" in record.getMessage()]
    assert len(warnings) == 1 and "Case moved" in warnings[0] and "(0.0, 0.0, 10.0)" in warnings[0]
    caplog.clear()
    write_case(tmp_path, "aligned", label)
    load_case(find_cases(tmp_path).cases[0])  # NIfTI image and label written alike: no warning
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def batch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "task.data.batch_size" in record.getMessage()]


def test_batch_larger_than_training_slices_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    write_case(tmp_path, "only", organ_label(depth=3))
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0, batch_size=5)
    with caplog.at_level("WARNING"):
        module.setup()
        module.train_dataloader()
        module.train_dataloader()
        again = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0, test_fraction=0, batch_size=5)
        again.check_cases()
        next(iter(again.train_dataloader()))
    (message,) = batch_warnings(caplog)
    assert "task.data.batch_size=5 is larger than the 3 training slices" in message
    assert "effective batch size" in message and "lower task.data.batch_size to 3 or less" in message


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batch_within_training_slices_does_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, batch_size: int
) -> None:
    write_dataset_json(tmp_path, {"background": 0, "organ": 1})
    write_case(tmp_path, "only", organ_label(depth=3))
    module = VolumeSegmentationDataModule(
        tmp_path, image_size=8, val_fraction=0, test_fraction=0, batch_size=batch_size
    )
    with caplog.at_level("WARNING"):
        next(iter(module.train_dataloader()))
    assert batch_warnings(caplog) == []


def test_segmentation_workers_default_to_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "available_cpus", lambda: 6)
    assert VolumeSegmentationDataModule(tmp_path, num_workers=None).num_workers == 5
    assert VolumeSegmentationDataModule(tmp_path, num_workers="auto").num_workers == 5
    assert VolumeSegmentationDataModule(tmp_path, num_workers=2).num_workers == 2
    with pytest.raises(ConfigError, match="task.data.num_workers"):
        VolumeSegmentationDataModule(tmp_path, num_workers=-1)
