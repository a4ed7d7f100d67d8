"""Recipe search on validation: the sweep experiment, and vpt-compare's selection by the
validation score (never the test score), from planted run folders and one tiny real sweep."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.test_training import CONFIG_DIR, FAST, compose_config, run_cli
from vpt.cli.compare import compare_runs, main
from vpt.errors import ConfigError
from vpt.recipe_selection import ValidationScore, best_by_validation, select_recipes

EXPERIMENT = CONFIG_DIR / "experiment" / "recipe_search.yaml"


# --- (a) the experiment --------------------------------------------------------------------


def _sweep_grids() -> tuple[Any, dict[str, list[float]]]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=recipe_search"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    grids = {key: [float(value) for value in str(params[key]).split(",")] for key in params}
    return cfg, grids


def test_experiment_sweeps_learning_rate_and_weight_decay() -> None:
    cfg, grids = _sweep_grids()
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(grids) == {"optimizer.base_lr", "optimizer.weight_decay"}
    assert len(set(grids["optimizer.base_lr"])) > 1 and len(set(grids["optimizer.weight_decay"])) > 1
    # The grid is centred on the recipe the experiment's own run would use.
    job = compose_config(["experiment=recipe_search"])
    OmegaConf.resolve(job)
    assert job.optimizer.base_lr in grids["optimizer.base_lr"]
    assert job.optimizer.weight_decay in grids["optimizer.weight_decay"]
    assert job.monitor == "val/acc" and job.monitor_mode == "max"


def test_command_line_grid_replaces_the_experiment_grid() -> None:
    """What the yaml comment promises: ``optimizer.base_lr=a,b`` replaces that grid, one value pins it."""
    _, grids = _sweep_grids()
    params = [f"optimizer.base_lr={','.join(map(str, grids['optimizer.base_lr']))}",
              f"optimizer.weight_decay={','.join(map(str, grids['optimizer.weight_decay']))}"]
    overrides = OverridesParser.create().parse_overrides([*params, "optimizer.base_lr=0.3,0.7", "optimizer.weight_decay=0"])
    jobs = BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]
    assert jobs == [["optimizer.base_lr=0.3", "optimizer.weight_decay=0"], ["optimizer.base_lr=0.7", "optimizer.weight_decay=0"]]


def test_comment_grids_are_centred_on_each_family_recipe() -> None:
    """Every per-family grid in the yaml comment spans x1/4..x4 around that model's base_lr."""
    text = EXPERIMENT.read_text()
    families = re.findall(r"model=(\w+).*?\n#\s+optimizer\.base_lr=([\d.,]+)", text)
    assert {model for model, _ in families} >= {"vit_b", "vit_b_dinov2", "sam_vit_b"}
    for model, grid in families:
        cfg = compose_config([f"model={model}"])
        base = float(cfg.optimizer.base_lr)
        values = [float(value) for value in grid.split(",")]
        assert values == pytest.approx([base * factor for factor in (0.25, 0.5, 1, 2, 4)]), model


# --- (b) selection on planted runs -----------------------------------------------------------


def _write_run(
    folder: Path,
    base_lr: float,
    weight_decay: float,
    metrics: dict[str, Any],
    method: str = "vpt_deep",
    monitor: str = "val/acc",
    monitor_mode: str = "max",
    num_tokens: int = 10,
    seed: int = 42,
) -> Path:
    """A finished run folder as vpt-train leaves it: resolved config.yaml and metrics.json."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "model": {"name": "vit_tiny_patch16_224", "family": "timm"},
        "method": {"name": method, "num_tokens": num_tokens},
        "task": {"name": "classification", "data": {"_target_": "vpt.data.SyntheticShapesDataModule"}},
        "optimizer": {"name": "adamw", "base_lr": base_lr, "weight_decay": weight_decay, "momentum": 0.9},
        "monitor": monitor,
        "monitor_mode": monitor_mode,
    }
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (folder / "metrics.json").write_text(json.dumps({"trainable_params": 10, "total_params": 1000, **metrics}, indent=2))
    return folder


@pytest.fixture
def search(tmp_path: Path) -> Path:
    """Three searches in one multirun folder, each with a planted best-test run that is not best on validation.

    * vpt_deep, val/acc (max): job 1 has the best test (0.9731) but job 2 the best validation;
      job 3 has an even better test (0.9917) and no validation score at all.
    * linear, val/loss (min): job 5 has the best test (0.8811), job 4 the smallest validation loss.
    * vpt_deep with 50 tokens: jobs 6 and 10 tie on validation; job 6 (the earlier) is selected
      although job 10 tests better and sorts first by name.
    """
    root = tmp_path / "multirun"
    _write_run(root / "0", 0.05, 1e-4, {"test/acc": 0.61, "best/val/acc": 0.70})
    _write_run(root / "1", 0.1, 1e-4, {"test/acc": 0.9731, "best/val/acc": 0.72})
    _write_run(root / "2", 0.2, 1e-4, {"test/acc": 0.8123, "best/val/acc": 0.88})
    _write_run(root / "3", 0.4, 1e-4, {"test/acc": 0.9917})  # never validated
    _write_run(root / "4", 0.05, 0.0, {"test/acc": 0.7702, "best/val/loss": 0.30}, method="linear", monitor="val/loss", monitor_mode="min")
    _write_run(root / "5", 0.2, 0.0, {"test/acc": 0.8811, "best/val/loss": 0.45}, method="linear", monitor="val/loss", monitor_mode="min")
    _write_run(root / "6", 0.1, 1e-2, {"test/acc": 0.5555, "best/val/acc": 0.66}, num_tokens=50)
    _write_run(root / "10", 0.2, 1e-2, {"test/acc": 0.6666, "best/val/acc": 0.66}, num_tokens=50)
    _write_run(root / "11", 0.4, 1e-2, {"test/acc": 0.7777, "best/val/acc": None}, num_tokens=50)  # NaN
    return root


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_selects_on_validation_not_on_test(search: Path) -> None:
    rows = compare_runs([search], metric="test/acc")
    out = search / "comparison"
    selected = {row["run"]: row["selected"] for row in rows}
    assert selected == {"0": False, "1": False, "2": True, "3": None, "4": True, "5": False,
                        "6": True, "10": False, "11": None}
    # The table is still ordered by the test metric, best test first: the pick is marked, not moved.
    assert [row["run"] for row in rows][:2] == ["3", "1"]
    table = _csv_rows(out / "comparison.csv")
    assert [row["selected"] for row in table][:2] == ["", "false"]
    assert {row["run"]: row["optimizer.base_lr"] for row in table if row["selected"] == "true"} == {"2": "0.2", "4": "0.05", "6": "0.1"}
    assert len({row["group"] for row in table}) == 3
    markdown = (out / "comparison.md").read_text()
    assert markdown.splitlines()[0].startswith("| run | selected | group | method |")
    assert "| 2 | ✓ |" in markdown and "| 3 | no val |" in markdown

    report = json.loads((out / "selection.json").read_text())
    by_method = {(g["method"], g["options"]): g for g in report["groups"]}
    deep, linear, deep50 = by_method[("vpt_deep", "num_tokens=10")], by_method[("linear", "num_tokens=10")], by_method[("vpt_deep", "num_tokens=50")]
    assert (deep["selected"], deep["validation"], deep["test"]) == ("2", 0.88, {"test/acc": 0.8123})
    assert deep["recipe"] == {"optimizer.base_lr": 0.2, "optimizer.weight_decay": 1e-4}
    assert (linear["selected"], linear["monitor_mode"], linear["test"]) == ("4", "min", {"test/acc": 0.7702})
    assert (deep50["selected"], deep50["test"]) == ("6", {"test/acc": 0.5555})
    assert [c["note"] for c in deep["candidates"]] == [None, None, None, "no best/val/acc in metrics.json (not validated)"]
    assert deep50["candidates"][-1]["note"] == "best/val/acc is NaN"
    assert report["searched_keys"] == ["optimizer.base_lr", "optimizer.weight_decay"]
    assert all("test" not in candidate for group in report["groups"] for candidate in group["candidates"])

    summary = (out / "selection.md").read_text()
    assert "0.8123" in summary and "0.7702" in summary and "0.5555" in summary
    # No test score of an unselected run is reported.
    for unselected in ("0.61", "0.9731", "0.9917", "0.8811", "0.6666", "0.7777"):
        assert unselected not in summary, unselected
    assert "| setting |" not in summary  # groups differ only in method, monitor: no extra column
    assert "- 3 (group 1): no best/val/acc in metrics.json" in summary and "- 11 (group 3): best/val/acc is NaN" in summary


def test_test_metrics_cannot_change_the_choice(search: Path, tmp_path: Path) -> None:
    """Shuffling every run's test score among the runs leaves the selection as it was."""
    first = {row["run"]: row["selected"] for row in compare_runs([search], output=tmp_path / "before")}
    shuffled = random.Random(0)
    paths = sorted(search.glob("*/metrics.json"))
    scores = [json.loads(path.read_text())["test/acc"] for path in paths]
    for attempt in range(3):
        shuffled.shuffle(scores)
        for path, score in zip(paths, scores):
            path.write_text(json.dumps({**json.loads(path.read_text()), "test/acc": score}))
        again = compare_runs([search], output=tmp_path / f"after{attempt}")
        assert {row["run"]: row["selected"] for row in again} == first


def test_best_by_validation_respects_the_mode_and_ties() -> None:
    values: list[Optional[float]] = [0.3, None, 0.9, math.nan, 0.9, 0.1]
    assert best_by_validation(values, "max") == 2  # the first of the tied 0.9s
    assert best_by_validation(values, "min") == 5
    assert best_by_validation([None, math.nan], "max") is None
    assert best_by_validation([], "min") is None
    # Against a plain reference over random values: the first position of the extreme.
    generator = random.Random(1)
    for _ in range(50):
        drawn = [generator.choice([0.1, 0.2, 0.3]) for _ in range(6)]
        assert best_by_validation(drawn, "max") == drawn.index(max(drawn))
        assert best_by_validation(drawn, "min") == drawn.index(min(drawn))


def test_select_recipes_groups_by_everything_but_the_searched_keys() -> None:
    def config(lr: float, seed: int) -> dict[str, Any]:
        return {"seed": seed, "optimizer": {"base_lr": lr, "weight_decay": 0.0}, "monitor": "val/acc", "monitor_mode": "max"}

    configs = [config(0.1, 0), config(0.2, 0), config(0.1, 1), config(0.2, 1)]
    scores = [ValidationScore("val/acc", "max", value) for value in (0.5, 0.6, 0.8, 0.7)]
    groups = select_recipes(configs, scores)
    assert [[c.index for c in g.candidates] for g in groups] == [[0, 1], [2, 3]]
    assert [g.selected for g in groups] == [1, 2]
    assert all(g.is_search for g in groups)
    # Searching the seed as well puts all four runs in one group.
    (group,) = select_recipes(configs, scores, ("optimizer.base_lr", "seed"))
    assert group.selected == 2


def test_groups_that_differ_elsewhere_name_the_difference(tmp_path: Path) -> None:
    for job, (lr, seed, val) in enumerate([(0.1, 1, 0.5), (0.2, 1, 0.6), (0.1, 2, 0.7), (0.2, 2, 0.4)]):
        _write_run(tmp_path / "seeds" / str(job), lr, 0.0, {"test/acc": 0.5, "best/val/acc": val}, seed=seed)
    compare_runs([tmp_path / "seeds"])
    summary = (tmp_path / "seeds" / "comparison" / "selection.md").read_text()
    assert "| setting |" in summary and "| seed=1 |" in summary and "| seed=2 |" in summary
    report = json.loads((tmp_path / "seeds" / "comparison" / "selection.json").read_text())
    assert [(g["setting"], g["selected"]) for g in report["groups"]] == [({"seed": 1}, "1"), ({"seed": 2}, "2")]


def test_no_selection_without_a_search_unless_asked(search: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    _write_run(lone / "a", 0.1, 1e-4, {"test/acc": 0.5, "best/val/acc": 0.6})
    _write_run(lone / "b", 0.1, 1e-4, {"test/acc": 0.7, "best/val/acc": 0.4}, method="linear")
    rows = compare_runs([lone])
    assert "selected" not in rows[0] and not (lone / "comparison" / "selection.json").exists()
    rows = compare_runs([lone], output=tmp_path / "forced", select="val")
    assert {row["run"]: row["selected"] for row in rows} == {"a": True, "b": True}
    assert (tmp_path / "forced" / "selection.md").is_file()
    rows = compare_runs([search], output=tmp_path / "off", select="none")
    assert "selected" not in rows[0] and not (tmp_path / "off" / "selection.json").exists()


def test_bad_selection_arguments_are_one_sentence(search: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="pass select=auto"):
        compare_runs([search], output=tmp_path / "a", select="test")
    with pytest.raises(ConfigError, match="No run's config.yaml has 'optimizer.lr'"):
        compare_runs([search], output=tmp_path / "b", search="optimizer.lr")
    with pytest.raises(SystemExit) as exit_info:
        main([f"runs={search}", f"output={tmp_path / 'c'}", "select=best"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("vpt: error: select=best is not a selection mode")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert "select=auto|val|none" in capsys.readouterr().out
    # A search over the prompt length as well: the two vpt_deep groups become one.
    main([f"runs={search}", f"output={tmp_path / 'd'}", "search=optimizer.base_lr,optimizer.weight_decay,method.num_tokens"])
    report = json.loads((tmp_path / "d" / "selection.json").read_text())
    assert sorted(g["selected"] for g in report["groups"]) == ["2", "4"]


# --- (c) a tiny real sweep, then the selection --------------------------------------------------


def test_recipe_search_end_to_end(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["experiment=recipe_search", *FAST[1:], "optimizer.base_lr=0.02,0.5", "optimizer.weight_decay=1e-4",
            f"hydra.sweep.dir={sweep}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(path.parent for path in sweep.glob("*/metrics.json"))
    assert [run.name for run in runs] == ["0", "1"]
    configs = [OmegaConf.load(run / "config.yaml") for run in runs]
    assert [c.optimizer.base_lr for c in configs] == [0.02, 0.5]

    done = run_cli([f"runs={sweep}"], cwd=tmp_path, script="scripts/compare.py")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((sweep / "comparison" / "selection.json").read_text())
    (group,) = report["groups"]  # the two runs differ only in the searched keys
    validation = {c["run"]: c["validation"] for c in group["candidates"]}
    best = max(validation.values())
    assert group["selected"] == next(run for run, value in validation.items() if value == best)
    chosen = json.loads((sweep / group["selected"] / "metrics.json").read_text())
    assert group["validation"] == pytest.approx(chosen["best/val/acc"])
    assert group["test"]["test/acc"] == pytest.approx(chosen["test/acc"])
    assert "Recipe selection on validation" in done.stdout
