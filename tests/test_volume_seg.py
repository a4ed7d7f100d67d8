"""task=volume_seg: a researcher's own nnU-Net / MSD data set with no overrides but its root."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tests.test_training import compose_config, run_cli
from vpt.cli.evaluate import evaluate
from vpt.cli.train import train
from vpt.data.medical import VolumeSegmentationDataModule
from vpt.data.medical.io import write_volume
from vpt.data.medical.windowing import ABDOMEN_WINDOW
from vpt.errors import DataError

SHAPE, SPACING = (6, 32, 32), (3.0, 1.2, 1.2)
FAST = ["model=vit_micro", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "num_preview_images=0",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "optimizer.name=adamw", "optimizer.base_lr=0.5"]


def _case(seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like volume (arbitrary units) whose classes are bright concentric blobs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    centre = rng.uniform(10, 22, size=2)
    radius = np.hypot(y - centre[0], x - centre[1])
    label = np.zeros(SHAPE, dtype=np.uint8)
    for index in range(classes - 1, 0, -1):
        label[radius < 4 + 3 * (classes - 1 - index) + 3] = index
    image = 300.0 + 200.0 * label + rng.normal(0, 20, SHAPE)
    return image.astype(np.float32), label


def _write_oblique(path: Path, array: np.ndarray) -> None:
    """A NIfTI whose affine is rotated 20 degrees about z and shifted, as scanners write them."""
    import nibabel as nib

    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING[::-1])  # (x, y, z) axes
    affine[:3, 3] = (-120.0, 35.5, 80.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), str(path))


def write_dataset(root: Path, cases: int, names: dict, modality: str = "MRI", msd: bool = False,
                  test_cases: int = 0, binary_255: bool = False, oblique: bool = False) -> Path:
    classes = len(names)
    for index in range(cases + test_cases):
        image, label = _case(index, classes)
        if modality == "CT":
            image = image - 300.0  # HU-like: soft tissue around 0..400
        folder_images, folder_labels = ("imagesTs", "labelsTs") if index >= cases else ("imagesTr", "labelsTr")
        name = f"case_{index:03d}"
        image_name = f"{name}.nii.gz" if msd else f"{name}_0000.nii.gz"
        stored = (label * 255).astype(np.uint8) if binary_255 else label
        if oblique:
            _write_oblique(root / folder_images / image_name, image)
            _write_oblique(root / folder_labels / f"{name}.nii.gz", stored)
        else:
            write_volume(root / folder_images / image_name, image, SPACING)
            write_volume(root / folder_labels / f"{name}.nii.gz", stored, SPACING)
    if msd:
        meta = {"labels": {str(v): k for k, v in names.items()}, "modality": {"0": modality}}
    else:
        meta = {"labels": names, "channel_names": {"0": modality}, "file_ending": ".nii.gz", "numTraining": cases}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("modality, oblique", [("MRI", False), ("CT", True)])
def test_own_data_set_trains_with_its_own_class_names_and_nothing_else(tmp_path: Path, modality: str, oblique: bool) -> None:
    names = {"background": 0, "hippocampus_anterior": 1, "hippocampus_posterior": 2}
    root = write_dataset(tmp_path / "Dataset004_Hippocampus", cases=6, names=names, test_cases=2,
                         modality=modality, oblique=oblique)
    metrics = train(compose_config(["task=volume_seg", f"task.data.root={root}", *FAST]), run_dir=tmp_path / "run")
    assert set(metrics["test/per_organ"]) == {"hippocampus_anterior", "hippocampus_posterior"}
    assert set(metrics["test/cases"]) == {"case_006", "case_007"}  # imagesTs + labelsTs is the test split
    assert metrics["test/hd95_unit"] == "mm"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "window: auto" in config


def test_msd_form_and_modality_pick_the_intensity_rule(tmp_path: Path) -> None:
    names = {"background": 0, "tumour": 1}
    mr = write_dataset(tmp_path / "Task02_Heart", cases=3, names=names, modality="MRI", msd=True)
    ct = write_dataset(tmp_path / "Task09_Spleen", cases=3, names=names, modality="CT", msd=True)
    mr_module = VolumeSegmentationDataModule(mr, layout="nnunet", window="auto")
    ct_module = VolumeSegmentationDataModule(ct, layout="nnunet", window="auto")
    assert mr_module.class_names == ["background", "tumour"]
    assert mr_module.resolved_window() is None  # per-volume percentiles
    assert ct_module.resolved_window() == ABDOMEN_WINDOW
    assert VolumeSegmentationDataModule(ct, layout="nnunet", window=[-100, 100]).resolved_window() == (-100.0, 100.0)


def test_binary_masks_stored_as_0_255_are_read_as_0_1(tmp_path: Path, caplog) -> None:
    root = write_dataset(tmp_path / "Dataset010_Lesion", cases=4, names={"background": 0, "lesion": 1}, binary_255=True)
    module = VolumeSegmentationDataModule(root, layout="nnunet", window="auto", val_fraction=0.25, test_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(module.dataloader("test", volumes=True)))
    assert set(np.unique(batch["label"].numpy())) == {0, 1}
    assert "0/255" in caplog.text


def test_too_few_cases_fail_before_the_model_is_built(tmp_path: Path, monkeypatch) -> None:
    import vpt.models

    root = write_dataset(tmp_path / "Dataset011_Two", cases=2, names={"background": 0, "organ": 1})

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the data set was checked")

    monkeypatch.setattr(vpt.models, "build_segmenter", never)
    with pytest.raises(DataError, match="has 2 labelled training case"):
        train(compose_config(["task=volume_seg", f"task.data.root={root}", *FAST]), run_dir=tmp_path / "run")


def test_a_one_case_folder_can_be_scored_with_split_all(tmp_path: Path) -> None:
    names = {"background": 0, "organ": 1}
    root = write_dataset(tmp_path / "Dataset012_Train", cases=5, names=names)
    run_dir = tmp_path / "run"
    train(compose_config(["task=volume_seg", f"task.data.root={root}", "task.data.val_fraction=0.2",
                          "task.data.test_fraction=0.2", *FAST]), run_dir=run_dir)
    single = write_dataset(tmp_path / "Dataset013_One", cases=1, names=names)
    metrics = evaluate(run_dir=str(run_dir), split="all", output=str(tmp_path / "ev"), overrides=[f"task.data.root={single}"])
    assert list(metrics["all/cases"]) == ["case_000"]
    assert 0.0 <= metrics["all/dice"] <= 1.0


def test_volume_seg_without_a_root_is_one_sentence(tmp_path: Path) -> None:
    result = run_cli(["task=volume_seg", "model=vit_micro", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "task.data.root" in result.stderr
