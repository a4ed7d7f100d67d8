"""Compare finished runs side by side: one table row and one bar per run.

    vpt-compare runs=multirun/2026-11-22/10-00-00 [runs=outputs/... ...] [output=<folder>] [metric=test/dice]

Arguments are ``key=value`` pairs. ``runs`` (repeatable) is a finished run folder (it holds
``metrics.json`` and ``config.yaml``) or any folder with run folders below it, such as a
Hydra multirun folder; unfinished runs are skipped. ``metric`` picks the headline metric
that orders the table and fills the chart (default ``test/dice`` if a run has it, else
``test/acc``); ``hd95`` and ``loss`` metrics are ordered smallest first. The results go to
``output`` (default ``<first runs folder>/comparison``) as ``comparison.csv``,
``comparison.md`` and ``comparison.png``, never over existing files. Run configs are only
read, nothing in them is instantiated.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vpt.atomic import atomic_write_text
from vpt.cli.arguments import key_value_arguments
from vpt.cli.errors import exit_on_user_error
from vpt.errors import ConfigError
from vpt.runs import check_folder_writable, save_figure

__all__ = ["compare_runs", "find_runs", "lower_is_better", "main", "OUTPUT_FILES"]

_logger = logging.getLogger("vpt.compare")

#: The files one comparison writes into its output folder.
OUTPUT_FILES = ("comparison.csv", "comparison.md", "comparison.png")
_OWN_KEYS = ("runs", "output", "metric")
# What marks a folder as a run at all (finished or not); such a folder is never searched
# further, so an evaluation folder inside a run (which also holds metrics.json and
# config.yaml) is not counted as a run of its own.
_RUN_MARKERS = ("metrics.json", "config.yaml", "metrics.csv", ".hydra")
_LEADING_COLUMNS = ("run", "method", "backbone", "task", "options", "trainable_params", "total_params", "trainable_%")
_TRAILING_COLUMNS = ("wall_time_s", "peak_memory_mb")


def _is_finished_run(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() and (folder / "config.yaml").is_file()


def find_runs(folder: str | Path) -> list[Path]:
    """The finished run folders at or below ``folder``, in path order.

    Args:
        folder: One run folder, or any folder with run folders at any depth below it.

    Returns:
        Every folder holding both ``metrics.json`` and ``config.yaml``. Unfinished runs are
        logged and left out; hidden folders (``.hydra``) are not searched.

    Raises:
        ConfigError: ``folder`` does not exist, is not a folder, or holds no finished run.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"{root} {what}; pass runs=<a run folder or a folder of runs, such as multirun/DATE/TIME>.")
    found: list[Path] = []
    for current, subfolders, files in os.walk(root):
        here = Path(current)
        present = set(files) | set(subfolders)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        if not present.intersection(_RUN_MARKERS):
            continue
        subfolders[:] = []
        if _is_finished_run(here):
            found.append(here)
        else:
            _logger.info("Skipping %s: an unfinished run (no %s).", here, "metrics.json" if "config.yaml" in present else "metrics.json and config.yaml")
    if not found:
        raise ConfigError(f"{root} holds no finished run (a folder with metrics.json and config.yaml); pass runs=<a folder of finished runs>.")
    return sorted(found)


def _read_metrics(path: Path) -> Optional[dict[str, Any]]:
    """``metrics.json`` as a dict; ``None`` (with a warning) when it cannot be read."""
    try:
        # Python's json reads the NaN that some writers emit; vpt writes NaN as null.
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        _logger.warning("Skipping %s: cannot read it (%s).", path.parent, error)
        return None
    if not isinstance(metrics, dict):
        _logger.warning("Skipping %s: metrics.json holds no key/value table.", path.parent)
        return None
    return metrics


def _read_config(path: Path) -> Optional[dict[str, Any]]:
    """``config.yaml`` as plain containers, read without resolving or instantiating anything."""
    try:
        # resolve=False: a resolver (${oc.env:...}, a registered one) is code the run
        # folder would choose; the saved config is already resolved by vpt-train.
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, UnicodeDecodeError, ValueError, OmegaConfBaseException) as error:
        _logger.warning("Skipping %s: cannot read config.yaml (%s).", path.parent, error)
        return None
    if not isinstance(config, dict):
        _logger.warning("Skipping %s: config.yaml holds no key/value table.", path.parent)
        return None
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_value(value: Any) -> Optional[float | int]:
    """A metric as a number: null stands for NaN (vpt writes NaN as null); other kinds are not metrics."""
    if value is None:
        return math.nan
    return value if _is_number(value) else None


def _option_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=False)
    return str(value)


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def _is_metric_key(key: str, value: Any) -> bool:
    return key.startswith(("test/", "best/")) and (value is None or _is_number(value))


def _describe(run: Path, parent: Path, metrics: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """One run's row, without the metric columns that other runs may add."""
    method = _section(config, "method")
    trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
    share = round(100.0 * trainable / total, 3) if _is_number(trainable) and _is_number(total) and total else None
    row: dict[str, Any] = {
        "run": run.relative_to(parent).as_posix(),
        "method": method.get("name"),
        "backbone": _section(config, "model").get("name"),
        "task": _section(config, "task").get("name"),
        "options": " ".join(f"{key}={_option_text(value)}" for key, value in method.items() if key != "name"),
        "trainable_params": trainable if _is_number(trainable) else None,
        "total_params": total if _is_number(total) else None,
        "trainable_%": share,
    }
    for key, value in metrics.items():
        if _is_metric_key(key, value):
            row[key] = _metric_value(value)
    for key in _TRAILING_COLUMNS:
        row[key] = metrics[key] if _is_number(metrics.get(key)) else None
    return row


def _headline(metric: Optional[str], available: Sequence[str], all_metrics: Sequence[dict[str, Any]]) -> str:
    """The metric that orders the table and fills the chart."""
    if metric:
        if any(_is_number(m.get(metric)) or (metric in m and m[metric] is None) for m in all_metrics):
            return metric
        # "dice" is short for the test score of that name.
        if "/" not in metric and f"test/{metric}" in available:
            return f"test/{metric}"
        numeric = sorted({k for m in all_metrics for k, v in m.items() if _is_number(v)})
        raise ConfigError(f"No run has the metric {metric!r}; pass metric= one of {numeric}.")
    for candidate in ("test/dice", "test/acc"):
        if candidate in available:
            return candidate
    tests = [key for key in available if key.startswith("test/")]
    if not tests:
        raise ConfigError("The runs hold no test metrics to compare; pass metric=<a numeric key of their metrics.json>.")
    return tests[0]


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (distances such as ``hd95``, losses).

    Args:
        metric: A metrics.json key such as ``test/hd95_penalised``.

    Returns:
        True for ``hd95*`` and ``*loss*`` metrics.
    """
    name = metric.rsplit("/", 1)[-1]
    return name.startswith("hd95") or "loss" in name


def _order(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by ``metric``; runs without a value (missing or NaN) last, in path order."""
    sign = 1.0 if lower_is_better(metric) else -1.0

    def key(row: dict[str, Any]) -> tuple[int, float, str]:
        value = row.get(metric)
        if not _is_number(value) or math.isnan(value):
            return (1, 0.0, row["run"])
        return (0, sign * value, row["run"])

    return sorted(rows, key=key)


def _cell(value: Any) -> str:
    """A CSV cell: full precision, empty when missing."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return repr(round(value, 4))
    return _cell(value).replace("|", "\\|")


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def _markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _bar_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``method``, with its options where two runs share a method, and the run where even that is shared."""
    methods = [str(row["method"]) for row in rows]
    # One option per line keeps neighbouring labels apart.
    labels = [
        "\n".join([m, *str(row["options"]).split()]) if methods.count(m) > 1 and row["options"] else m
        for m, row in zip(methods, rows)
    ]
    return [f"{label}\n{row['run']}" if labels.count(label) > 1 else label for label, row in zip(labels, rows)]


def _plot(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """A bar per run with a value of ``metric``, its trainable share written above the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charted = [row for row in rows if _is_number(row.get(metric)) and math.isfinite(row[metric])]
    labels = _bar_labels(charted)
    values = [float(row[metric]) for row in charted]
    tasks = sorted({str(row["task"]) for row in rows if row.get("task")})
    fig, axis = plt.subplots(figsize=(max(4.0, 1.6 * len(charted) + 1.5), 4.5))
    bars = axis.bar(range(len(charted)), values, color="tab:blue")
    for bar, row in zip(bars, charted):
        share = row.get("trainable_%")
        text = f"{share:g}% trainable" if _is_number(share) else "trainable ?"
        axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                      textcoords="offset points", ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(charted)), labels, fontsize=7, rotation=20 if len(charted) > 4 else 0)
    axis.set_ylabel(metric)
    direction = "lower is better" if lower_is_better(metric) else "higher is better"
    axis.set_title(f"{metric} on {', '.join(tasks) or 'unknown task'} ({direction})", fontsize=10)
    axis.margins(y=0.15)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def compare_runs(
    folders: Sequence[str | Path],
    output: str | Path | None = None,
    metric: str | None = None,
) -> list[dict[str, Any]]:
    """Tabulate and chart every finished run found in ``folders``.

    Args:
        folders: Run folders or folders of runs (a Hydra multirun folder), searched at any depth.
        output: The folder for ``comparison.{csv,md,png}``; ``<folders[0]>/comparison`` by default.
        metric: The headline metric (a metrics.json key, or a test metric's short name such as
            ``dice``); ``test/dice`` if some run has it, else ``test/acc``.

    Returns:
        One row per run, best first by the headline metric: ``run`` (relative to the runs'
        common parent), ``method``, ``backbone``, ``task``, ``options``, parameter counts,
        ``trainable_%``, every numeric ``test/`` and ``best/`` metric some run has (NaN where
        the run wrote null), ``wall_time_s`` and ``peak_memory_mb`` (``None`` where missing).

    Raises:
        ConfigError: no folders, a folder that is missing or holds no finished run, an
            unknown ``metric``, or an output folder that already holds a comparison.
    """
    if not folders:
        raise ConfigError("Nothing to compare; pass runs=<a run folder or a folder of runs>.")
    out_dir = Path(output) if output is not None else Path(folders[0]) / "comparison"
    targets = [out_dir / name for name in OUTPUT_FILES]
    existing = [target for target in targets if target.exists()]
    if existing:
        raise ConfigError(f"{existing[0]} already exists; pass another output=<folder>.")
    check_folder_writable(out_dir, "output=<folder>")

    runs: list[Path] = []
    seen: set[Path] = set()
    for folder in folders:
        for run in find_runs(folder):
            # The same run reached through two runs= folders is one row.
            if run.resolve() not in seen:
                seen.add(run.resolve())
                runs.append(run)
    loaded = []
    for run in runs:
        metrics, config = _read_metrics(run / "metrics.json"), _read_config(run / "config.yaml")
        if metrics is not None and config is not None:
            loaded.append((run, metrics, config))
    if not loaded:
        raise ConfigError(f"No run in {', '.join(map(str, folders))} could be read; see the warnings above and fix or remove those folders.")

    absolute = [run.resolve() for run, _, _ in loaded]
    parent = Path(os.path.commonpath([run.parent for run in absolute]))
    rows = [_describe(path, parent, metrics, config) for path, (_, metrics, config) in zip(absolute, loaded)]
    metric_columns = list(dict.fromkeys(key for row in rows for key in row if key.startswith("test/")))
    metric_columns += list(dict.fromkeys(key for row in rows for key in row if key.startswith("best/")))
    headline = _headline(metric, metric_columns, [metrics for _, metrics, _ in loaded])
    if headline not in metric_columns and headline not in _LEADING_COLUMNS + _TRAILING_COLUMNS:
        metric_columns.append(headline)
        for row, (_, metrics, _) in zip(rows, loaded):
            row[headline] = _metric_value(metrics[headline]) if headline in metrics else None
    columns = list(_LEADING_COLUMNS) + metric_columns + list(_TRAILING_COLUMNS)
    rows = [{column: row.get(column) for column in columns} for row in _order(rows, headline)]

    table = _markdown_table(rows, columns)
    csv_path, markdown_path, png_path = targets
    atomic_write_text(csv_path, _csv_text(rows, columns))
    atomic_write_text(markdown_path, table)
    _plot(rows, headline, png_path)
    order = "smallest" if lower_is_better(headline) else "largest"
    print(f"{len(rows)} runs by {headline} ({order} first):\n\n{table}")
    for path in targets:
        print(f"Wrote {path}")
    return rows


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``vpt-compare runs=<folder> [runs=...] [output=...] [metric=...]``).

    Returns nothing: a console script's ``sys.exit(main())`` would print a returned value
    and exit 1. Library users call :func:`compare_runs` for the rows.

    Args:
        argv: The arguments; ``sys.argv[1:]`` by default.
    """
    folders: list[str] = []
    own: dict[str, Optional[str]] = {"output": None, "metric": None}
    for key, value in key_value_arguments(argv, "vpt-compare", __doc__):
        if key not in _OWN_KEYS:
            raise ConfigError(f"Unknown argument {key!r}; vpt-compare takes runs=, output= and metric= (see --help).")
        if key == "runs":
            folders.append(value)
        else:
            own[key] = value or None
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    compare_runs(folders, own["output"], own["metric"])


if __name__ == "__main__":
    main()
