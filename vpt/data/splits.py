"""Seeded, reproducible train/val/test splits of an item list.

``stratified_split`` keeps the class balance of every split; ``group_split`` keeps all items
of one group (a patient, a slide, a video) in one split so that no group leaks between
training and evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from vpt.errors import ConfigError

__all__ = ["normalize_fractions", "stratified_split", "group_split"]

_logger = logging.getLogger(__name__)

_DEFAULT_SPLIT_NAMES = ("train", "val", "test")


def normalize_fractions(fractions: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    """Check split fractions and scale them to sum to one.

    Args:
        fractions: ``{"train": 0.7, "val": 0.15, "test": 0.15}``, or up to three numbers
            taken as train, val, test in that order.

    Returns:
        Split name to fraction, in the given order, summing to one.
    """
    if not isinstance(fractions, Mapping):
        values = tuple(fractions)
        if len(values) > len(_DEFAULT_SPLIT_NAMES):
            raise ConfigError(
                f"Split fractions {values} have more than three values; pass a dict of split names to fractions."
            )
        fractions = dict(zip(_DEFAULT_SPLIT_NAMES, values))
    result = {str(name): float(value) for name, value in fractions.items()}
    total = sum(result.values())
    if any(value < 0 for value in result.values()) or total <= 0:
        raise ConfigError(f"Split fractions {result} must be non-negative with a positive sum.")
    return {name: value / total for name, value in result.items()}


def _split_counts(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Split ``n`` items into counts close to ``n * fractions``.

    Every split with a non-zero fraction gets at least one item when there are enough items
    to go round; otherwise the splits with the largest fractions are served first.

    Args:
        n: Number of items.
        fractions: Split fractions summing to one, shape ``(S,)``.

    Returns:
        Item counts per split, shape ``(S,)``, summing to ``n``.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    nonzero = fractions > 0
    # Stable sort so ties keep the caller's order (train before val before test).
    by_size = np.argsort(-fractions, kind="stable")
    counts = np.zeros(len(fractions), dtype=np.int64)
    if n < int(nonzero.sum()):
        counts[by_size[:n]] = 1
        return counts
    ideal = n * fractions
    counts = np.where(nonzero, np.maximum(np.floor(ideal).astype(np.int64), 1), 0)
    while counts.sum() > n:  # the minimum of one overshot: take back from the largest split
        counts[np.argmax(counts)] -= 1
    shortfall = n - int(counts.sum())
    if shortfall:
        # Largest remainder first, ties broken by the larger fraction.
        order = np.lexsort((-fractions, -(ideal - counts)))
        order = order[nonzero[order]]
        counts[order[:shortfall]] += 1
    return counts


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    fractions: Mapping[str, float] | Sequence[float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Split item indices into named parts with (nearly) the same class balance each.

    Each class is shuffled with ``np.random.default_rng(seed)`` and cut by the fractions. A
    class with at least as many items as there are non-zero fractions appears in every such
    split (so a class of 3 items gives one each to train, val and test at 70/15/15).

    Args:
        labels: Class label of each item, shape ``(N,)``.
        fractions: Split name to fraction (scaled to sum to one), or up to three numbers
            taken as train, val, test.
        seed: Seed of the shuffle; the same seed and labels give the same split.

    Returns:
        Split name to sorted int64 item indices; the parts are disjoint and cover
        ``range(N)``.
    """
    fractions = normalize_fractions(fractions)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        counts = _split_counts(len(members), list(fractions.values()))
        for name, chunk in zip(fractions, np.split(members, np.cumsum(counts)[:-1])):
            parts[name].append(chunk)
    return {name: _sorted_indices(chunks) for name, chunks in parts.items()}


def group_split(
    groups: Sequence[Hashable],
    fractions: Mapping[str, float] | Sequence[float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Split item indices into named parts so that all items of a group share one part.

    Groups are shuffled with ``np.random.default_rng(seed)`` and each goes to the split that
    is furthest below its target number of items, so split sizes follow the fractions as
    closely as whole groups allow. Every split with a non-zero fraction gets a group when
    there are enough groups.

    Args:
        groups: Group key of each item (e.g. a patient id), length ``N``.
        fractions: Split name to fraction (scaled to sum to one), or up to three numbers
            taken as train, val, test.
        seed: Seed of the shuffle; the same seed and groups give the same split.

    Returns:
        Split name to sorted int64 item indices; the parts are disjoint, cover ``range(N)``
        and no group appears in two parts.
    """
    fractions = normalize_fractions(fractions)
    names = list(fractions)
    # Index groups by first appearance so the result does not depend on hash order.
    first_seen: dict[Hashable, int] = {}
    group_ids = np.asarray(
        [first_seen.setdefault(group, len(first_seen)) for group in groups], dtype=np.int64
    )
    by_group = np.argsort(group_ids, kind="stable")
    sizes = np.bincount(group_ids, minlength=len(first_seen))
    members = np.split(by_group, np.cumsum(sizes)[:-1]) if len(first_seen) else []
    rng = np.random.default_rng(seed)
    targets = np.asarray([fractions[name] for name in names]) * len(group_ids)
    filled = np.zeros(len(names))
    empty = [int(i) for i in np.argsort(-targets, kind="stable") if targets[i] > 0]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    order = rng.permutation(len(members))
    for position, gid in enumerate(order):
        remaining = len(order) - position
        if empty and remaining <= len(empty):
            # Just enough groups left to give each still-empty split one.
            choice = empty[0]
        else:
            choice = int(np.argmax(np.where(targets > 0, targets - filled, -np.inf)))
        if choice in empty:
            empty.remove(choice)
        parts[names[choice]].append(members[gid])
        filled[choice] += len(members[gid])
    return {name: _sorted_indices(chunks) for name, chunks in parts.items()}


def _sorted_indices(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate index chunks into one sorted int64 array (empty when there are none)."""
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chunks)).astype(np.int64)
