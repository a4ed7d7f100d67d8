"""Trustworthy runs: exact resumption, no code from files, one clear line for bad input,
atomic writes, extending a run, Trainer conventions and a quiet console."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_training import FAST, compose_config, run_cli
from vpt.atomic import atomic_path
from vpt.cli.evaluate import evaluate
from vpt.cli.train import train, trainer_overrides
from vpt.errors import CheckpointError, ConfigError
from vpt.training import check_accelerator, load_checkpoint_file
from vpt.training.callbacks import register_callback

# Several optimiser steps per epoch, prompt dropout and random crops: every random stream
# that a resumed run has to reproduce is in use.
RESUMABLE = [
    "experiment=quickstart_classification",
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "task.data.samples_per_class=12",
    "task.data.batch_size=8",
    "method.dropout=0.1",
    "num_preview_images=0",
]


class Crash(RuntimeError):
    """Stands in for a crash (the process dying) in the middle of an epoch."""


class _StopAt(L.Callback):
    def __init__(self, step: int, interrupt: bool = False) -> None:
        self.step, self.interrupt = step, interrupt

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt if self.interrupt else Crash(f"crash at step {self.step}")


register_callback("stop_at", _StopAt)


def _folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run_dir, train(compose_config(RESUMABLE), run_dir=run_dir)


# ----------------------------------------------------------------------------------------------
# Resume


def test_last_checkpoint_is_the_last_epoch_not_the_best(uninterrupted) -> None:
    run_dir, metrics = uninterrupted
    last = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == metrics["steps"] == 12
    assert last["epoch"] == 2  # saved after the third (last) epoch, whatever val/acc did


def test_crash_and_resume_into_the_same_folder_gives_identical_results(uninterrupted, tmp_path: Path) -> None:
    reference_dir, reference = uninterrupted
    run_dir = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(compose_config([*RESUMABLE, "+callbacks.stop_at.step=6"]), run_dir=run_dir)  # mid epoch 2 of 3
    saved = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 4  # the end of epoch 1, not the crash point
    rows_before = _csv_rows(run_dir / "metrics.csv")

    resumed = train(compose_config([*RESUMABLE, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]), run_dir=run_dir)

    for key in ("test/acc", "test/loss", "best/val/acc", "steps", "epochs"):
        assert resumed[key] == reference[key], key
    assert resumed["resumed_from"]["step"] == 4
    rows = _csv_rows(run_dir / "metrics.csv")
    # The history up to the checkpoint is kept; the lost steps after it are not duplicated.
    kept = [r for r in rows_before if float(r["step"]) < 4]
    assert kept and [{k: r[k] for k in kept[0]} for r in rows[: len(kept)]] == kept
    # ... and the whole history reads as the uninterrupted run's: same rows, same values.
    reference_rows = _csv_rows(reference_dir / "metrics.csv")
    assert [{k: r.get(k, "") for k in reference_rows[0]} for r in rows] == reference_rows


def test_segmentation_crash_and_resume_gives_identical_volume_scores(tmp_path: Path) -> None:
    args = ["experiment=quickstart", "trainer.max_epochs=2", "trainer.deterministic=true",
            "trainer.enable_progress_bar=false", "method.dropout=0.1", "num_preview_images=0",
            f"task.data.root={tmp_path / 'phantoms'}"]
    reference = train(compose_config(args), run_dir=tmp_path / "reference")
    run_dir = tmp_path / "crashed"
    steps_per_epoch = reference["steps"] // 2
    with pytest.raises(Crash):
        train(compose_config([*args, f"+callbacks.stop_at.step={steps_per_epoch + 3}"]), run_dir=run_dir)
    resumed = train(compose_config([*args, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]), run_dir=run_dir)
    assert resumed["resumed_from"]["step"] == steps_per_epoch
    for key in ("test/dice", "test/hd95", "test/nsd", "test/per_organ", "best/val/dice", "steps"):
        assert json.dumps(resumed[key], sort_keys=True) == json.dumps(reference[key], sort_keys=True), key  # NaN-safe


def test_interrupt_saves_last_at_the_interrupted_step_and_resume_continues_there(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning ends the process after a graceful shutdown
            train(compose_config([*RESUMABLE, "+callbacks.stop_at.step=6", "+callbacks.stop_at.interrupt=true"]), run_dir=run_dir)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after one
    saved = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 6
    resumed = train(compose_config([*RESUMABLE, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]), run_dir=run_dir)
    assert resumed["steps"] == 12 and resumed["resumed_from"]["step"] == 6


def test_last_checkpoint_every_epoch_even_when_validation_is_sparse(tmp_path: Path) -> None:
    run_dir = tmp_path / "sparse"
    with pytest.raises(Crash):  # 4 steps per epoch; validation only after epochs 2, 4 ...
        train(compose_config([*RESUMABLE, "+trainer.check_val_every_n_epoch=2", "+callbacks.stop_at.step=5"]), run_dir=run_dir)
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_resuming_with_another_optimiser_is_refused(finished_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="optimizer.name=adamw"):
        train(compose_config([*RESUMABLE, "optimizer.name=sgd", f"ckpt_path={finished_checkpoint}"]), run_dir=tmp_path / "r")


def test_sweep_options_of_other_methods_do_not_block_resuming(tmp_path: Path) -> None:
    first = tmp_path / "lora"
    train(compose_config([*RESUMABLE, "trainer.max_epochs=1", "method=lora", "++method.num_tokens=10"]), run_dir=first)
    resumed = train(compose_config([*RESUMABLE, "trainer.max_epochs=2", "method=lora",
                                    f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]), run_dir=tmp_path / "more")
    assert resumed["steps"] == 8


def test_extending_a_run_rebuilds_the_schedule(tmp_path: Path) -> None:
    short = [*RESUMABLE, "trainer.max_epochs=2", "callbacks.lr_monitor.logging_interval=step"]
    first = tmp_path / "two"
    train(compose_config(short), run_dir=first)
    extended = train(
        compose_config([*short, "trainer.max_epochs=4", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]),
        run_dir=tmp_path / "four",
    )
    fresh = train(compose_config([*short, "trainer.max_epochs=4"]), run_dir=tmp_path / "fresh")
    assert extended["steps"] == fresh["steps"] == 16

    def learning_rates(folder: Path) -> dict[int, float]:
        rows = _csv_rows(folder / "metrics.csv")
        key = next(k for k in rows[0] if k.startswith("lr-"))
        return {int(r["step"]): float(r[key]) for r in rows if r[key]}

    resumed_lr, fresh_lr = learning_rates(tmp_path / "four"), learning_rates(tmp_path / "fresh")
    added = [step for step in resumed_lr if step >= 9]
    assert added, resumed_lr
    for step in added:
        assert resumed_lr[step] > 0  # the bug: the old schedule had ended, lr 0
        assert resumed_lr[step] == pytest.approx(fresh_lr[step], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad resume checkpoints: one sentence, nothing written


@pytest.fixture(scope="module")
def finished_checkpoint(uninterrupted) -> Path:
    return uninterrupted[0] / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        ("missing", [], "does not exist"),
        ("empty", [], "is empty"),
        ("truncated", [], "truncated or not a checkpoint"),
        ("other_method", ["method=linear"], "method"),
        ("other_tokens", ["method.num_tokens=4"], "num_tokens=8"),
        ("url", [], "is a URL"),
    ],
)
def test_bad_resume_checkpoints_are_refused_before_anything_is_written(
    case: str, overrides: list[str], message: str, finished_checkpoint: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"{case}.ckpt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        data = finished_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case in ("other_method", "other_tokens"):
        path = finished_checkpoint
    elif case == "url":
        path = "https://example.org/last.ckpt"  # type: ignore[assignment]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    before = _folder_digest(run_dir)
    with pytest.raises(CheckpointError, match=message) as error:
        train(compose_config([*RESUMABLE, *overrides, f"ckpt_path={path}"]), run_dir=run_dir)
    assert "\n" not in str(error.value)
    assert _folder_digest(run_dir) == before


def test_truncated_checkpoint_on_the_command_line_is_one_line_exit_2(finished_checkpoint: Path, tmp_path: Path) -> None:
    data = finished_checkpoint.read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 3])
    result = run_cli([*FAST, f"ckpt_path={broken}", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("vpt: error:")] == [
        line for line in result.stderr.splitlines() if "error" in line.lower()
    ]
    assert "truncated" in result.stderr


# ----------------------------------------------------------------------------------------------
# No code from files


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_resume_checkpoint_never_runs(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Payload(marker)}, crafted)
    # The escape hatch that turns torch.load's default into unpickling must not matter.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        train(compose_config([*FAST, f"ckpt_path={crafted}"]), run_dir=tmp_path / "run")
    assert not marker.exists()
    # The same file handed to the checkpoint I/O Lightning uses.
    from vpt.training import SafeCheckpointIO

    with pytest.raises(CheckpointError):
        SafeCheckpointIO().load_checkpoint(crafted)
    assert not marker.exists()


def _retarget_weights_file(source: Path, target: Path, data_config: dict[str, Any]) -> None:
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    config["task"]["data"] = data_config
    metadata["config"] = json.dumps(config)
    save_file(tensors, str(target), metadata=metadata)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_target_in_a_weights_file_never_runs(where: str, uninterrupted, tmp_path: Path) -> None:
    run_dir, _ = uninterrupted
    marker = tmp_path / "marker.log"
    payload = {"_target_": "logging.FileHandler", "filename": str(marker)}
    data = payload if where == "top" else {"_target_": "vpt.data.SyntheticShapesDataModule", "transform": payload}
    crafted = tmp_path / "crafted.safetensors"
    _retarget_weights_file(run_dir / "prompts.safetensors", crafted, data)
    with pytest.raises(ConfigError, match="_target_"):
        evaluate(weights=str(crafted), output=str(tmp_path / "ev"))
    assert not marker.exists()


def test_a_target_in_a_run_folder_config_never_runs(uninterrupted, tmp_path: Path) -> None:
    run_dir, _ = uninterrupted
    copied = tmp_path / "copied"
    copied.mkdir()
    marker = tmp_path / "marker.log"
    text = (run_dir / "config.yaml").read_text().replace(
        "_target_: vpt.data.SyntheticShapesDataModule", f"_target_: logging.FileHandler\n    filename: {marker}"
    )
    assert "logging.FileHandler" in text
    (copied / "config.yaml").write_text(text)
    (copied / "prompts.safetensors").write_bytes((run_dir / "prompts.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="not a vpt data module"):
        evaluate(run_dir=str(copied), output=str(tmp_path / "ev"))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Bad set-ups: one clear line, exit code 2, nothing changed


def test_refused_run_changes_nothing_in_a_finished_folder(uninterrupted) -> None:
    run_dir, _ = uninterrupted
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- the original record\n")
    before = _folder_digest(run_dir)
    result = run_cli([*FAST, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 2 and "already holds results" in result.stderr
    assert "Traceback" not in result.stderr
    assert _folder_digest(run_dir) == before


def test_an_unfinished_folder_is_not_trained_over_without_resuming(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(compose_config([*RESUMABLE, "+callbacks.stop_at.step=6"]), run_dir=run_dir)
    before = _folder_digest(run_dir)
    with pytest.raises(ConfigError, match="unfinished run; resume it with ckpt_path="):
        train(compose_config(RESUMABLE), run_dir=run_dir)
    assert _folder_digest(run_dir) == before


def test_gpu_trainer_without_a_gpu_is_one_sentence(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="trainer=cpu"):
        check_accelerator({"accelerator": "gpu"})
    result = run_cli([*FAST, "trainer=gpu", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_output_folder_that_cannot_be_created_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli([*FAST, f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "is a file, not a folder" in result.stderr


def test_read_only_output_folder_is_one_sentence(tmp_path: Path, as_unprivileged) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cfg = compose_config(FAST)

    def refused() -> None:
        with pytest.raises(ConfigError, match="read-only"):
            train(cfg, run_dir=locked / "run")
        assert list(locked.iterdir()) == []

    try:
        as_unprivileged(refused)
    finally:
        locked.chmod(stat.S_IRWXU)


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_run_files_share_the_folders_permissions(uninterrupted) -> None:
    run_dir, _ = uninterrupted
    modes = {name: stat.S_IMODE((run_dir / name).stat().st_mode) for name in
             ["prompts.safetensors", "metrics.json", "config.yaml", "checkpoints/last.ckpt", "curves.png"]}
    assert len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert modes["prompts.safetensors"] == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------
# Trainer conventions


def test_any_trainer_argument_works_without_a_plus() -> None:
    rewritten = trainer_overrides(["trainer.num_nodes=1", "trainer.fast_dev_run=true", "trainer.max_epochs=3",
                                   "trainer.not_an_argument=1", "model=vit_micro", "+method.num_tokens=4", "++method.rank=2"])
    assert rewritten == ["++trainer.num_nodes=1", "++trainer.fast_dev_run=true", "++trainer.max_epochs=3",
                         "trainer.not_an_argument=1", "model=vit_micro", "++method.num_tokens=4", "++method.rank=2"]
    cfg = compose_config([*FAST, *rewritten[:2]])
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.fast_dev_run is True


def test_unknown_logger_and_callback_names_are_refused() -> None:
    from vpt.training import build_callbacks, build_loggers

    with pytest.raises(ConfigError, match="Unknown logger"):
        build_loggers({"neptune_cloud": {}}, Path("unused"))
    with pytest.raises(ConfigError, match="Unknown callback"):
        build_callbacks({"os_system": {"command": "touch x"}})
    callbacks = build_callbacks({"early_stopping": {"monitor": "val/acc", "mode": "max", "patience": 2}, "lr_monitor": None})
    assert [type(c).__name__ for c in callbacks] == ["EarlyStopping"]


def test_cli_fast_dev_run_with_logger_and_callback_groups(tmp_path: Path) -> None:
    """``trainer.fast_dev_run`` without ``+``, the callbacks group, a quiet console, help."""
    run_dir = tmp_path / "r"
    result = run_cli([*FAST, "trainer.fast_dev_run=true", "trainer.num_nodes=1", "model=vit_micro",
                      "callbacks=[default,early_stopping]", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "💡" not in output and "litlogger" not in output
    assert output.count("random-init backbone") == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 1

    helped = run_cli(["--help"], cwd=tmp_path)
    assert helped.returncode == 0
    assert "visual prompt tuning" in helped.stdout and "experiment=quickstart" in helped.stdout
    assert "logger: csv, mlflow, tensorboard, wandb" in helped.stdout


def test_checkpoint_loader_refuses_a_non_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint_file(other)
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint_file(tmp_path)


# ----------------------------------------------------------------------------------------------
# Evaluation you can defend (classification side; segmentation: test_segmentation_metrics.py)


def test_a_class_without_test_images_is_null_not_zero() -> None:
    from vpt.metrics.classification import class_support, per_class_accuracy, per_class_report

    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 1]), 4).float()  # class 3 never appears
    labels = torch.tensor([0, 0, 1, 1])
    recall, support = per_class_accuracy(4), class_support(4)
    recall.update(logits, labels)
    support.update(logits, labels)
    report = per_class_report(recall.compute(), support.compute(), ["a", "b", "c", "d"])
    assert report == {"a": 0.5, "b": 1.0, "c": None, "d": None}


def test_metrics_json_says_how_each_metric_treats_empty_classes(uninterrupted) -> None:
    run_dir, _ = uninterrupted
    written = json.loads((run_dir / "metrics.json").read_text())
    assert set(written["test/metric_definitions"]) >= {"acc", "acc_macro", "acc_per_class"}
    assert "no test images" in written["test/metric_definitions"]["acc_per_class"]


def test_evaluation_data_with_other_class_names_warns(uninterrupted, tmp_path: Path, caplog) -> None:
    run_dir, _ = uninterrupted
    crafted = tmp_path / "renamed.safetensors"
    tensors = load_file(str(run_dir / "prompts.safetensors"))
    with safe_open(str(run_dir / "prompts.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata["class_names"] = json.dumps(["benign", "malignant", "normal", "other"])
    save_file(tensors, str(crafted), metadata=metadata)
    with caplog.at_level("WARNING", logger="vpt.evaluate"):
        evaluate(weights=str(crafted), output=str(tmp_path / "ev"))
    warned = [r.getMessage() for r in caplog.records if "differ from the classes" in r.getMessage()]
    assert len(warned) == 1 and "malignant" in warned[0] and "disk" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vpt.evaluate"):
        evaluate(run_dir=str(run_dir), output=str(tmp_path / "ev2"))
    assert not [r for r in caplog.records if "differ from the classes" in r.getMessage()]
