"""Checkpoint selection a researcher can trust: which weights a run tests
(``task.test_checkpoint``), the warning for a validation split too small to choose them, and
scoring any checkpoint of a run (``vpt-evaluate checkpoint=``)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.test_training import FAST, compose_config, run_cli
from tests.test_volume_seg import FAST as SEGMENTATION_FAST
from tests.test_volume_seg import write_dataset
from vpt.cli.evaluate import evaluate
from vpt.cli.train import train
from vpt.data.medical import VolumeSegmentationDataModule
from vpt.errors import CheckpointError
from vpt.tasks import build_task
from vpt.training import load_checkpoint_file, validation_problem
from vpt.training.selection import classification_validation_problem, segmentation_validation_problem

# Three epochs of two steps, validated only after the second: best.ckpt holds epoch 2's
# weights and last.ckpt epoch 3's, so "best" and "last" are different weights.
SPARSE_VALIDATION = [*FAST, "trainer.max_epochs=3", "+trainer.check_val_every_n_epoch=2", "num_preview_images=0"]
WARNING = "too small to choose the tested epoch"
ORGANS = {"background": 0, "organ": 1}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def _trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's prompts.safetensors, keyed as in its Lightning checkpoints."""
    return {f"model.{name}": tensor for name, tensor in load_file(str(run_dir / "prompts.safetensors")).items()}


def _test_loss_of(run_dir: Path, state: dict[str, torch.Tensor]) -> float:
    """Reference: cross-entropy over the run's test split of its network holding ``state``,
    loaded with plain ``load_state_dict`` and scored in a plain loop."""
    parts = build_task(OmegaConf.load(run_dir / "config.yaml"))
    result = parts.module.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    parts.module.eval()
    parts.datamodule.setup("test")
    logits, labels = [], []
    with torch.no_grad():
        for images, batch_labels in parts.datamodule.dataloader("test"):
            logits.append(parts.module(images))
            labels.append(batch_labels)
    return F.cross_entropy(torch.cat(logits), torch.cat(labels)).item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same short run twice: testing the best validation epoch, and the last epoch."""
    folder = tmp_path_factory.mktemp("selection")
    for choice in ("best", "last"):
        train(compose_config([*SPARSE_VALIDATION, f"task.test_checkpoint={choice}"]), run_dir=folder / choice)
    return {choice: folder / choice for choice in ("best", "last")}


# ----------------------------------------------------------------------------------------------
# task.test_checkpoint


def test_last_tests_the_weights_at_the_end_of_training(runs: dict[str, Path]) -> None:
    run_dir = runs["last"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tested_checkpoint"] == "last" and metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    last = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    best = load_checkpoint_file(run_dir / "checkpoints" / "best.ckpt")
    assert (best["epoch"], last["epoch"]) == (1, 2)  # validation ran after epoch 2 only
    assert not _same_tensors(best["state_dict"], last["state_dict"])
    assert _same_tensors(_trained_weights(run_dir), last["state_dict"])  # the saved weights are the tested ones
    assert metrics["test/loss"] == pytest.approx(_test_loss_of(run_dir, last["state_dict"]), rel=1e-5)
    assert metrics["test/loss"] != pytest.approx(_test_loss_of(run_dir, best["state_dict"]), rel=1e-5)


def test_best_still_tests_the_best_validation_epoch(runs: dict[str, Path]) -> None:
    run_dir = runs["best"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tested_checkpoint"] == "best" and metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    best = load_checkpoint_file(run_dir / "checkpoints" / "best.ckpt")
    last = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert _same_tensors(_trained_weights(run_dir), best["state_dict"])
    assert metrics["test/loss"] == pytest.approx(_test_loss_of(run_dir, best["state_dict"]), rel=1e-5)
    assert metrics["test/loss"] != pytest.approx(_test_loss_of(run_dir, last["state_dict"]), rel=1e-5)


def test_an_unknown_test_checkpoint_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    result = run_cli([*FAST, "task.test_checkpoint=final", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vpt: error: task.test_checkpoint=final")
    assert "task.test_checkpoint=best" in errors[0] and "task.test_checkpoint=last" in errors[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())


# ----------------------------------------------------------------------------------------------
# A validation split too small to choose the epoch


def test_a_one_case_validation_split_warns_once_before_training(tmp_path: Path, caplog) -> None:
    root = write_dataset(tmp_path / "Dataset020_One", cases=5, names=ORGANS)  # val_fraction 0.2: one case
    overrides = ["task=volume_seg", f"task.data.root={root}", "task.data.val_fraction=0.2", "task.data.test_fraction=0.2",
                 *SEGMENTATION_FAST]
    with caplog.at_level(logging.INFO):
        train(compose_config(overrides), run_dir=tmp_path / "best")
    messages = [record.getMessage() for record in caplog.records]
    warned = [index for index, message in enumerate(messages) if WARNING in message]
    assert len(warned) == 1, messages
    warning = messages[warned[0]]
    assert "single case" in warning and "task.test_checkpoint=last" in warning and "task.data.val_fraction" in warning
    # Before training: the optimiser (built when fit starts) is announced after it.
    started = next(index for index, message in enumerate(messages) if message.startswith("Learning rate"))
    assert warned[0] < started

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(compose_config([*overrides, "task.test_checkpoint=last"]), run_dir=tmp_path / "last")
    assert not [record for record in caplog.records if WARNING in record.getMessage()]


def test_a_healthy_validation_split_gives_no_warning(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "Dataset021_Two", cases=6, names=ORGANS)
    one = VolumeSegmentationDataModule(root, layout="nnunet", window="auto", val_fraction=0.2, test_fraction=0.2, cache=False)
    two = VolumeSegmentationDataModule(root, layout="nnunet", window="auto", val_fraction=0.34, test_fraction=0.17, cache=False)
    assert len(one.cases("val")) == 1 and "single case" in str(validation_problem(one))
    assert len(two.cases("val")) == 2 and two.class_voxel_counts("val")[1] >= 100
    assert validation_problem(two) is None
    shapes = build_task(compose_config(FAST)).datamodule  # two validation images of each class
    assert validation_problem(shapes) is None


def test_a_class_absent_from_validation_is_named(tmp_path: Path) -> None:
    # write_dataset's blobs for three classes draw class 1 over all of class 2: it is never labelled.
    names = {"background": 0, "organ_a": 1, "organ_b": 2}
    root = write_dataset(tmp_path / "Dataset022_Absent", cases=6, names=names)
    module = VolumeSegmentationDataModule(root, layout="nnunet", window="auto", val_fraction=0.34, test_fraction=0.17, cache=False)
    labels = [np.asarray(nibabel.load(str(case.label)).dataobj) for case in module.cases("val")]
    expected = np.bincount(np.concatenate([label.ravel() for label in labels]).astype(np.int64), minlength=3)
    assert list(module.class_voxel_counts("val")[1:]) == list(expected[1:]) and expected[2] == 0
    problem = validation_problem(module)
    assert problem is not None and "organ_b (0)" in problem and "organ_a" not in problem and "single case" not in problem


def test_scarce_classes_are_named_with_their_counts() -> None:
    names = ["background", "liver", "lesion", "vessel"]
    problem = segmentation_validation_problem(["a", "b"], np.array([10_000, 5_000, 12, 0]), names)
    assert problem is not None and "lesion (12)" in problem and "vessel (0)" in problem and "liver" not in problem
    assert segmentation_validation_problem(["a", "b"], np.array([10_000, 5_000, 100, 100]), names) is None
    assert segmentation_validation_problem([], np.zeros(4, dtype=np.int64), names) is None  # no validation: nothing to choose
    problem = classification_validation_problem(np.array([0, 0, 1, 1, 2]), ["cat", "dog", "fox", "owl"])
    assert problem is not None and "fox (1)" in problem and "owl (0)" in problem and "cat" not in problem
    assert classification_validation_problem(np.array([0, 0, 1, 1]), ["cat", "dog"]) is None


# ----------------------------------------------------------------------------------------------
# vpt-evaluate checkpoint=


def _test_scores(metrics: dict) -> tuple[float, float]:
    return metrics["test/acc"], metrics["test/loss"]


def test_evaluate_last_checkpoint_reproduces_the_test_of_a_last_run(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["last"]
    trained = json.loads((run_dir / "metrics.json").read_text())
    result = run_cli([f"run_dir={run_dir}", "checkpoint=last"], cwd=tmp_path, script="scripts/evaluate.py")
    assert result.returncode == 0, result.stderr[-3000:]
    written = list((run_dir / "evaluation").glob("test-last-*/metrics.json"))
    assert len(written) == 1
    evaluated = json.loads(written[0].read_text())
    assert _test_scores(evaluated) == pytest.approx(_test_scores(trained), abs=1e-6)
    assert evaluated["checkpoint"] == "last" and evaluated["checkpoint_epoch"] == 2
    assert json.loads((run_dir / "metrics.json").read_text()) == trained  # the run's own results untouched


def test_evaluate_a_checkpoint_path_reproduces_the_test_of_those_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["best"]
    trained = json.loads((run_dir / "metrics.json").read_text())
    path = str(run_dir / "checkpoints" / "best.ckpt")
    with_run = evaluate(run_dir=str(run_dir), checkpoint=path, output=str(tmp_path / "with_run"))
    alone = evaluate(checkpoint=path, output=str(tmp_path / "alone"))  # the checkpoint's own run config
    assert _test_scores(with_run) == pytest.approx(_test_scores(trained), abs=1e-6)
    assert _test_scores(alone) == pytest.approx(_test_scores(trained), abs=1e-6)
    # checkpoint=best of the run that tested its last epoch scores the best epoch instead.
    other = runs["last"]
    best_of_other = evaluate(run_dir=str(other), checkpoint="best", output=str(tmp_path / "best_of_last"))
    best_state = load_checkpoint_file(other / "checkpoints" / "best.ckpt")["state_dict"]
    assert best_of_other["test/loss"] == pytest.approx(_test_loss_of(other, best_state), rel=1e-5)


def test_a_garbage_checkpoint_is_one_line_exit_2_and_changes_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["last"]
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint " * 64)
    before = _digest(run_dir)
    result = run_cli([f"run_dir={run_dir}", f"checkpoint={garbage}"], cwd=tmp_path, script="scripts/evaluate.py")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vpt: error: Checkpoint") and "checkpoint=last" in errors[0]
    assert _digest(run_dir) == before


def test_a_checkpoint_of_another_model_is_one_sentence_and_changes_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["last"]
    checkpoint = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    state["model.prompt_embeddings"] = torch.cat([state["model.prompt_embeddings"]] * 2, dim=-2)  # twice the prompts
    state.pop(next(k for k in state if k.startswith("model.vit.head")))
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    before = _digest(run_dir)
    with pytest.raises(CheckpointError, match="does not fit") as error:
        evaluate(run_dir=str(run_dir), checkpoint=str(other))
    message = str(error.value)
    assert "\n" not in message and "lacks" in message and "other shapes" in message and "prompt_embeddings" in message
    assert _digest(run_dir) == before


def test_resuming_an_old_light_decoder_checkpoint_with_another_decoder_is_refused() -> None:
    """A checkpoint of a run from before task.decoder (config_version 1) trained the light
    decoder: resuming it into a multilevel run is one sentence, not a state-dict error."""
    from vpt.errors import CheckpointError
    from vpt.training import check_resume_fits

    old = {"method": {"name": "vpt_deep"}, "model": {"name": "vit_tiny_patch16_224", "img_size": 32},
           "task": {"name": "segmentation"}, "optimizer": {"name": "adamw"}}
    now = {**old, "config_version": 2, "task": {"name": "segmentation", "decoder": "multilevel"}}
    with pytest.raises(CheckpointError, match="task.decoder=light but this run has task.decoder=multilevel"):
        check_resume_fits({"hyper_parameters": old}, now, "old.ckpt")
    check_resume_fits({"hyper_parameters": old}, {**now, "task": {"name": "segmentation", "decoder": "light"}}, "old.ckpt")
