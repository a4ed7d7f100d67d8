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
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vpt.atomic import atomic_path, atomic_write_text
from vpt.errors import ConfigError

__all__ = [
    "check_folder_writable",
    "check_run_dir",
    "write_json",
    "plot_curves",
    "save_classification_preview",
    "save_segmentation_overlays",
    "first_test_volume",
    "save_with_organ_legend",
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
    if run_dir.exists() and any(run_dir.iterdir()) and not os.access(run_dir, os.W_OK):
        raise ConfigError(f"Run folder {run_dir} is read-only for this user; choose a writable hydra.run.dir.")


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


def _read_csv_log(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning CSVLogger rows -> {metric: [(step, value), ...]} (epoch-level rows use epoch)."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_curves(metrics_csv: Path, out_png: Path) -> Optional[Path]:
    """Loss and metric curves from the CSV log, one panel per family (loss, acc, ...)."""
    if not metrics_csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_csv_log(metrics_csv)
    families: dict[str, list[str]] = {}
    for key in sorted(series):
        name = key.split("/", 1)[-1]
        if key.startswith("lr"):  # LearningRateMonitor: lr-<Optimizer>/pg<N>
            family = "learning rate"
        else:
            family = "loss" if "loss" in name else name.split("_")[0]
        families.setdefault(family, []).append(key)
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for axis, (family, keys) in zip(axes[0], families.items()):
        for key in keys:
            steps, values = zip(*series[key])
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        axis.set_title(family)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out_png


def _denormalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, H, W) normalised -> (N, H, W, 3) in [0, 1]."""
    images = images * np.asarray(std)[None, :, None, None] + np.asarray(mean)[None, :, None, None]
    return np.clip(images.transpose(0, 2, 3, 1), 0.0, 1.0)


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
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out_png


_ORGAN_COLOURS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]],
    dtype=np.float32,
) / 255.0


def _overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A grey slice (H, W) in [0, 1] with label colours blended in -> (H, W, 3)."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    colours = _ORGAN_COLOURS[labels % len(_ORGAN_COLOURS)]
    mask = (labels > 0)[..., None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def save_with_organ_legend(fig: Any, class_names: Sequence[str], out_png: Path) -> Path:
    """Add the organ colour legend (background left out) under ``fig``, save it and close it."""
    import matplotlib.patches
    import matplotlib.pyplot as plt

    handles = [
        matplotlib.patches.Patch(color=_ORGAN_COLOURS[i % len(_ORGAN_COLOURS)], label=name)
        for i, name in enumerate(class_names) if i > 0
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_png


def first_test_volume(datamodule: Any) -> Optional[tuple[Any, Any]]:
    """Slices (D, 3, H, W) and label volume (D, H0, W0) of the first test case, or None."""
    batch = next(iter(datamodule.test_dataloader()), None)
    if batch is None:
        return None
    slices, label = batch["image"], batch["label"]
    if slices.ndim == 5:  # a batch of one case
        slices, label = slices[0], label[0]
    return slices, label


def save_segmentation_overlays(
    module: Any, datamodule: Any, count: int, out_png: Path, class_names: Sequence[str]
) -> Optional[Path]:
    """Image, ground truth and prediction for the ``count`` most labelled slices of the
    first test volume, one row per slice, with a colour legend.

    Args:
        module: Has ``predict_volume(slices (D, 3, H, W), out_size) -> (D, H0, W0)``.
        datamodule: Its ``test_dataloader()`` yields one volume per batch with ``image``
            (1, D, 3, H, W) and ``label`` (1, D, H0, W0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    volume = first_test_volume(datamodule)
    if volume is None:
        return None
    slices, label = volume
    foreground = (label > 0).flatten(1).sum(1)
    chosen = torch.argsort(foreground, descending=True)[: min(count, len(foreground))].sort().values
    prediction = module.predict_volume(slices[chosen], tuple(label.shape[-2:]))
    mean, std = np.asarray(datamodule.mean), np.asarray(datamodule.std)
    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.6 * len(chosen)), squeeze=False)
    for row, index in enumerate(chosen.tolist()):
        image = slices[index].float().cpu().numpy() * std[:, None, None] + mean[:, None, None]
        gray = np.clip(image[0], 0, 1)
        size = tuple(label.shape[-2:])
        if gray.shape != size:  # show the image at the label's resolution
            gray = torch.nn.functional.interpolate(
                torch.from_numpy(gray)[None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0].numpy()
        truth = label[index].cpu().numpy()
        for col, (title, picture) in enumerate(
            [("image", np.repeat(gray[..., None], 3, -1)), ("ground truth", _overlay(gray, truth)),
             ("prediction", _overlay(gray, prediction[row].numpy()))]
        ):
            axes[row, col].imshow(picture, interpolation="nearest")
            axes[row, col].set_title(f"{title} (slice {index})" if col == 0 else title, fontsize=8)
            axes[row, col].axis("off")
    return save_with_organ_legend(fig, class_names, out_png)


def _save_prompt_pictures(
    module: Any,
    datamodule: Any,
    count: int,
    out_png: Path,
    class_names: Sequence[str],
) -> Optional[Path]:
    """Image with the prompts drawn, ground truth and prediction for the ``count`` slices of the
    first test volume with the most organs, one row per slice.

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
    chosen = torch.argsort(organs_per_slice, descending=True, stable=True)[: min(count, len(label))].sort().values
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
