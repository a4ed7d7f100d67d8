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


def test_vit_segmentation_run_folder_and_dice(vit_run: Path) -> None:
    metrics = json.loads((vit_run / "metrics.json").read_text())
    assert metrics["test/dice"] > 0.1  # measured 0.10-0.45 depending on epochs; chance is ~0
    assert metrics["test/hd95_unit"] == "mm"  # the phantoms carry voxel spacing
    assert set(metrics["test/per_organ"]) == ORGANS
    for organ in metrics["test/per_organ"].values():
        assert {"dice", "hd95", "cases", "missed", "false_positive"} <= set(organ)
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
    cfg = compose_config([
        "model=sam_tiny", "task=organ_seg_synthetic", f"task.data.root={phantoms}", "method=vpt_deep",
        "method.num_tokens=4", "optimizer.name=adamw", "optimizer.base_lr=0.5", "trainer.max_epochs=8",
        "trainer.enable_progress_bar=false", "num_preview_images=2",
    ])
    metrics = train(cfg, run_dir=tmp_path / "sam")
    assert metrics["test/dice"] > 0.05  # measured 0.09 at 6 epochs, 0.37 at 20
    checkpoint = torch.load(tmp_path / "sam" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert "model.encoder.prompt_embeddings" in keys
    assert any(k.startswith("model.decoder.class_tokens") for k in keys)  # the decoder trains
    assert not any("image_encoder" in k for k in keys)  # the frozen encoder is not stored


def test_missing_synapse_folder_points_to_the_readme_and_the_phantoms(tmp_path: Path) -> None:
    cfg = compose_config(["model=vit_micro", "task=organ_seg", f"task.data.root={tmp_path / 'synapse'}"])
    with pytest.raises(DataError, match="data/README.md.*organ_seg_synthetic"):
        train(cfg, run_dir=tmp_path / "run")


def test_classification_refuses_a_sam_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timm ViT"):
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
