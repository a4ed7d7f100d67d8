"""vpt-compare: one table and chart over finished runs, from fake run folders (no training)."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from PIL import Image

from vpt.cli.compare import _bar_labels, compare_runs, find_runs, main
from vpt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write_run(
    folder: Path,
    method: dict[str, Any],
    metrics: Optional[str | dict[str, Any]],
    task: str = "segmentation",
    backbone: str = "sam_tiny",
    extra_yaml: str = "",
) -> Path:
    """A run folder as vpt-train leaves it: config.yaml, and metrics.json once finished."""
    folder.mkdir(parents=True)
    method_yaml = "\n".join(f"  {key}: {json.dumps(value)}" for key, value in method.items())
    (folder / "config.yaml").write_text(
        f"seed: 0\nmodel:\n  name: {backbone}\n  family: sam\nmethod:\n{method_yaml}\n"
        f"task:\n  name: {task}\n  data:\n    _target_: vpt.data.SyntheticOrgansDataModule\n{extra_yaml}"
    )
    if metrics is not None:
        (folder / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics, indent=2))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    """Two runs of a multirun, one lone run (NaN hd95 written literally), one run without dice, one unfinished."""
    multirun = tmp_path / "multirun"
    _write_run(
        multirun / "0",
        {"name": "vpt_deep", "num_tokens": 10, "dropout": 0.1, "project_dim": None},
        {
            "test/dice": 0.8, "test/hd95": 5.0, "test/nsd": 0.71234567,
            "test/per_organ": {"liver": {"dice": 0.8}}, "test/hd95_unit": "mm",
            "best/val/dice": 0.82, "epochs": 3, "trainable_params": 1234, "total_params": 98765,
            "wall_time_s": 12.5, "peak_memory_mb": 512.25,
        },
    )
    # vpt writes NaN as null: that run's hd95 is undefined, not missing.
    _write_run(
        multirun / "1",
        {"name": "vpt_deep", "num_tokens": 50, "dropout": 0.0, "project_dim": None},
        {"test/dice": 0.9, "test/hd95": 3.5, "test/nsd": None, "best/val/dice": 0.91,
         "trainable_params": 5000, "total_params": 100000, "wall_time_s": 20.0, "peak_memory_mb": 640.0},
    )
    _write_run(multirun / "2", {"name": "vpt_shallow", "num_tokens": 5}, None)  # still training
    (multirun / "multirun.yaml").write_text("hydra: {}\n")
    # Neither Hydra's record nor an evaluation inside a run is a run of its own.
    (multirun / "0" / ".hydra").mkdir()
    (multirun / "0" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    _write_run(multirun / "0" / "evaluation" / "test-1", {"name": "vpt_deep"}, {"test/dice": 0.1})
    lone = _write_run(
        tmp_path / "single" / "linear_run",
        {"name": "linear"},
        '{"test/dice": 0.6, "test/hd95": NaN, "trainable_params": 100, "total_params": 100100, "wall_time_s": 3.0}',
    )
    full = _write_run(
        tmp_path / "other" / "full_run",
        {"name": "full"},
        {"test/hd95": 2.0, "trainable_params": 7, "total_params": 7, "wall_time_s": 40.0},
    )
    return {"multirun": multirun, "lone": lone, "full": full}


def _folders(runs: dict[str, Path]) -> list[Path]:
    return [runs["multirun"], runs["lone"], runs["full"].parent]


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _markdown_runs(path: Path) -> list[str]:
    """The ``run`` cell of each data row of a markdown table."""
    lines = path.read_text().splitlines()[2:]
    return [line.split("|")[1].strip() for line in lines]


def test_finds_finished_runs_at_any_depth(runs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vpt.compare"):
        found = find_runs(runs["multirun"])
    assert found == [runs["multirun"] / "0", runs["multirun"] / "1"]
    assert any("unfinished" in r.getMessage() and str(runs["multirun"] / "2") in r.getMessage() for r in caplog.records)
    assert find_runs(runs["lone"]) == [runs["lone"]]


def test_writes_exact_csv_markdown_and_chart(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = compare_runs(_folders(runs))
    out = runs["multirun"] / "comparison"
    assert _read_csv(out / "comparison.csv") == [
        ["run", "method", "backbone", "task", "options", "trainable_params", "total_params", "trainable_%",
         "test/dice", "test/hd95", "test/nsd", "best/val/dice", "wall_time_s", "peak_memory_mb"],
        ["multirun/1", "vpt_deep", "sam_tiny", "segmentation", "num_tokens=50 dropout=0.0 project_dim=null",
         "5000", "100000", "5.0", "0.9", "3.5", "nan", "0.91", "20.0", "640.0"],
        ["multirun/0", "vpt_deep", "sam_tiny", "segmentation", "num_tokens=10 dropout=0.1 project_dim=null",
         "1234", "98765", "1.249", "0.8", "5.0", "0.71234567", "0.82", "12.5", "512.25"],
        ["single/linear_run", "linear", "sam_tiny", "segmentation", "", "100", "100100", "0.1",
         "0.6", "nan", "", "", "3.0", ""],
        ["other/full_run", "full", "sam_tiny", "segmentation", "", "7", "7", "100.0", "", "2.0", "", "", "40.0", ""],
    ]
    assert [row["run"] for row in rows] == ["multirun/1", "multirun/0", "single/linear_run", "other/full_run"]
    assert rows[0]["trainable_%"] == 5.0 and rows[3]["test/dice"] is None

    markdown = (out / "comparison.md").read_text()
    assert markdown.splitlines()[0].startswith("| run | method | backbone | task | options |")
    assert _markdown_runs(out / "comparison.md") == ["multirun/1", "multirun/0", "single/linear_run", "other/full_run"]
    assert "| 0.7123 |" in markdown  # rounded to 4 decimals in the table, full precision in the CSV

    with Image.open(out / "comparison.png") as picture:
        picture.verify()
        assert picture.format == "PNG"
    assert not list(out.glob(".*tmp*")), "atomic writes leave no temporary files"

    printed = capsys.readouterr().out
    assert markdown in printed
    assert all(f"Wrote {out / name}" in printed for name in ("comparison.csv", "comparison.md", "comparison.png"))


def test_lower_is_better_metric_sorts_ascending(runs: dict[str, Path], tmp_path: Path) -> None:
    rows = compare_runs(_folders(runs), output=tmp_path / "by_hd95", metric="test/hd95")
    # Smallest distance first; the undefined (NaN) one last.
    expected = ["other/full_run", "multirun/1", "multirun/0", "single/linear_run"]
    assert [row["run"] for row in rows] == expected
    assert _markdown_runs(tmp_path / "by_hd95" / "comparison.md") == expected
    # A short name means the test metric of that name.
    rows = compare_runs(_folders(runs), output=tmp_path / "by_nsd", metric="nsd")
    assert [row["run"] for row in rows][:2] == ["multirun/0", "multirun/1"]


def test_unknown_metric_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass metric="):
        compare_runs(_folders(runs), output=tmp_path / "out", metric="test/iou")


def test_chart_labels_name_options_only_when_methods_repeat() -> None:
    rows = [
        {"run": "a", "method": "vpt_deep", "options": "num_tokens=10"},
        {"run": "b", "method": "vpt_deep", "options": "num_tokens=50"},
        {"run": "c", "method": "linear", "options": ""},
    ]
    assert _bar_labels(rows) == ["vpt_deep\nnum_tokens=10", "vpt_deep\nnum_tokens=50", "linear"]
    rows[1]["options"] = "num_tokens=10"
    assert _bar_labels(rows)[:2] == ["vpt_deep\nnum_tokens=10\na", "vpt_deep\nnum_tokens=10\nb"]


def test_existing_comparison_is_not_overwritten(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    compare_runs(_folders(runs), output=out)
    before = {name: (out / name).read_bytes() for name in ("comparison.csv", "comparison.md", "comparison.png")}
    with pytest.raises(ConfigError, match="already exists; pass another output="):
        compare_runs(_folders(runs), output=out)
    assert before == {name: (out / name).read_bytes() for name in before}


def test_folder_without_finished_runs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no finished run"):
        compare_runs([tmp_path / "empty"])
    _write_run(tmp_path / "training" / "0", {"name": "linear"}, None)
    with pytest.raises(ConfigError, match=str(tmp_path / "training")):
        compare_runs([tmp_path / "training"])
    with pytest.raises(ConfigError, match="does not exist"):
        compare_runs([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="Nothing to compare"):
        compare_runs([])


def test_config_is_read_never_instantiated(tmp_path: Path) -> None:
    marker = tmp_path / "marker.log"
    handler = f"    _target_: logging.FileHandler\n    filename: {marker}\n"
    _write_run(
        tmp_path / "runs" / "evil",
        {"name": "vpt_deep", "num_tokens": 4},
        {"test/acc": 0.5, "trainable_params": 1, "total_params": 4},
        task="classification",
        extra_yaml=f"callbacks:\n  log_file:\n{handler}logger:\n  _target_: logging.FileHandler\n  filename: {marker}\n",
    )
    rows = compare_runs([tmp_path / "runs"])
    assert not marker.exists()
    assert rows[0]["test/acc"] == 0.5 and rows[0]["trainable_%"] == 25.0 and rows[0]["run"] == "evil"


def test_main_takes_key_value_arguments(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"runs={runs['multirun']}", f"runs={runs['lone']}", f"output={tmp_path / 'cli'}"]) is None
    assert _markdown_runs(tmp_path / "cli" / "comparison.md") == ["multirun/1", "multirun/0", "single/linear_run"]
    assert (tmp_path / "cli" / "comparison.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "vpt-compare runs=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["colour=red"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("vpt: error: Unknown argument 'colour'")


def test_script_runs_in_a_subprocess(runs: dict[str, Path], tmp_path: Path) -> None:
    script = str(REPO / "scripts" / "compare.py")
    done = subprocess.run(
        [sys.executable, script, f"runs={runs['multirun']}", f"output={tmp_path / 'sub'}"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| run | method |" in done.stdout
    assert "| 1 | vpt_deep |" in done.stdout  # runs named relative to the multirun folder
    assert f"Wrote {tmp_path / 'sub' / 'comparison.png'}" in done.stdout

    missing = subprocess.run(
        [sys.executable, script, f"runs={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp_path, timeout=120,
    )
    assert missing.returncode == 2
    errors = [line for line in missing.stderr.splitlines() if line.startswith("vpt: error:")]
    assert len(errors) == 1 and "nowhere" in errors[0] and "pass runs=" in errors[0]
    assert "Traceback" not in missing.stderr
