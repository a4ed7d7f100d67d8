"""What a researcher reads: the console of a quickstart-size run (vpt's own lines once,
Lightning's boilerplate off, progress bars kept), ``train.log``, ``vpt-evaluate``'s per-organ
table, ``vpt-predict`` without the training set's lines, ``vpt-compare``'s rows, and the wall
time of a resumed run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.test_training import FAST, compose_config, run_cli
from vpt.cli.compare import compare_runs
from vpt.cli.train import train
from vpt.inference import load_run
from vpt.training import WallTime

# The README's quickstart, cut to two training batches of one epoch.
QUICKSTART = [
    "experiment=quickstart", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1", "num_preview_images=0",
]
# Lightning's lines (and a library file's path) that the console must not show.
BOILERPLATE = (
    "GPU available", "TPU available", "Total FLOPs", "site-packages", "LOCAL_RANK",
    "Loading `train_dataloader`", "`Trainer.fit` stopped", "was configured so", "Restoring states",
)
# vpt's set-up lines: said at most once each (the layout and split lines exactly once).
SETUP_LINES = (
    "labelled cases, 0 official test cases",
    "classes; cases: train",
    "is complete; not regenerating",
    "preprocessed cases are cached",
    "random-init backbone",
)


def _count(text: str, part: str) -> int:
    return sum(part in line for line in text.splitlines())


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict[str, Path | str]:
    """One quickstart-size run through the real CLI (progress bars on, as a user runs it)."""
    work = tmp_path_factory.mktemp("console")
    run_dir = work / "run"
    result = run_cli([*QUICKSTART, f"task.data.root={work / 'phantoms'}", f"hydra.run.dir={run_dir}"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": run_dir, "work": work, "console": result.stdout + result.stderr}


def test_the_console_shows_no_lightning_boilerplate(quickstart) -> None:
    console = quickstart["console"]
    for text in BOILERPLATE:
        assert text not in console, text
    assert "Epoch 0" in console  # the progress bar stays


def test_each_setup_line_is_said_once(quickstart) -> None:
    console = quickstart["console"]
    for text in SETUP_LINES:
        assert _count(console, text) <= 1, text
    assert _count(console, "labelled cases, 0 official test cases") == 1
    assert _count(console, "classes; cases: train") == 1
    assert _count(console, "random-init backbone") == 1  # a real warning is still said
    assert _count(console, "Trainable parameters") == 1 and _count(console, "Finished: ") == 1


def test_train_log_holds_the_final_metrics_and_the_organ_table(quickstart) -> None:
    log = (quickstart["run"] / "train.log").read_text()
    metrics = json.loads((quickstart["run"] / "metrics.json").read_text())
    assert "Finished: test/dice=" in log and "Trainable parameters" in log
    table = [line for line in log.splitlines() if line.strip() and line.split()[0] in metrics["test/per_organ"]]
    assert len(table) == len(metrics["test/per_organ"]) == 8
    assert "HD95 (mm)" in log


def test_metrics_record_the_model_config_and_the_options_used(quickstart) -> None:
    metrics = json.loads((quickstart["run"] / "metrics.json").read_text())
    assert metrics["model_config"] == "vit_micro"
    assert metrics["method_options"] == {"num_tokens": 8, "dropout": 0.0, "project_dim": None, "gate": True}
    assert len(metrics["wall_time_segments_s"]) == 1
    assert metrics["wall_time_s"] == pytest.approx(metrics["wall_time_segments_s"][0])


def test_evaluate_prints_the_organ_table_without_the_training_lines(quickstart) -> None:
    result = run_cli([f"run_dir={quickstart['run']}"], cwd=quickstart["work"], script="scripts/evaluate.py")
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    header = [line for line in result.stdout.splitlines() if line.startswith("organ") and "Dice" in line]
    assert len(header) == 1
    assert all(_count(result.stdout, organ) == 1 for organ in ("liver", "spleen", "aorta"))
    for text in (*BOILERPLATE, *SETUP_LINES):
        assert text not in console, text


def test_predict_does_not_repeat_the_training_sets_lines(quickstart, caplog) -> None:
    with caplog.at_level(logging.INFO):
        run = load_run(run_dir=quickstart["run"], device="cpu")
    said = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert run.class_names[0] == "background"
    for text in SETUP_LINES:
        assert not any(text in message for message in said), text
    assert any("Loaded" in message for message in said)  # predict's own line stays


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run in a config that still carries VPT's num_tokens (as a sweep over methods does)."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    cfg = compose_config([*FAST, "method=lora", "num_preview_images=0"])
    assert cfg.method.num_tokens == 8  # set by the experiment, ignored by LoRA
    train(cfg, run_dir=run_dir)
    return run_dir


def test_compare_shows_the_options_used_and_the_model_config_name(quickstart, lora_run, tmp_path) -> None:
    rows = {row["method"]: row for row in compare_runs([quickstart["run"], lora_run], output=tmp_path / "cmp")}
    assert "num_tokens" not in rows["lora"]["options"] and "rank=" in rows["lora"]["options"]
    assert rows["vpt_deep"]["options"] == "num_tokens=8 dropout=0.0 project_dim=null gate=true"
    assert rows["vpt_deep"]["backbone"] == "vit_micro"  # the model= config, not vit_tiny_patch16_224
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "vit_tiny_patch16_224" not in table.split("| lora |")[0].splitlines()[-1]


def test_a_resumed_runs_wall_time_is_the_sum_of_its_segments(lora_run, tmp_path) -> None:
    last = torch.load(lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    first_segment = WallTime.earlier_segments(last)
    assert len(first_segment) == 1 and first_segment[0] > 0
    # Two earlier segments, as after a crash and a first resume.
    last["callbacks"]["WallTime"]["segments_s"] = [100.0, 20.5]
    faked = tmp_path / "faked.ckpt"
    torch.save(last, faked)
    metrics = train(
        compose_config([*FAST, "method=lora", "num_preview_images=0", "trainer.max_epochs=2", f"ckpt_path={faked}"]),
        run_dir=tmp_path / "resumed",
    )
    segments = metrics["wall_time_segments_s"]
    assert segments[:2] == [100.0, 20.5] and len(segments) == 3 and segments[2] > 0
    assert metrics["wall_time_s"] == pytest.approx(sum(segments), abs=0.051)
    written = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert written["wall_time_segments_s"] == segments
