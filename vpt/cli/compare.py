"""Compare finished runs side by side: one table row and one bar per run, and the recipe
selected on validation where the runs are a recipe search.

    vpt-compare runs=multirun/2026-11-22/10-00-00 [runs=outputs/... ...] [output=<folder>] [metric=test/dice]
                [select=auto|val|none] [search=optimizer.base_lr,optimizer.weight_decay]

Arguments are ``key=value`` pairs. ``runs`` (repeatable) is a finished run folder (it holds
``metrics.json`` and ``config.yaml``) or any folder with run folders below it, such as a
Hydra multirun folder; unfinished runs are skipped. ``metric`` picks the headline metric
that orders the table and fills the chart (default ``test/dice`` if a run has it, else
``test/acc``); ``hd95`` and ``loss`` metrics are ordered smallest first. The results go to
``output`` (default ``<first runs folder>/comparison``) as ``comparison.csv``,
``comparison.md`` and ``comparison.png``, never over existing files. Run configs are only
read, nothing in them is instantiated.

Selection on validation, as the VPT paper picks its learning rate and weight decay
(``vpt-train experiment=recipe_search``): runs alike in everything but the ``search`` keys
(comma-separated dotted config keys, default ``optimizer.base_lr,optimizer.weight_decay``)
form a group, and in each group the run with the best validation score is selected: its
``best/<monitor>``, largest or smallest as the run's ``monitor_mode`` says. The earlier run
(``runs=`` order, then job 2 before job 10) wins a tie; a run without a validation score is
listed but never selected. Test metrics play no part in the choice. ``select=auto`` (the
default) selects when some group holds two or more different recipes, ``select=val``
always, ``select=none`` never. With a selection the table gains the columns ``selected``
(a check mark; ``no val`` for a run without a validation score), ``group`` and one per
searched key, and ``selection.md`` and ``selection.json`` report each group's selected run
with its test metrics only.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vpt.atomic import atomic_write_text
from vpt.cli.arguments import key_value_arguments
from vpt.cli.errors import exit_on_user_error
from vpt.errors import ConfigError
from vpt.runs import check_folder_writable, save_figure, write_json
from vpt.recipe_selection import SEARCHED_KEYS, RecipeGroup, ValidationScore, flatten_config, select_recipes, validation_score

__all__ = ["compare_runs", "find_runs", "lower_is_better", "main", "OUTPUT_FILES", "SELECTION_FILES"]

_logger = logging.getLogger("vpt.compare")

#: The files one comparison writes into its output folder.
OUTPUT_FILES = ("comparison.csv", "comparison.md", "comparison.png")
#: The files a selection on validation adds beside them.
SELECTION_FILES = ("selection.json", "selection.md")
_OWN_KEYS = ("runs", "output", "metric", "select", "search")
_SELECT_MODES = ("auto", "val", "none")
# What marks a folder as a run at all (finished or not); such a folder is never searched
# further, so an evaluation folder inside a run (which also holds metrics.json and
# config.yaml) is not counted as a run of its own.
_RUN_MARKERS = ("metrics.json", "config.yaml", "metrics.csv", ".hydra")
_LEADING_COLUMNS = ("run", "method", "backbone", "task", "options", "trainable_params", "total_params", "trainable_%")
_TRAILING_COLUMNS = ("wall_time_s", "peak_memory_mb")
# Keys of a method's config that set the training recipe, not the method (as vpt.methods'
# RECIPE_KEYS, less the name; not imported: that would load torch for a table).
_METHOD_RECIPE_KEYS = ("prompt_lr_scale",)


def _natural_key(path: Path) -> list[tuple[int, Any]]:
    """Path order with numbers compared as numbers: a multirun's job 2 before job 10."""
    parts = re.split(r"(\d+)", path.as_posix())
    return [(0, int(part)) if part.isdigit() else (1, part) for part in parts]


def _is_finished_run(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() and (folder / "config.yaml").is_file()


def find_runs(folder: str | Path) -> list[Path]:
    """The finished run folders at or below ``folder``, in path order (job 2 before job 10).

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
    return sorted(found, key=_natural_key)


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
    from vpt.config_version import migrate_run_config
    from vpt.errors import ConfigError

    try:  # runs of older vpt versions are compared as they are read today
        migrated = OmegaConf.to_container(migrate_run_config(OmegaConf.create(config), str(path)), resolve=False)
    except ConfigError as error:
        _logger.warning("Skipping %s: %s", path.parent, error)
        return None
    return migrated  # type: ignore[return-value]


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


def _method_options(method: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The options the run's method used: ``method_options`` of its metrics.json (a sweep's
    options of other methods, which the method ignored, are left out) and the method's
    recipe keys; the config's method section for runs that did not record them."""
    used = metrics.get("method_options")
    if not isinstance(used, dict):
        return {key: value for key, value in method.items() if key != "name"}
    recipe = {key: method[key] for key in _METHOD_RECIPE_KEYS if key in method}
    return {**used, **recipe}


def _describe(run: Path, parent: Path, metrics: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """One run's row, without the metric columns that other runs may add."""
    method = _section(config, "method")
    trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
    share = round(100.0 * trainable / total, 3) if _is_number(trainable) and _is_number(total) and total else None
    model_config = metrics.get("model_config")
    row: dict[str, Any] = {
        "run": run.relative_to(parent).as_posix(),
        "method": method.get("name"),
        # The model= config the run chose (vit_micro), else the name the config builds.
        "backbone": model_config if isinstance(model_config, str) and model_config else _section(config, "model").get("name"),
        "task": _section(config, "task").get("name"),
        "options": " ".join(f"{key}={_option_text(value)}" for key, value in _method_options(method, metrics).items()),
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
    if isinstance(value, bool):
        return "true" if value else "false"
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


def _searched_keys(search: Optional[Sequence[str] | str], configs: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The keys a recipe search varied; a key the user named must be in some run's config."""
    if search is None:
        return SEARCHED_KEYS
    names = search.split(",") if isinstance(search, str) else list(search)
    keys = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not keys:
        raise ConfigError("search= names no key; pass search=<dotted config keys, e.g. optimizer.base_lr,optimizer.weight_decay>.")
    present = set().union(*(flatten_config(config) for config in configs))
    unknown = [key for key in keys if key not in present]
    if unknown:
        raise ConfigError(f"No run's config.yaml has {unknown[0]!r}; pass search= dotted keys the runs set, e.g. optimizer.base_lr.")
    return keys


def _group_differences(groups: Sequence[RecipeGroup]) -> list[str]:
    """Config keys that tell groups apart beyond the method, backbone, task and options columns."""
    keys = dict.fromkeys(key for group in groups for key in group.setting)
    varying = [key for key in keys if len({json.dumps(g.setting.get(key), sort_keys=True, default=str) for g in groups}) > 1]

    def shown(key: str) -> bool:
        if key in ("monitor", "monitor_mode"):
            return True  # the monitor column
        section = key.split(".", 1)[0]
        # A changed backbone or task changes many of its keys; its name says enough.
        return section == "method" or (section in ("model", "task") and f"{section}.name" in varying)

    return [key for key in varying if not shown(key)]


def _selection(
    groups: Sequence[RecipeGroup],
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[dict[str, Any]],
    searched_keys: Sequence[str],
) -> tuple[dict[str, Any], str]:
    """``selection.json`` and ``selection.md``: per group the selected run and its test metrics.

    ``rows`` and ``metrics`` are in run order (``Candidate.index``); only the selected runs'
    metrics are read.
    """
    differences = _group_differences(groups)
    report: list[dict[str, Any]] = []
    unscored: list[str] = []
    table_rows: list[dict[str, Any]] = []
    for number, group in enumerate(groups, start=1):
        first = rows[group.candidates[0].index]
        chosen = group.selected
        chosen_metrics = metrics[chosen] if chosen is not None else {}
        tests = {key: _metric_value(value) for key, value in chosen_metrics.items()
                 if key.startswith("test/") and _is_metric_key(key, value)}
        recipe = next((c.recipe for c in group.candidates if c.index == chosen), None)
        score = next((c.score.value for c in group.candidates if c.index == chosen), None)
        for candidate in group.candidates:
            if candidate.score.value is None:
                unscored.append(f"- {rows[candidate.index]['run']} (group {number}): {candidate.score.note}")
        if chosen is None:
            unscored.append(f"- group {number}: no run has a validation score, so none is selected")
        entry = {
            "group": number,
            "method": first["method"],
            "backbone": first["backbone"],
            "task": first["task"],
            "options": first["options"],
            "setting": {key: group.setting.get(key) for key in differences},
            "monitor": group.monitor,
            "monitor_mode": group.mode,
            "selected": rows[chosen]["run"] if chosen is not None else None,
            "recipe": recipe,
            "validation": score,
            "test": tests,
            "candidates": [
                {"run": rows[c.index]["run"], "recipe": c.recipe, "validation": c.score.value, "note": c.score.note}
                for c in group.candidates
            ],
        }
        report.append(entry)
        table_rows.append({
            **{key: entry[key] for key in ("group", "method", "backbone", "task", "options")},
            "setting": " ".join(f"{key}={_option_text(value)}" for key, value in entry["setting"].items()),
            "runs": len(group.candidates),
            "monitor": f"best/{group.monitor} ({group.mode})" if group.monitor else None,
            "selected": entry["selected"] or "none",
            **{key: (recipe or {}).get(key) for key in searched_keys},
            "validation": score,
            **tests,
        })
    test_columns = list(dict.fromkeys(key for row in table_rows for key in row if key.startswith("test/")))
    columns = ["group", "method", "backbone", "task", "options", *(["setting"] if differences else []), "runs",
               "monitor", "selected", *searched_keys, "validation", *test_columns]
    keys = ", ".join(searched_keys)
    markdown = (
        "# Recipe selection on validation\n\n"
        f"Runs alike in everything but {keys} form a group. In each group the run with the best "
        "validation score (`best/<monitor>` of its metrics.json, largest or smallest as its "
        "monitor_mode says) is selected, the earlier run on a tie. The test metrics are the "
        "selected run's only; no test metric played a part in the choice.\n\n"
        + _markdown_table(table_rows, columns)
    )
    if unscored:
        markdown += "\nRuns without a validation score (listed, never selected):\n\n" + "\n".join(unscored) + "\n"
    return {"selected_by": "validation", "searched_keys": list(searched_keys), "groups": report}, markdown


def _selected_mark(value: Optional[bool]) -> str:
    if value is None:
        return "no val"
    return "✓" if value else ""


def compare_runs(
    folders: Sequence[str | Path],
    output: str | Path | None = None,
    metric: str | None = None,
    select: str = "auto",
    search: Optional[Sequence[str] | str] = None,
) -> list[dict[str, Any]]:
    """Tabulate and chart every finished run found in ``folders``; select recipes on validation.

    Args:
        folders: Run folders or folders of runs (a Hydra multirun folder), searched at any depth.
        output: The folder for ``comparison.{csv,md,png}`` (and ``selection.{json,md}``);
            ``<folders[0]>/comparison`` by default.
        metric: The headline metric (a metrics.json key, or a test metric's short name such as
            ``dice``); ``test/dice`` if some run has it, else ``test/acc``.
        select: ``"auto"``: select on validation when some group of runs holds two or more
            recipes; ``"val"``: always; ``"none"``: never (see the module docstring).
        search: The dotted config keys a recipe search varied (a list, or one comma-separated
            string); :data:`vpt.recipe_selection.SEARCHED_KEYS` by default.

    Returns:
        One row per run, best first by the headline metric: ``run`` (relative to the runs'
        common parent), ``method``, ``backbone``, ``task``, ``options``, parameter counts,
        ``trainable_%``, every numeric ``test/`` and ``best/`` metric some run has (NaN where
        the run wrote null), ``wall_time_s`` and ``peak_memory_mb`` (``None`` where missing).
        With a selection also ``selected`` (True, False, or None for a run without a
        validation score), ``group`` (numbered from 1) and one column per searched key.

    Raises:
        ConfigError: no folders, a folder that is missing or holds no finished run, an
            unknown ``metric``, ``select`` or ``search`` key, or an output folder that already
            holds a comparison.
    """
    if not folders:
        raise ConfigError("Nothing to compare; pass runs=<a run folder or a folder of runs>.")
    if select not in _SELECT_MODES:
        raise ConfigError(f"select={select} is not a selection mode; pass select=auto, select=val or select=none.")
    out_dir = Path(output) if output is not None else Path(folders[0]) / "comparison"
    targets = [out_dir / name for name in OUTPUT_FILES]
    selection_targets = [out_dir / name for name in SELECTION_FILES]
    existing = [target for target in targets + selection_targets if target.exists()]
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

    configs = [config for _, _, config in loaded]
    searched_keys = _searched_keys(search, configs) if select != "none" else ()
    groups: list[RecipeGroup] = []
    if select != "none":
        # The choice sees each run's validation score and config, never its test metrics.
        scores: list[ValidationScore] = [validation_score(metrics, config) for _, metrics, config in loaded]
        groups = select_recipes(configs, scores, searched_keys)
        if select == "auto" and not any(group.is_search for group in groups):
            groups = []
    leading = list(_LEADING_COLUMNS)
    if groups:
        for number, group in enumerate(groups, start=1):
            for candidate in group.candidates:
                row = rows[candidate.index]
                row["selected"] = candidate.index == group.selected if candidate.score.value is not None else None
                row["group"] = number
                row.update(candidate.recipe)
        leading = ["run", "selected", "group", *leading[1:5], *searched_keys, *leading[5:]]
    columns = leading + metric_columns + list(_TRAILING_COLUMNS)
    described = rows
    rows = [{column: row.get(column) for column in columns} for row in _order(rows, headline)]

    shown = [{**row, "selected": _selected_mark(row["selected"])} for row in rows] if groups else rows
    table = _markdown_table(shown, columns)
    csv_path, markdown_path, png_path = targets
    atomic_write_text(csv_path, _csv_text(rows, columns))
    atomic_write_text(markdown_path, table)
    _plot(rows, headline, png_path)
    written = list(targets)
    order = "smallest" if lower_is_better(headline) else "largest"
    print(f"{len(rows)} runs by {headline} ({order} first):\n\n{table}")
    if groups:
        report, selection_markdown = _selection(groups, described, [metrics for _, metrics, _ in loaded], searched_keys)
        json_path, selection_path = selection_targets
        write_json(json_path, report)
        atomic_write_text(selection_path, selection_markdown)
        written += selection_targets
        print(f"{selection_markdown}\n")
    for path in written:
        print(f"Wrote {path}")
    return rows


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``vpt-compare runs=<folder> [runs=...] [output=...] [metric=...] [select=...] [search=...]``).

    Returns nothing: a console script's ``sys.exit(main())`` would print a returned value
    and exit 1. Library users call :func:`compare_runs` for the rows.

    Args:
        argv: The arguments; ``sys.argv[1:]`` by default.
    """
    folders: list[str] = []
    own: dict[str, Optional[str]] = {"output": None, "metric": None, "select": None, "search": None}
    for key, value in key_value_arguments(argv, "vpt-compare", __doc__):
        if key not in _OWN_KEYS:
            raise ConfigError(f"Unknown argument {key!r}; vpt-compare takes runs=, output=, metric=, select= and search= (see --help).")
        if key == "runs":
            folders.append(value)
        else:
            own[key] = value or None
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    compare_runs(folders, own["output"], own["metric"], select=own["select"] or "auto", search=own["search"])


if __name__ == "__main__":
    main()
