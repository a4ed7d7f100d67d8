"""The run folder: resolved config, metrics.json, curves and preview pictures.

Nothing here overwrites results: a folder that already holds a ``metrics.json`` is refused,
and JSON files are written to a temporary name first and renamed into place.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from vpt.atomic import atomic_path, atomic_write_text
from vpt.errors import ConfigError

if TYPE_CHECKING:
    from vpt.data.medical.orientation import DisplayOrientation

__all__ = [
    "check_folder_writable",
    "check_run_dir",
    "write_json",
    "plot_curves",
    "save_classification_preview",
    "choose_one_per_class",
    "save_segmentation_overlays",
    "overlay_rows",
    "save_organ_dice_chart",
    "choose_covering_slices",
    "slice_dice",
    "slice_title",
    "overlay_row",
    "model_input_slice",
    "first_test_volume",
    "save_with_organ_legend",
    "save_figure",
]

_logger = logging.getLogger(__name__)


def check_folder_writable(folder: Path, what: str = "hydra.run.dir") -> None:
    """Refuse a folder that cannot be created or written, before anything is written.

    Raises:
        ConfigError: the folder (or the nearest part of its path that exists) is a file, or
            not writable by this process.
    """
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"Cannot create the output folder {folder}: {existing} is a file, not a folder; choose another {what}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot write the output folder {folder}: {existing} is read-only for this user; choose a writable {what}.")


def check_run_dir(run_dir: Path, resuming: bool = False) -> None:
    """Refuse a run folder that would lose results, before anything is written.

    Args:
        run_dir: The run folder.
        resuming: Whether the run resumes a checkpoint (``ckpt_path``); then an unfinished
            run's folder may be continued.

    Raises:
        ConfigError: the folder holds finished results (``metrics.json``), holds an
            unfinished run and this run does not resume, or cannot be written.
    """
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise ConfigError(
            f"Run folder {run_dir} already holds results (metrics.json); choose another hydra.run.dir "
            "(to continue training, start a new folder with ckpt_path=<old run>/checkpoints/last.ckpt)."
        )
    if not resuming and ((run_dir / "checkpoints" / "last.ckpt").exists() or (run_dir / "metrics.csv").exists()):
        raise ConfigError(
            f"Run folder {run_dir} holds an unfinished run; resume it with ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} "
            "or choose another hydra.run.dir."
        )
    check_folder_writable(run_dir)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: Path, data: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically; refuse to replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; vpt does not overwrite results, choose another output folder.")
    return atomic_write_text(path, json.dumps(_plain(dict(data)), indent=2, allow_nan=True) + "\n")


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically (a crash leaves the old picture or the new one) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _read_csv_log(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning CSVLogger rows -> {metric: [(step, value), ...]}.

    Epoch-level rows carry the global step at the end of their epoch, so per-step and
    per-epoch series share the step axis.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


_STEP_SUFFIXES = {"_step": "per step", "_epoch": "per epoch"}


def _curve_family(key: str) -> str:
    """The panel a logged key belongs to: ``train/loss_epoch`` and ``val/loss`` -> ``loss``."""
    if key.startswith("lr"):  # LearningRateMonitor: lr-<Optimizer>[/pg<N>]
        return "learning rate"
    name = key.split("/", 1)[-1]
    for suffix in _STEP_SUFFIXES:
        name = name.removesuffix(suffix)
    return "loss" if "loss" in name else name.split("_")[0]


def _curve_label(key: str) -> str:
    """``train/loss_epoch`` -> ``train/loss (per epoch)``; other keys as logged."""
    for suffix, words in _STEP_SUFFIXES.items():
        if key.endswith(suffix) and not key.startswith("lr"):
            return f"{key[: -len(suffix)]} ({words})"
    return key


def _distinct_learning_rates(keys: Sequence[str], series: Mapping[str, list[tuple[float, float]]]) -> list[str]:
    """The learning-rate keys worth a line: parameter groups that share one schedule are drawn once."""
    kept: list[str] = []
    for key in keys:
        if not any(series[key] == series[other] for other in kept):
            kept.append(key)
    return kept


def plot_curves(metrics_csv: Path, out_png: Path) -> Optional[Path]:
    """Loss, metric and learning-rate curves from the CSV log, one panel per family.

    Lightning writes per-step values only every ``log_every_n_steps``, so a run with shorter
    epochs has no per-step training loss; its per-epoch series (``train/loss_epoch``, or any
    key logged with ``on_epoch=True``) are drawn instead, on the same step axis. The learning
    rate gets one panel, one line per parameter group whose schedule differs from the others.
    Test scores (one value each, in ``metrics.json``) are left out.

    Returns:
        ``out_png``, or None when the CSV is missing or holds no values.
    """
    if not metrics_csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_csv_log(metrics_csv)
    families: dict[str, list[str]] = {}
    for key in sorted(series):
        if not key.startswith("test/"):  # one value at the end, in metrics.json; not a curve
            families.setdefault(_curve_family(key), []).append(key)
    if "learning rate" in families:
        families["learning rate"] = _distinct_learning_rates(families["learning rate"], series)
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for axis, (family, keys) in zip(axes[0], families.items()):
        for key in keys:
            steps, values = zip(*series[key])
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=_curve_label(key))
        axis.set_title(family)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _denormalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, H, W) normalised -> (N, H, W, 3) in [0, 1]."""
    images = images * np.asarray(std)[None, :, None, None] + np.asarray(mean)[None, :, None, None]
    return np.clip(images.transpose(0, 2, 3, 1), 0.0, 1.0)


def choose_one_per_class(labels: Sequence[int], count: int) -> list[int]:
    """Indices of up to ``count`` items such that as many classes as possible appear.

    The first item of each class (in the order classes are first met) comes first, so with
    ``count`` below the number of classes each picture shows a different class; the rest
    is filled with the earliest items not yet chosen.

    Args:
        labels: Class index of each item, (N,).
        count: How many indices to return at most.

    Returns:
        Indices into ``labels``, ordered by class and then by position.
    """
    first_of_class: dict[int, int] = {}
    for index, label in enumerate(labels):
        first_of_class.setdefault(int(label), index)
    chosen = list(first_of_class.values())[: max(count, 0)]
    taken = set(chosen)
    for index in range(len(labels)):
        if len(chosen) >= count:
            break
        if index not in taken:
            chosen.append(index)
            taken.add(index)
    return sorted(chosen, key=lambda index: (int(labels[index]), index))


def save_classification_preview(
    images: np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    out_png: Path,
) -> Path:
    """A grid of test images titled ``true -> predicted`` (red when wrong).

    Args:
        images: Normalised model inputs, (N, 3, H, W).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = _denormalise(images, mean, std)
    count = len(pictures)
    cols = min(8, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        axis.imshow(pictures[index], interpolation="nearest")
        true, pred = class_names[labels[index]], class_names[predictions[index]]
        axis.set_title(f"{true}\n-> {pred}", fontsize=7, color="black" if true == pred else "red")
    fig.tight_layout()
    return save_figure(fig, out_png)


_ORGAN_COLOURS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]],
    dtype=np.float32,
) / 255.0


# test_overlays.png: a few telling slices of a few test cases, small enough to open anywhere
# (the largest side in pixels; panels shrink to fit).
OVERLAY_ROWS_PER_CASE = 3
OVERLAY_CASES = 3
MAX_PICTURE_PIXELS = 2000


def _overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A slice in [0, 1], grey (H, W) or colour (H, W, 3), with label colours blended in -> (H, W, 3)."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    colours = _ORGAN_COLOURS[labels % len(_ORGAN_COLOURS)]
    mask = (labels > 0)[..., None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def save_with_organ_legend(fig: Any, class_names: Sequence[str], out_png: Path) -> Path:
    """Add the organ colour legend (background left out) under ``fig``, save it and close it."""
    import matplotlib.patches

    handles = [
        matplotlib.patches.Patch(color=_ORGAN_COLOURS[i % len(_ORGAN_COLOURS)], label=name)
        for i, name in enumerate(class_names) if i > 0
    ]
    columns = min(4, max(len(handles), 1))
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7)
    # The legend takes a fixed height in inches, however tall the figure is.
    legend_inches = 0.22 * math.ceil(len(handles) / columns) + 0.15
    fig.tight_layout(rect=(0, min(0.3, legend_inches / fig.get_figheight()), 1, 1))
    return save_figure(fig, out_png, dpi=100)


def first_test_volume(datamodule: Any) -> Optional[tuple[Any, Any]]:
    """Slices (D, 3, H, W) and label volume (D, H0, W0) of the first test case, or None."""
    batch = next(iter(datamodule.test_dataloader()), None)
    if batch is None:
        return None
    slices, label = batch["image"], batch["label"]
    if slices.ndim == 5:  # a batch of one case
        slices, label = slices[0], label[0]
    return slices, label


def _organs_per_slice(truth: np.ndarray, prediction: np.ndarray) -> list[set[int]]:
    return [
        (set(np.unique(truth[z]).tolist()) | set(np.unique(prediction[z]).tolist())) - {0}
        for z in range(truth.shape[0])
    ]


def choose_covering_slices(truth: np.ndarray, prediction: np.ndarray, count: int) -> list[int]:
    """Slices of one case on which every organ of the ground truth or the prediction shows.

    A greedy cover: again and again the slice holding the most organs missed in the whole
    case (in the ground truth, never predicted) not yet shown, then the most other organs not
    yet shown (ties: more of them missed or false positive there, then the larger area
    labelled in either), until every organ shows or ``count`` slices are chosen; so with few
    slices the missed organs come first, and a false positive (prediction only) also gets a
    slice when there is room. The most labelled remaining slices fill up to ``count``.

    Args:
        truth: Ground-truth labels, (D, H, W).
        prediction: Predicted labels, (D, H, W).
        count: Slices to choose at most.

    Returns:
        Slice indices, ascending.
    """
    depth = truth.shape[0]
    if count <= 0 or depth == 0:
        return []
    organs = _organs_per_slice(truth, prediction)
    # Organs in only one of the two (missed or false positive) win ties: they are the errors.
    disputed = [
        set(np.unique(truth[z]).tolist()) ^ set(np.unique(prediction[z]).tolist()) for z in range(depth)
    ]
    area = ((truth > 0) | (prediction > 0)).reshape(depth, -1).sum(1)
    missed = set(np.unique(truth).tolist()) - set(np.unique(prediction).tolist())
    unshown = set().union(*organs)
    chosen: list[int] = []
    while unshown and len(chosen) < count:
        best = max(
            (z for z in range(depth) if z not in chosen),
            key=lambda z: (
                len(organs[z] & unshown & missed), len(organs[z] & unshown), len(disputed[z] & unshown), area[z], -z
            ),
        )
        chosen.append(best)
        unshown -= organs[best]
    for z in sorted(range(depth), key=lambda z: (-area[z], z)):
        if len(chosen) >= count or area[z] == 0:
            break
        if z not in chosen:
            chosen.append(z)
    return sorted(chosen) if chosen else [depth // 2]


def slice_dice(truth: np.ndarray, prediction: np.ndarray) -> dict[int, float]:
    """Dice of each organ present in either label slice, (H, W) each: ``2|T∩P| / (|T|+|P|)``."""
    scores: dict[int, float] = {}
    for organ in sorted((set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist())) - {0}):
        in_truth, in_prediction = truth == organ, prediction == organ
        overlap = np.logical_and(in_truth, in_prediction).sum()
        scores[int(organ)] = float(2.0 * overlap / (in_truth.sum() + in_prediction.sum()))
    return scores


def slice_title(case: str, index: int, truth: np.ndarray, prediction: np.ndarray, class_names: Sequence[str]) -> str:
    """``case_003 z=41 | liver 0.91, spleen 0.00 (missed)`` for one slice, (H, W) labels.

    An organ in the ground truth only is marked ``(missed)``; one in the prediction only,
    ``(false positive)``.
    """
    parts = []
    for organ, dice in slice_dice(truth, prediction).items():
        name = class_names[organ] if organ < len(class_names) else str(organ)
        note = ""
        if not (prediction == organ).any():
            note = " (missed)"
        elif not (truth == organ).any():
            note = " (false positive)"
        parts.append(f"{name} {dice:.2f}{note}")
    return f"{case} z={index} | " + (", ".join(parts) if parts else "no organ")


def model_input_slice(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float], valid_size: tuple[int, int] | None = None
) -> np.ndarray:
    """The slice of a network input, for pictures when the data's own pixels are not at hand.

    Args:
        image: The normalised model input slice, (3, H, W); the middle channel is the slice
            itself (with 2.5D context the others are its neighbours).
        mean: Normalisation mean of each channel, [0, 1] units.
        std: Normalisation standard deviation of each channel.
        valid_size: The part of ``image`` that is the slice (tiled inputs are padded).

    Returns:
        (H, W) float32 in [0, 1] (cut to ``valid_size``) at the network's resolution.
    """
    middle = image.shape[0] // 2
    gray = np.clip(image[middle] * float(std[middle]) + float(mean[middle]), 0.0, 1.0).astype(np.float32)
    if valid_size is not None:
        gray = gray[: int(valid_size[0]), : int(valid_size[1])]
    return np.ascontiguousarray(gray)


def overlay_row(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    orientation: DisplayOrientation | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three pictures of one overlay row on the label's grid, in display orientation.

    Args:
        image: The slice in [0, 1], grey (H, W) or colour (H, W, 3); the data's own pixels
            (:meth:`VolumeDataset.display_slices <vpt.data.medical.VolumeDataset.display_slices>`)
            are on the label's grid already, anything else (a network input) is resized to it
            bilinearly.
        truth: Ground-truth labels, (H0, W0).
        prediction: Predicted labels, (H0, W0).
        orientation: The turn to the usual display (:mod:`vpt.data.medical.orientation`),
            applied to all three; ``None`` draws them as stored.

    Returns:
        Image, ground-truth overlay and prediction overlay, each (H0, W0, 3) in [0, 1]
        ((W0, H0, 3) when the orientation transposes); the labels are drawn untouched.
    """
    size = tuple(truth.shape[-2:])
    image = np.asarray(image, dtype=np.float32)
    if image.shape[:2] != size:
        import torch

        planes = torch.from_numpy(np.ascontiguousarray(image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)))
        resized = torch.nn.functional.interpolate(planes[None], size=size, mode="bilinear", align_corners=False)[0]
        image = resized.permute(1, 2, 0).numpy().reshape(*size, *image.shape[2:])
    image = np.clip(image, 0.0, 1.0)
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    pictures = (rgb, _overlay(image, truth), _overlay(image, prediction))
    if orientation is None:
        return pictures
    return tuple(orientation.apply(picture) for picture in pictures)  # type: ignore[return-value]


OverlayRow = tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def _case_rows(
    module: Any, loader: Any, batch: Mapping[str, Any], case_number: int, count: int, class_names: Sequence[str],
    mean: np.ndarray, std: np.ndarray,
) -> list[OverlayRow]:
    """Up to ``count`` titled overlay rows of one test case (see :func:`overlay_rows`)."""
    slices, label = batch["image"], batch["label"]
    if slices.ndim == 5:  # a batch of one case
        slices, label = slices[0], label[0]
    case = batch.get("case", [f"case {case_number}"])
    case = str(case[0] if isinstance(case, (list, tuple)) else case)
    truth = label.cpu().numpy()
    valid = batch.get("valid_size")
    valid_size = tuple(int(v) for v in valid.reshape(-1)[-2:].tolist()) if valid is not None else None
    prediction = module.predict_volume(slices, tuple(truth.shape[-2:]), valid_size).cpu().numpy()
    chosen = choose_covering_slices(truth, prediction, count)
    display = getattr(getattr(loader, "dataset", None), "display_slices", None)
    if display is not None:
        # The data's own pixels on the label's grid, turned as radiologists read them.
        planes, orientation = display(case_number, chosen)
    else:
        planes = [model_input_slice(slices[z].float().cpu().numpy(), mean, std, valid_size) for z in chosen]
        orientation = None
    return [
        (slice_title(case, z, truth[z], prediction[z], class_names),
         overlay_row(plane, truth[z], prediction[z], orientation))
        for z, plane in zip(chosen, planes)
    ]


def _overlay_layout(
    titles: Sequence[str], height: int, width: int, max_pixels: int, dpi: int = 100
) -> tuple[float, float, list[str], list[float], float]:
    """Panel size and wrapped titles of the overlay figure, its largest side at most ``max_pixels``.

    Panels start at the slice's own pixels (2.4 to 5.12 inches wide at ``dpi``) and shrink
    until the figure fits; titles wrap to the panels' width.

    Returns:
        ``(panel_width, panel_height, titles, title_heights, figure_height)`` in inches.
    """
    panel_width = float(np.clip(width / dpi, 2.4, 5.12))
    while True:
        panel_height = panel_width * height / width
        characters = max(int(3 * panel_width * 13), 20)  # a title line at fontsize 8 holds ~13 characters an inch
        wrapped = [textwrap.fill(title, characters) for title in titles]
        title_heights = [0.18 * (title.count("\n") + 1) + 0.08 for title in wrapped]
        figure_height = sum(title_heights) + len(titles) * (panel_height + 0.25) + 0.6
        largest = max(3 * panel_width + 0.3, figure_height) * dpi
        if largest <= max_pixels or panel_width <= 0.3:
            return panel_width, panel_height, wrapped, title_heights, figure_height
        panel_width *= max(0.5, min(0.95, max_pixels / largest))


def overlay_rows(
    module: Any,
    datamodule: Any,
    count: int,
    class_names: Sequence[str],
    max_cases: int = OVERLAY_CASES,
    rows_per_case: int = OVERLAY_ROWS_PER_CASE,
) -> list[OverlayRow]:
    """The titled rows of ``test_overlays.png``: image, ground truth and prediction of test slices.

    Up to ``count`` rows from the first ``max_cases`` test cases (shared evenly), at most
    ``rows_per_case`` of each. Each case's slices are chosen by :func:`choose_covering_slices`:
    the organs it missed first, then every other organ of its ground truth or prediction,
    then the most labelled slices. The image is the data's own slice on the label's grid
    (not the network input) and all three panels are turned to the usual radiological
    display (:mod:`vpt.data.medical.orientation`) when the test dataset can give them
    (``display_slices``); rows are titled by :func:`slice_title`.

    Args:
        module: Has ``predict_volume(slices (D, 3, H, W), out_size, valid_size) -> (D, H0, W0)``.
        datamodule: Its ``test_dataloader()`` yields one volume per batch with ``image``
            (1, D, 3, H, W), ``label`` (1, D, H0, W0) and ``case`` ([id]); has ``mean`` and
            ``std``. The loader's dataset may have ``display_slices(index, positions) ->
            (planes, orientation)``; without it the network input is drawn, as stored.
        count: Rows wanted.
        class_names: For the titles.

    Returns:
        ``(title, (image, truth overlay, prediction overlay))`` per row, pictures
        ``(H0, W0, 3)`` in [0, 1] in display orientation.
    """
    loader = datamodule.test_dataloader()
    try:
        available = len(loader)
    except TypeError:  # an iterable loader of unknown length
        available = max_cases
    count = min(count, max_cases * rows_per_case)
    cases = max(1, min(max_cases, count, available))
    mean, std = np.asarray(datamodule.mean), np.asarray(datamodule.std)
    rows: list[OverlayRow] = []
    for case_number, batch in enumerate(loader):
        if case_number >= cases or len(rows) >= count:
            break
        # Rows left over by a case with few slices go to the next one.
        share = min(rows_per_case, math.ceil((count - len(rows)) / (cases - case_number)))
        rows += _case_rows(module, loader, batch, case_number, share, class_names, mean, std)
    return rows


def save_segmentation_overlays(
    module: Any,
    datamodule: Any,
    count: int,
    out_png: Path,
    class_names: Sequence[str],
    max_cases: int = OVERLAY_CASES,
    rows_per_case: int = OVERLAY_ROWS_PER_CASE,
    max_pixels: int = MAX_PICTURE_PIXELS,
) -> Optional[Path]:
    """Draw :func:`overlay_rows` one row per slice, with a colour legend, into ``out_png``.

    Panels shrink so that neither side of the picture exceeds ``max_pixels``.

    Returns:
        ``out_png``, or None when there is no test case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = overlay_rows(module, datamodule, count, class_names, max_cases, rows_per_case)
    if not rows:
        return None
    height, width = rows[0][1][0].shape[:2]
    panel_width, panel_height, titles, title_heights, figure_height = _overlay_layout(
        [title for title, _ in rows], height, width, max_pixels
    )
    fig = plt.figure(figsize=(3 * panel_width + 0.3, figure_height))
    grid = fig.add_gridspec(2 * len(rows), 3, height_ratios=[r for h in title_heights for r in (h, panel_height)])
    for row, (title, (_, pictures)) in enumerate(zip(titles, rows)):
        head = fig.add_subplot(grid[2 * row, :])
        head.axis("off")
        head.text(0.5, 0.5, title, ha="center", va="center", fontsize=8, transform=head.transAxes)
        for col, (name, picture) in enumerate(zip(("image", "ground truth", "prediction"), pictures)):
            axis = fig.add_subplot(grid[2 * row + 1, col])
            # Smoothed when a panel is drawn smaller than the slice, pixel blocks when larger.
            axis.imshow(picture, interpolation="antialiased")
            axis.set_title(name, fontsize=7)
            axis.axis("off")
    return save_with_organ_legend(fig, class_names, out_png)


def save_organ_dice_chart(organs: Mapping[str, Mapping[str, Any]], out_png: Path) -> Optional[Path]:
    """Horizontal bars of each organ's mean test Dice, annotated ``0.91`` and, where the
    prediction was empty in some of the cases holding the organ, ``(missed in k/n)``.

    Args:
        organs: ``summarize_volume_scores(...)["organs"]``: name -> ``dice``, ``cases``,
            ``missed`` and ``class_index`` (for the organ's colour).

    Returns:
        ``out_png``, or None when there is no organ.
    """
    if not organs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(organs)
    fig, axis = plt.subplots(figsize=(6.4, 0.9 + 0.36 * len(names)))
    for position, name in enumerate(names):
        scores = organs[name]
        dice = scores.get("dice")
        measured = dice is not None and not (isinstance(dice, float) and math.isnan(dice))
        colour = _ORGAN_COLOURS[int(scores.get("class_index", position + 1)) % len(_ORGAN_COLOURS)]
        axis.barh(position, float(dice) if measured else 0.0, color=colour, edgecolor="black", linewidth=0.5)
        text = f"{float(dice):.3f}" if measured else "no test case holds it"
        if int(scores.get("missed") or 0) > 0:
            text += f" (missed in {int(scores['missed'])}/{int(scores.get('cases') or 0)})"
        axis.text((float(dice) if measured else 0.0) + 0.01, position, text, va="center", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.35)  # room for the annotations
    axis.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    axis.set_xlabel("Dice (mean over the test cases holding the organ)")
    axis.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _save_prompt_pictures(
    module: Any,
    datamodule: Any,
    count: int,
    out_png: Path,
    class_names: Sequence[str],
) -> Optional[Path]:
    """Image with the prompts drawn, ground truth and prediction for the ``count`` slices (at
    most ``OVERLAY_ROWS_PER_CASE``) of the first test volume with the most organs, one row per slice.

    Args:
        module: An interactive segmentation task (:mod:`vpt.tasks.interactive`): has ``prompt``
            and ``predict_with_ground_truth_prompts(slices, label) -> (prompts, masks)``.
        datamodule: As for :func:`save_segmentation_overlays`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    volume = first_test_volume(datamodule)
    if volume is None:
        return None
    slices, label = volume
    organs_per_slice = torch.stack([(label == c).flatten(1).any(1) for c in range(1, len(class_names))]).sum(0)
    rows = min(count, OVERLAY_ROWS_PER_CASE, len(label))  # one case: a few slices, not a strip
    chosen = torch.argsort(organs_per_slice, descending=True, stable=True)[:rows].sort().values
    prompts, masks = module.predict_with_ground_truth_prompts(slices[chosen], label[chosen])
    size = tuple(label.shape[-2:])
    scale = torch.tensor([slices.shape[-1] / size[1], slices.shape[-2] / size[0]])
    mean, std = np.asarray(datamodule.mean), np.asarray(datamodule.std)

    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.6 * len(chosen)), squeeze=False)
    for row, index in enumerate(chosen.tolist()):
        image = slices[index].float().numpy() * std[:, None, None] + mean[:, None, None]
        gray = np.clip(image[0], 0, 1)
        if gray.shape != size:
            gray = torch.from_numpy(gray)[None, None]
            gray = F.interpolate(gray, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        mine = (prompts.image_index == row).nonzero().flatten()
        predicted = np.zeros(size, dtype=np.int64)
        for prompt in mine.tolist():  # overlapping masks: the higher class index is drawn on top
            predicted[masks[prompt].numpy()] = int(prompts.organ[prompt])
        axes[row, 0].imshow(np.repeat(gray[..., None], 3, -1), interpolation="nearest")
        for prompt in mine.tolist():
            colour = _ORGAN_COLOURS[int(prompts.organ[prompt]) % len(_ORGAN_COLOURS)]
            if prompts.boxes is not None:
                x0, y0, x1, y1 = (prompts.boxes[prompt].reshape(2, 2) / scale).flatten().tolist()
                axes[row, 0].add_patch(
                    matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1)
                )
            else:
                x, y = (prompts.points[prompt, 0] / scale).tolist()
                axes[row, 0].plot([x], [y], marker="*", color=colour, markersize=7, markeredgecolor="white")
        axes[row, 0].set_title(f"{module.prompt} prompts (slice {index})", fontsize=8)
        axes[row, 1].imshow(_overlay(gray, label[index].numpy()), interpolation="nearest")
        axes[row, 1].set_title("ground truth", fontsize=8)
        axes[row, 2].imshow(_overlay(gray, predicted), interpolation="nearest")
        axes[row, 2].set_title("prediction", fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    return save_with_organ_legend(fig, class_names, out_png)
