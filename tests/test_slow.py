"""Slow tests: multi-process DDP on the CPU, and real transfer with pretrained weights.

Run with `make test-slow` (pytest -m slow). The real-weights test needs VPT_TEST_WEIGHTS
pointing at a folder (or file) with DINOv2 ViT-S/14 weights in timm's layout
(`vit_small_patch14_dinov2*.safetensors`); without it, it is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import FAST, compose_config, run_cli
from vpt.cli.train import train

pytestmark = pytest.mark.slow


def _dinov2_weights() -> Path:
    location = os.environ.get("VPT_TEST_WEIGHTS")
    if not location:
        pytest.skip("VPT_TEST_WEIGHTS is not set (point it at a folder with vit_small_patch14_dinov2*.safetensors)")
    path = Path(location)
    if path.is_dir():
        found = sorted(path.glob("vit_small_patch14_dinov2*.safetensors"))
        if not found:
            pytest.skip(f"no vit_small_patch14_dinov2*.safetensors in {path}")
        path = found[0]
    if not path.is_file():
        pytest.skip(f"{path} does not exist")
    return path


def test_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    args = [*FAST, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 2/2" in output  # two processes joined the group
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["epochs"] == 2

    single = train(compose_config([*FAST, "trainer.max_epochs=2"]), run_dir=tmp_path / "single")
    # Each process sees half the training set per epoch: about half as many optimiser steps.
    assert metrics["steps"] < single["steps"]


def test_pretrained_dinov2_prompts_transfer_with_a_frozen_backbone(tmp_path: Path) -> None:
    weights = _dinov2_weights()
    common = [
        "model=vit_s_dinov2", "model.img_size=56", "task=shapes", "task.data.samples_per_class=100",
        "task.data.batch_size=16", "method=vpt_deep", "method.num_tokens=4", "method.dropout=0.0",
        "optimizer.name=adamw", "optimizer.base_lr=0.1", "trainer.max_epochs=5",
        "trainer.enable_progress_bar=false", "num_preview_images=0",
    ]
    pretrained = train(compose_config([*common, f"model.checkpoint={weights}"]), run_dir=tmp_path / "pretrained")
    random_init = train(compose_config([*common, "model.pretrained=false"]), run_dir=tmp_path / "random")

    # Only prompts (with their gates, method.gate) and head trained: nothing of the backbone.
    trained = load_file(str(tmp_path / "pretrained" / "prompts.safetensors"))
    assert set(trained) == {"prompt_embeddings", "prompt_gates", "vit.head.weight", "vit.head.bias"}
    assert pretrained["trainable_params"] < 0.01 * pretrained["total_params"]
    # 4 classes: chance is 0.25. Measured: 0.95 pretrained, 0.25 random init.
    assert pretrained["test/acc"] >= 0.7
    assert pretrained["test/acc"] >= random_init["test/acc"] + 0.3


def test_backbone_weights_file_is_untouched_and_reproducible(tmp_path: Path) -> None:
    weights = _dinov2_weights()
    from vpt.backbones import create_vit

    import hashlib

    digest, stat = hashlib.sha256(weights.read_bytes()).hexdigest(), weights.stat()
    before = load_file(str(weights))
    vit = create_vit("vit_small_patch14_dinov2", checkpoint=str(weights), img_size=56)
    state = {key: tensor.clone() for key, tensor in vit.state_dict().items()}
    # Everything except the resized position embedding is the file's tensor, upcast.
    for key, tensor in before.items():
        if key == "pos_embed":
            assert state[key].shape[1] == 1 + 4 * 4
        else:
            torch.testing.assert_close(state[key], tensor.float(), msg=key)
    # Training the loaded model changes the model, never the file.
    vit(torch.randn(2, 3, 56, 56)).sum().backward()
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.add_(1.0)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns and weights.stat().st_size == stat.st_size
    # Reproducible: a second load gives the same tensors as the first.
    again = create_vit("vit_small_patch14_dinov2", checkpoint=str(weights), img_size=56).state_dict()
    for key, tensor in state.items():
        assert torch.equal(again[key], tensor), key


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_metrics(tmp_path: Path) -> None:
    """A real ``kill -9`` in the middle of training, then ``ckpt_path=last.ckpt`` into the same
    folder: with ``trainer.deterministic=true`` the final metrics equal an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    from tests.test_training import REPO
    from vpt.training import load_checkpoint_file

    args = ["experiment=quickstart_classification", "trainer.max_epochs=8", "trainer.deterministic=true",
            "trainer.enable_progress_bar=false", "task.data.samples_per_class=60", "task.data.batch_size=16",
            "method.dropout=0.1", "num_preview_images=0"]
    reference = tmp_path / "reference"
    assert run_cli([*args, f"hydra.run.dir={reference}"], cwd=tmp_path).returncode == 0

    run_dir = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "scripts/train.py"), *args, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 1800  # hang guard only
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed; make it longer"
    killed_at = load_checkpoint_file(last)["global_step"]
    assert killed_at > 0

    resumed = run_cli([*args, f"ckpt_path={last}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((reference / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "test/acc_per_class", "best/val/acc", "steps", "epochs"):
        assert got[key] == expected[key], key
    assert got["resumed_from"]["step"] == killed_at


@pytest.mark.parametrize("method", ["linear", "vpt_deep", "lora"])
def test_dinov2_defaults_learn_with_every_method(method: str, tmp_path: Path) -> None:
    """The model family's default recipe (no optimizer overrides) trains each method on the
    real DINOv2 ViT-S/14; SGD at the ViT-21k rate used to diverge for a linear head."""
    weights = _dinov2_weights()
    cfg = compose_config([
        "model=vit_s_dinov2", f"model.checkpoint={weights}", "model.img_size=56", "task=shapes",
        "task.data.samples_per_class=100", "task.data.batch_size=16", f"method={method}",
        "trainer.max_epochs=5", "trainer.enable_progress_bar=false", "num_preview_images=0",
        *(["method.num_tokens=4"] if method == "vpt_deep" else []),
    ])
    assert cfg.optimizer.name == "adamw"
    metrics = train(cfg, run_dir=tmp_path / method)
    assert metrics["test/acc"] >= 0.7, metrics["test/acc"]  # 4 classes, chance 0.25
