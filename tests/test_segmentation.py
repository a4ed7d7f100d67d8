"""Organ segmentation end to end on generated CT phantoms, with a tiny SAM and a tiny ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.test_training import compose_config, run_cli
from vpt.cli.evaluate import evaluate
from vpt.cli.train import train
from vpt.errors import ConfigError, DataError
from vpt.tasks.segmentation import dice_loss

ORGANS = {"aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "phantoms"


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, phantoms: Path) -> Path:
    """The segmentation quickstart, shortened, through the real CLI."""
    workdir = tmp_path_factory.mktemp("seg_cli")
    run_dir = workdir / "run"
    result = run_cli(
        ["experiment=quickstart", "trainer.max_epochs=8", "trainer.enable_progress_bar=false",
         f"task.data.root={phantoms}", f"hydra.run.dir={run_dir}"],
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def untrained_test_dice(run_dir: Path, output: Path) -> float:
    """The run's model with its trained tensors at their initial values (built from the run's
    config, as training starts), scored by the same evaluation: the baseline learning must beat."""
    from omegaconf import OmegaConf

    from vpt.methods.trained_weights import read_trained_metadata, save_trained_weights
    from vpt.models.build import build_segmenter

    cfg = OmegaConf.load(run_dir / "config.yaml")
    metadata = read_trained_metadata(run_dir / "prompts.safetensors")
    torch.manual_seed(cfg.seed)
    model, _ = build_segmenter(cfg, metadata["num_classes"])
    save_trained_weights(model, output.parent / "untrained.safetensors", metadata)
    return evaluate(run_dir=str(run_dir), weights=str(output.parent / "untrained.safetensors"), output=str(output))["test/dice"]


def test_vit_segmentation_run_folder_and_dice(vit_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((vit_run / "metrics.json").read_text())
    # Learning: well above the same model before training, scored the same way.
    assert metrics["test/dice"] > untrained_test_dice(vit_run, tmp_path / "untrained") + 0.1
    assert metrics["test/hd95_unit"] == "mm"  # the phantoms carry voxel spacing
    assert set(metrics["test/per_organ"]) == ORGANS
    for organ in metrics["test/per_organ"].values():
        assert {"dice", "hd95", "hd95_penalised", "nsd", "cases", "missed", "false_positive"} <= set(organ)
    # The defensible scores beside MONAI's, and every metric's empty-case rule in the file itself.
    assert 0.0 <= metrics["test/nsd"] <= 1.0 and metrics["test/nsd_tolerance"] == 1.0
    assert metrics["test/hd95_penalised"] >= metrics["test/hd95"]
    definitions = metrics["test/metric_definitions"]
    assert set(definitions) == {"dice", "hd95", "hd95_penalised", "nsd"}
    assert all("missed" in text and "false" in text for text in definitions.values())
    assert len(metrics["test/cases"]) >= 2  # per-case tables, patient-level test split
    for name in ["test_overlays.png", "curves.png", "prompts.safetensors", "checkpoints/last.ckpt", "config.yaml"]:
        assert (vit_run / name).is_file(), name


def test_evaluate_a_segmentation_run_reproduces_its_volume_scores(vit_run: Path) -> None:
    trained = json.loads((vit_run / "metrics.json").read_text())
    evaluate(run_dir=str(vit_run), split="test", output=str(vit_run / "eval"))
    metrics = json.loads((vit_run / "eval" / "metrics.json").read_text())
    assert metrics["test/dice"] == pytest.approx(trained["test/dice"], abs=1e-6)
    assert metrics["test/per_organ"] == trained["test/per_organ"]


def test_tiny_sam_learns_organs_and_keeps_its_encoder(tmp_path: Path, phantoms: Path) -> None:
    result = run_cli([
        "model=sam_tiny", "task=organ_seg_synthetic", f"task.data.root={phantoms}", "method=vpt_deep",
        "method.num_tokens=4", "optimizer.name=adamw", "optimizer.base_lr=0.5", "trainer.max_epochs=8",
        "trainer.enable_progress_bar=false", "num_preview_images=2", f"hydra.run.dir={tmp_path / 'sam'}",
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "sam" / "metrics.json").read_text())
    assert metrics["test/dice"] > untrained_test_dice(tmp_path / "sam", tmp_path / "untrained") + 0.05
    checkpoint = torch.load(tmp_path / "sam" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert "model.encoder.prompt_embeddings" in keys
    assert any(k.startswith("model.decoder.class_tokens") for k in keys)  # the decoder trains
    assert not any("image_encoder" in k for k in keys)  # the frozen encoder is not stored


def _synapse_stand_in(root: Path, phantoms: Path) -> None:
    """A tiny Synapse folder in TransUNet's format, cut from phantoms (windowed to [0, 1])."""
    import h5py
    import numpy as np

    from vpt.data.medical import read_volume, window_ct, write_phantom_dataset

    write_phantom_dataset(phantoms, num_cases=12)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for index in range(6):
        image, _ = read_volume(phantoms / "imagesTr" / f"phantom_{index:03d}_0000.nii.gz")
        label, _ = read_volume(phantoms / "labelsTr" / f"phantom_{index:03d}.nii.gz", label=True)
        image = window_ct(image)
        if index < 4:
            for k in range(0, image.shape[0], 2):
                np.savez(root / "train_npz" / f"case{index:04d}_slice{k:03d}.npz", image=image[k], label=label[k])
        else:
            with h5py.File(root / "test_vol_h5" / f"case{index:04d}.npy.h5", "w") as handle:
                handle["image"], handle["label"] = image, label


def test_organ_seg_runs_on_synapse_layout_with_a_sam_checkpoint(tmp_path: Path, phantoms: Path) -> None:
    """`model=sam_* task=organ_seg` end to end, given prepared data and weights (tiny stand-ins)."""
    from vpt.backbones import build_sam

    _synapse_stand_in(tmp_path / "synapse", phantoms)
    torch.save(build_sam("sam_tiny", pretrained=False).state_dict(), tmp_path / "sam_tiny.pth")
    result = run_cli([
        "model=sam_tiny", "model.pretrained=true", f"model.checkpoint={tmp_path / 'sam_tiny.pth'}",
        "task=organ_seg", f"task.data.root={tmp_path / 'synapse'}", "task.data.num_workers=0",
        "method.num_tokens=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "num_preview_images=1", f"hydra.run.dir={tmp_path / 'run'}",
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/hd95_unit"] == "voxels"  # TransUNet's files keep no spacing
    assert set(metrics["test/cases"]) == {"case0004", "case0005"}  # the official test volumes
    assert set(metrics["test/per_organ"]) == ORGANS


def test_missing_synapse_folder_points_to_the_readme_and_the_phantoms(tmp_path: Path) -> None:
    cfg = compose_config(["model=vit_micro", "task=organ_seg", f"task.data.root={tmp_path / 'synapse'}"])
    with pytest.raises(DataError, match="data/README.md.*organ_seg_synthetic"):
        train(cfg, run_dir=tmp_path / "run")


def test_classification_refuses_a_sam_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sam model and cannot be used for classification; pick e.g. model=vit_b"):
        train(compose_config(["model=sam_tiny", "task=shapes"]), run_dir=tmp_path / "run")


def test_dice_loss_matches_a_plain_computation() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 6, 5), torch.randint(0, 4, (2, 6, 5))
    probs = logits.softmax(1)
    dices = []
    for c in range(1, 4):
        p, g = probs[:, c], (labels == c).float()
        dices.append((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    torch.testing.assert_close(dice_loss(logits, labels), 1 - torch.stack(dices).mean())
    perfect = F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(perfect, labels) < 1e-4
