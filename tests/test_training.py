"""End to end: config composition, the CLI, the run folder, resume, evaluation, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import vpt
from vpt.cli.evaluate import evaluate
from vpt.cli.train import train
from vpt.errors import ConfigError, VptError

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(vpt.__file__).resolve().parent / "configs"
# Only against a hung process: a busy 2-core CI machine can be ten times slower than usual,
# so no test may depend on how fast a run finishes.
HANG_GUARD_S = 3600
# A small, fast version of the quickstart for tests.
FAST = [
    "experiment=quickstart_classification",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "task.data.samples_per_class=12",
    "task.data.batch_size=16",
    "num_preview_images=4",
]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_cli(args: list[str], cwd: Path, script: str = "scripts/train.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
        timeout=HANG_GUARD_S,
    )


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    OmegaConf.resolve(cfg)
    assert cfg.method.name and cfg.model.name and cfg.task.name and cfg.trainer.max_epochs > 0


@pytest.mark.parametrize("group", ["model", "method", "task", "trainer"])
def test_every_group_option_composes(group: str) -> None:
    for option in _options(group):
        cfg = compose_config([f"{group}={option}"])
        required = [key for key in ("task.data.root",) if f"vpt_required:{key}" in OmegaConf.to_yaml(cfg)]
        if required:
            # A key the user must give resolves only once given, and says so by name otherwise.
            with pytest.raises(Exception, match=f"{required[0]} must be given"):
                OmegaConf.resolve(cfg)
            cfg = compose_config([f"{group}={option}", *(f"{key}=/data/Dataset001_X" for key in required)])
        OmegaConf.resolve(cfg)
        assert cfg[group]


def test_configs_link_points_at_the_packaged_tree() -> None:
    assert (REPO / "configs" / "train.yaml").resolve() == (CONFIG_DIR / "train.yaml").resolve()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One short quickstart run through the real CLI, shared by the checks below."""
    workdir = tmp_path_factory.mktemp("cli")
    run_dir = workdir / "run"
    result = run_cli([*FAST, f"hydra.run.dir={run_dir}"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trainable parameters" in result.stdout and "method" in result.stdout
    return run_dir


def test_cli_run_writes_the_run_folder(finished_run: Path) -> None:
    for name in ["config.yaml", "checkpoints/last.ckpt", "prompts.safetensors", "metrics.csv",
                 "metrics.json", "curves.png", "test_predictions.png"]:
        assert (finished_run / name).is_file(), name
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert set(metrics["test/acc_per_class"]) == {"disk", "square", "triangle", "cross"}
    assert metrics["trainable_params"] < metrics["total_params"]
    assert OmegaConf.load(finished_run / "config.yaml").model.name == "vit_tiny_patch16_224"


def test_checkpoint_is_small_and_loads_with_weights_only(finished_run: Path) -> None:
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert "model.prompt_embeddings" in keys and "model.vit.head.weight" in keys
    assert not any(".blocks." in k for k in keys)  # the frozen backbone is not stored


def test_existing_results_are_not_overwritten(finished_run: Path) -> None:
    before = (finished_run / "metrics.json").read_bytes()
    result = run_cli([*FAST, f"hydra.run.dir={finished_run}"], cwd=finished_run.parent)
    assert result.returncode == 2
    assert "already holds results" in result.stderr and "Traceback" not in result.stderr
    assert (finished_run / "metrics.json").read_bytes() == before


def test_evaluate_reproduces_the_test_metrics(finished_run: Path) -> None:
    metrics = evaluate(run_dir=str(finished_run), split="test")
    trained = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    written = list((finished_run / "evaluation").glob("test-*/metrics.json"))
    assert len(written) == 1
    val = evaluate(run_dir=str(finished_run), split="val", output=str(finished_run / "eval_val"))
    assert "val/acc" in val
    with pytest.raises(ConfigError, match="already exists"):
        evaluate(run_dir=str(finished_run), split="val", output=str(finished_run / "eval_val"))


def test_evaluate_from_the_weights_file_alone(finished_run: Path, tmp_path: Path) -> None:
    metrics = evaluate(weights=str(finished_run / "prompts.safetensors"), output=str(tmp_path / "ev"))
    trained = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)


def test_evaluate_refuses_another_base_encoder(finished_run: Path, tmp_path: Path) -> None:
    """The run trained on the packaged micro ViT's weights; a random-init encoder is another base."""
    from vpt.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"from checkpoint vit_micro_shapes\.fp16\.safetensors .*from random init"):
        evaluate(run_dir=str(finished_run), output=str(tmp_path / "ev"), overrides=["model.checkpoint=null", "model.pretrained=false"])
    assert not (tmp_path / "ev").exists()


def test_resume_from_lightning_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    first = json.loads((finished_run / "metrics.json").read_text())
    cfg = compose_config([*FAST, "trainer.max_epochs=2", f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}"])
    metrics = train(cfg, run_dir=tmp_path / "resumed")
    assert metrics["steps"] == 2 * first["steps"]  # continued from epoch 1, not restarted
    assert metrics["epochs"] == 2


def test_resume_with_another_method_is_refused(finished_run: Path, tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "method=linear", "trainer.max_epochs=2",
                          f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}"])
    with pytest.raises(VptError):
        train(cfg, run_dir=tmp_path / "bad")


def test_offline_without_weights_is_one_clear_sentence(tmp_path: Path) -> None:
    result = run_cli(["model=vit_tiny", "task.data.samples_per_class=4", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.checkpoint" in result.stderr and "model.pretrained=false" in result.stderr


def test_missing_data_folder_is_one_clear_sentence(tmp_path: Path) -> None:
    result = run_cli(["model=vit_micro", "task=image_folder", f"task.data.root={tmp_path / 'nope'}",
                      f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and str(tmp_path / "nope") in result.stderr


def test_nan_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "optimizer.base_lr=1e38", "optimizer.name=sgd"])
    with pytest.raises(VptError, match="loss became"):
        train(cfg, run_dir=tmp_path / "nan")
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_resume_onto_another_base_encoder_is_refused(finished_run: Path, tmp_path: Path) -> None:
    """Lightning checkpoints hold the trained tensors only; they name the base weights' fingerprint,
    so resuming them on a random-init encoder (or another checkpoint file) stops before training,
    and the run folder resumed into keeps its record."""
    import shutil

    from vpt.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.json").unlink()  # as an interrupted run's folder, which is resumed into
    record = (run / ".hydra" / "overrides.yaml").read_text()
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert len(saved["vpt_base_encoder"]["fingerprint"]) == 64
    cfg = compose_config([*FAST, "trainer.max_epochs=2", "model.checkpoint=null", "model.pretrained=false", f"ckpt_path={last}"])
    with pytest.raises(CheckpointError, match=r"from checkpoint vit_micro_shapes\.fp16\.safetensors .*from random init"):
        train(cfg, run_dir=run)
    assert (run / ".hydra" / "overrides.yaml").read_text() == record
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == saved["global_step"]
