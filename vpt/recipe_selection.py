"""Recipe selection on validation, as the VPT paper does it.

Runs that differ only in the searched keys (by default the optimiser's ``base_lr`` and
``weight_decay``) form a group; within each group the run with the best validation score
(``best/<monitor>`` of its ``metrics.json``, largest or smallest as its ``monitor_mode`` says)
is selected. The choice sees validation scores only: :func:`select_recipes` takes the
configs and one validation score per run, never a test metric, so a test result cannot
leak into the choice. Ties go to the earlier run. A run without a validation score is kept
in its group but never selected. (:mod:`vpt.training.selection` picks the epoch a run
tests; this module picks among finished runs.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

__all__ = [
    "SEARCHED_KEYS",
    "Candidate",
    "RecipeGroup",
    "ValidationScore",
    "best_by_validation",
    "flatten_config",
    "select_recipes",
    "validation_score",
]

#: The keys a recipe search varies (``experiment=recipe_search``); everything else defines the group.
SEARCHED_KEYS: tuple[str, ...] = ("optimizer.base_lr", "optimizer.weight_decay")
MonitorMode = Literal["max", "min"]


@dataclass(frozen=True)
class ValidationScore:
    """One run's validation score, read from its own metrics and config.

    Attributes:
        monitor: The monitored metric (``val/acc``), ``None`` when the config names none.
        mode: ``"max"`` or ``"min"``: which end of ``value`` is better.
        value: ``best/<monitor>``; ``None`` when the run has no usable score.
        note: Why ``value`` is ``None``, in words; ``None`` when it is a number.
    """

    monitor: Optional[str]
    mode: MonitorMode
    value: Optional[float]
    note: Optional[str] = None


@dataclass(frozen=True)
class Candidate:
    """One run of a group.

    Attributes:
        index: The run's position in the list given to :func:`select_recipes`.
        recipe: The run's values of the searched keys (``None`` where its config lacks one).
        score: Its validation score.
    """

    index: int
    recipe: dict[str, Any]
    score: ValidationScore


@dataclass
class RecipeGroup:
    """Runs alike in everything but the searched keys, and the one selected among them.

    Attributes:
        setting: The shared config, flattened to dotted keys, without the searched keys.
        candidates: The group's runs, in the order given.
        selected: The selected run's ``index``; ``None`` when no run has a validation score.
    """

    setting: dict[str, Any]
    candidates: list[Candidate] = field(default_factory=list)
    selected: Optional[int] = None

    @property
    def is_search(self) -> bool:
        """Whether the group holds at least two different recipes, i.e. there was something to choose."""
        return len({_canonical(c.recipe) for c in self.candidates}) > 1

    @property
    def monitor(self) -> Optional[str]:
        """The group's monitored metric (shared, as it is part of the setting)."""
        return self.candidates[0].score.monitor if self.candidates else None

    @property
    def mode(self) -> MonitorMode:
        """``"max"`` or ``"min"``: which end of the group's validation scores is better."""
        return self.candidates[0].score.mode if self.candidates else "max"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"optimizer.base_lr": 0.1, ...}``; lists and empty sections are leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validation_score(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> ValidationScore:
    """The run's ``best/<monitor>``, with the monitor and its mode from the run's config.

    Args:
        metrics: The run's ``metrics.json``.
        config: The run's resolved ``config.yaml`` (``monitor``, ``monitor_mode``).

    Returns:
        The score; its ``value`` is ``None`` (and ``note`` says why) when the config names no
        monitor or an unknown mode, or ``metrics.json`` has no finite ``best/<monitor>``.
    """
    monitor, mode = config.get("monitor"), config.get("monitor_mode", "max")
    if not isinstance(monitor, str) or not monitor:
        return ValidationScore(None, "max", None, "config.yaml names no monitor")
    if mode not in ("max", "min"):
        return ValidationScore(monitor, "max", None, f"monitor_mode {mode!r} is neither max nor min")
    key = f"best/{monitor}"
    value = metrics.get(key)
    if key not in metrics:
        return ValidationScore(monitor, mode, None, f"no {key} in metrics.json (not validated)")
    if value is None or (_is_number(value) and math.isnan(value)):
        return ValidationScore(monitor, mode, None, f"{key} is NaN")
    if not _is_number(value):
        return ValidationScore(monitor, mode, None, f"{key} is not a number")
    return ValidationScore(monitor, mode, float(value))


def best_by_validation(values: Sequence[Optional[float]], mode: MonitorMode) -> Optional[int]:
    """The position of the best validation value; the first one wins a tie.

    Args:
        values: One validation score per run, ``None`` (or NaN) where a run has none.
        mode: ``"max"`` when larger is better, ``"min"`` when smaller is.

    Returns:
        The position in ``values``, or ``None`` when no value is a number.
    """
    best: Optional[int] = None
    for position, value in enumerate(values):
        if value is None or math.isnan(value):
            continue
        if best is None or (value > values[best] if mode == "max" else value < values[best]):  # type: ignore[operator]
            best = position
    return best


def select_recipes(
    configs: Sequence[Mapping[str, Any]],
    scores: Sequence[ValidationScore],
    searched_keys: Sequence[str] = SEARCHED_KEYS,
) -> list[RecipeGroup]:
    """Group runs by everything but ``searched_keys`` and select the best on validation in each.

    Args:
        configs: Each run's resolved config, in run order (the order decides ties).
        scores: Each run's validation score (:func:`validation_score`), in the same order.
        searched_keys: Dotted config keys the search varied.

    Returns:
        The groups in order of their first run, each with its selected run (if any).
    """
    if len(configs) != len(scores):
        raise ValueError(f"{len(configs)} configs but {len(scores)} validation scores.")
    searched = set(searched_keys)
    groups: dict[str, RecipeGroup] = {}
    for index, (config, score) in enumerate(zip(configs, scores)):
        flat = flatten_config(config)
        setting = {key: value for key, value in flat.items() if key not in searched}
        recipe = {key: flat.get(key) for key in searched_keys}
        group = groups.setdefault(_canonical(setting), RecipeGroup(setting))
        group.candidates.append(Candidate(index, recipe, score))
    for group in groups.values():
        best = best_by_validation([c.score.value for c in group.candidates], group.mode)
        group.selected = group.candidates[best].index if best is not None else None
    return list(groups.values())
