"""Predict with a finished run on unlabelled data: volumes, DICOM series, 2D images.

What is written to the output folder, per input (see :mod:`vpt.inference.inputs` for what
an input can be):

- segmentation, a volume ``<name><ext>``: the label volume ``<name><ext>`` in the same
  format (``.nii.gz`` stays ``.nii.gz``) on the input's exact grid (size, spacing, origin
  and direction copied from the input image); with ``save_probabilities`` also
  ``<name>_probabilities<ext>``, a float32 vector image of the same geometry whose voxel
  holds the C class probabilities (``sitk.GetArrayFromImage`` gives ``(z, y, x, C)``);
- segmentation, a DICOM series folder ``<folder>``: the same as ``<folder>.nii.gz``;
- segmentation, a 2D image ``<name>.<ext>``: ``<name>_mask.png`` (class indices, 8-bit),
  ``<name>_overlay.png`` (the classes in colour over the image); with
  ``save_probabilities`` also ``<name>_probabilities.npz`` (``probabilities``, float32
  ``(H, W, C)``);
- classification: one ``predictions.csv`` with columns ``path``, ``predicted`` and one
  probability column per class name; with several prompt files (:func:`predict_bank`) one
  ``predictions_<task>.csv`` per file, all from one encoder pass per batch.

Every planned file is checked before the model is built; none may exist (and none is ever
replaced), and no two inputs may map to one output.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TypeVar

import torch
from tqdm import tqdm

from vpt.data.classification import read_rgb
from vpt.data.medical.io import check_volume_complete
from vpt.errors import ConfigError, DataError
from vpt.inference.classification import ImageClassifier
from vpt.inference.images import (
    write_mask_png,
    write_overlay_png,
    write_probability_npz,
)
from vpt.inference.inputs import PredictionInput, find_inputs
from vpt.inference.loading import LoadedRun, rebuild_run, run_config
from vpt.inference.outputs import check_outputs_free, write_new_files
from vpt.inference.segmentation import SegmentationPreprocessing, SlicePredictor
from vpt.inference.volumes import (
    INPUT_CHANNEL,
    read_input_volume,
    volume_array,
    volume_output_files,
    write_label_volume,
    write_probability_volume,
)
from vpt.runs import check_folder_writable

__all__ = ["PREDICTIONS_CSV", "predict", "predict_bank"]

_logger = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"

T = TypeVar("T")


@dataclass
class _Outputs:
    """The files one input will write; ``mask`` first, then the rest in writing order."""

    mask: Path
    overlay: Optional[Path] = None
    probabilities: Optional[Path] = None
    all_files: list[Path] = field(default_factory=list)


def _plan_segmentation(item: PredictionInput, out_dir: Path, probabilities: bool) -> _Outputs:
    if item.kind == "image":
        plan = _Outputs(out_dir / f"{item.name}_mask.png", out_dir / f"{item.name}_overlay.png")
        if probabilities:
            plan.probabilities = out_dir / f"{item.name}_probabilities.npz"
        plan.all_files = [path for path in (plan.mask, plan.overlay, plan.probabilities) if path is not None]
        return plan
    plan = _Outputs(out_dir / f"{item.name}{item.suffix}")
    plan.all_files = volume_output_files(plan.mask)
    if probabilities:
        plan.probabilities = out_dir / f"{item.name}_probabilities{item.suffix}"
        plan.all_files += volume_output_files(plan.probabilities)
    return plan


def _check_distinct(plans: dict[PredictionInput, _Outputs]) -> None:
    """Two inputs that would write one file (``a.png`` and ``a.jpg``) stop the run up front."""
    owner: dict[Path, PredictionInput] = {}
    for item, plan in plans.items():
        for path in plan.all_files:
            if path in owner:
                raise DataError(
                    f"Inputs {owner[path].path} and {item.path} would both write {path}; rename one of them "
                    "or predict them into separate output folders."
                )
            owner[path] = item


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _bar(progress: Optional[bool], **options: Any) -> tqdm:
    # disable=None lets tqdm show the bar only on a terminal.
    return tqdm(disable=None if progress is None else not progress, dynamic_ncols=True, **options)


def _segment(
    run: LoadedRun,
    plans: dict[PredictionInput, _Outputs],
    batch_size: int,
    save_probabilities: bool,
    progress: Optional[bool],
) -> list[Path]:
    preprocessing = SegmentationPreprocessing.from_preprocessing(run.preprocessing)
    predictor = SlicePredictor(run.parts.model, run.device, batch_size, run.autocast)
    volumes = [item for item in plans if item.kind != "image"]
    images = [item for item in plans if item.kind == "image"]
    written: list[Path] = []
    with _bar(progress, total=len(plans), desc="cases", unit="case") as cases:
        for item in volumes:
            plan = plans[item]
            image = read_input_volume(item)
            unit = preprocessing.unit_volume(volume_array(image, item), item.name, str(item.path))
            with _bar(progress, total=unit.shape[0], desc=item.name, unit="slice", leave=False) as slices:
                spacing = tuple(image.GetSpacing())  # (x, y[, z]) mm
                labels, scores = predictor.predict_volume(
                    unit, preprocessing, save_probabilities, slices.update, spacing=(spacing[1], spacing[0])
                )
            written += write_label_volume(labels, image, plan.mask)
            if scores is not None and plan.probabilities is not None:
                written += write_probability_volume(scores, image, plan.probabilities)
            cases.update(1)
        # 2D images of any sizes share forward passes; each is resized back to its own size.
        for chunk in _batches(images, batch_size):
            pictures = [read_rgb(item.path) for item in chunk]
            results = predictor.predict_images(
                [preprocessing.unit_image(rgb) for rgb in pictures], preprocessing, save_probabilities
            )
            for item, rgb, (labels, scores) in zip(chunk, pictures, results, strict=True):
                plan = plans[item]
                assert plan.overlay is not None
                written += write_mask_png(labels, plan.mask)
                written += write_overlay_png(rgb, labels, plan.overlay)
                if scores is not None and plan.probabilities is not None:
                    written += write_probability_npz(scores, plan.probabilities)
            cases.update(len(chunk))
    return written


def _classify(
    run: LoadedRun, items: Sequence[PredictionInput], csv_path: Path, batch_size: int, progress: Optional[bool]
) -> list[Path]:
    saved = run.preprocessing
    assert saved is not None
    classifier = ImageClassifier(run.parts.model, run.device, tuple(saved.image_size), saved.mean, saved.std, run.autocast)
    rows: list[list[Any]] = []
    with _bar(progress, total=len(items), desc="images", unit="image") as bar:
        for chunk in _batches(items, batch_size):
            probabilities = classifier.probabilities([item.path for item in chunk])
            if probabilities.shape[1] != len(run.class_names):
                raise ConfigError(
                    f"The model predicts {probabilities.shape[1]} classes but {len(run.class_names)} are named; "
                    "rebuild it with the run's own task.data settings."
                )
            for item, row in zip(chunk, probabilities, strict=True):
                rows.append([str(item.path), run.class_names[int(row.argmax())], *(repr(float(p)) for p in row)])
            bar.update(len(chunk))

    def write(target: Path) -> None:
        with open(target, "w", newline="", encoding="utf-8") as handle:
            table = csv.writer(handle)
            table.writerow(["path", "predicted", *run.class_names])
            table.writerows(rows)

    return write_new_files(csv_path, write)


def _bank_task_names(paths: Sequence[Path]) -> list[str]:
    """A file's stem, or its run folder's name for the usual ``<run>/prompts.safetensors``."""
    stems = [path.stem for path in paths]
    names = stems if len(set(stems)) == len(stems) else [path.parent.name or path.stem for path in paths]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"The weights files {[str(p) for p in paths]} do not have distinct names; rename them so each task's "
            "predictions file can be told apart."
        )
    return names


def predict_bank(
    input_path: str | Path,
    output_dir: Optional[str | Path],
    weights: Sequence[str | Path],
    overrides: Sequence[str] = (),
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    progress: Optional[bool] = None,
) -> list[Path]:
    """Classify images with several trained prompt files on one frozen backbone, every task
    from one encoder pass per batch (a :class:`~vpt.prompts.PromptBank`).

    The backbone and the preprocessing come from the first file's run config; every file
    must be VPT prompts on that backbone with the same method and token count. Writes
    ``predictions_<task>.csv`` per file (task = the file's stem, or its run folder's name
    when the stems repeat, as ``prompts.safetensors`` do), each as :func:`predict` writes
    ``predictions.csv``.

    Raises:
        VptError: files of another backbone / method / token count, a segmentation run, an
            existing output, inputs that are not images.
    """
    from vpt.inference.bank import PromptBank

    if not output_dir:
        raise ConfigError("No output folder given; pass output=<folder> for the predictions.")
    paths = [Path(str(path)).expanduser() for path in weights]
    out_dir = Path(output_dir).expanduser()
    cfg, first = run_config(None, paths[0], overrides)
    if str(cfg.task.name) != "classification":
        raise ConfigError(
            f"{first} is a {cfg.task.name} run; several weights= in one pass work for classification prompt files "
            "(predict segmentation runs one weights file at a time)."
        )
    items = find_inputs(input_path)
    not_images = [item.path for item in items if item.kind != "image"]
    if not_images:
        raise DataError(f"{not_images[0]} is a volume, but prompt banks classify 2D images; pass input=<images>.")
    names = _bank_task_names(paths)
    targets = [out_dir / f"predictions_{name}.csv" for name in names]
    check_folder_writable(out_dir, "output")
    check_outputs_free(targets)
    run = rebuild_run(cfg, first, device)
    bank = PromptBank.from_files(run.parts.model, paths, names=names).to(run.device)
    saved = run.preprocessing
    assert saved is not None
    classifier = ImageClassifier(bank, run.device, tuple(saved.image_size), saved.mean, saved.std, run.autocast)
    class_names = {name: _class_names_of(path) for name, path in zip(names, paths)}
    rows: dict[str, list[list[Any]]] = {name: [] for name in names}
    size = batch_size or run.eval_batch_size(32)
    with _bar(progress, total=len(items), desc="images", unit="image") as bar:
        for chunk in _batches(items, size):
            with torch.inference_mode(), run.autocast():
                logits = bank.forward_all(classifier.model_inputs([item.path for item in chunk]).to(run.device))
            for name, task_logits in logits.items():
                probabilities = task_logits.float().softmax(dim=1).cpu().numpy()
                labels = class_names[name] or [str(i) for i in range(probabilities.shape[1])]
                for item, row in zip(chunk, probabilities, strict=True):
                    rows[name].append([str(item.path), labels[int(row.argmax())], *(repr(float(p)) for p in row)])
            bar.update(len(chunk))
    written: list[Path] = []
    for name, target in zip(names, targets):
        labels = class_names[name] or [str(i) for i in range(len(rows[name][0]) - 2 if rows[name] else 0)]

        def write(path: Path, name: str = name, labels: list[str] = labels) -> None:
            with open(path, "w", newline="", encoding="utf-8") as handle:
                table = csv.writer(handle)
                table.writerow(["path", "predicted", *labels])
                table.writerows(rows[name])

        written += write_new_files(target, write)
    _logger.info("Predicted %d image(s) for %d tasks in one pass per batch; wrote %s.", len(items), len(names), out_dir)
    return written


def _class_names_of(path: Path) -> list[str]:
    from vpt.methods.trained_weights import read_trained_metadata

    names = read_trained_metadata(path).get("class_names")
    return [str(name) for name in names] if isinstance(names, list) else []


def predict(
    input_path: str | Path,
    output_dir: Optional[str | Path],
    run_dir: Optional[str | Path] = None,
    weights: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    save_probabilities: bool = False,
    progress: Optional[bool] = None,
) -> list[Path]:
    """Predict every input with a finished run and write the results (see the module docstring).

    Args:
        input_path: A volume or image file, a folder of them, or a DICOM series folder.
        output_dir: The folder for the results (created; existing files are never replaced).
        run_dir: A finished run folder.
        weights: A trained-weights file (with ``run_dir``: instead of its own; alone: its
            stored config is used).
        overrides: ``key=value`` changes to the run's config (``model.checkpoint=...``).
        batch_size: Slices (or images) per forward pass; ``None`` uses the run's
            evaluation batch size.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; ``None`` picks CUDA when available.
        save_probabilities: Also write class probabilities (segmentation).
        progress: Show progress bars; ``None`` shows them on a terminal only.

    Returns:
        The files written.

    Raises:
        VptError: A missing or unusable input, an existing output, a run that cannot
            predict, weights that do not fit, a bad device (one sentence each, before
            anything is written where it can be known up front).
    """
    if not output_dir:
        raise ConfigError("No output folder given; pass output=<folder> for the predictions.")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is not valid; use 1 or more.")
    out_dir = Path(output_dir).expanduser()
    cfg, weights_path = run_config(run_dir, weights, overrides)
    items = find_inputs(input_path)
    task = str(cfg.task.name)
    check_folder_writable(out_dir, "output")
    if task == "classification":
        not_images = [item.path for item in items if item.kind != "image"]
        if not_images:
            raise DataError(
                f"{not_images[0]} is a volume, but {run_dir or weights_path} classifies 2D images; "
                "pass input=<an image or a folder of images>."
            )
        csv_path = out_dir / PREDICTIONS_CSV
        check_outputs_free([csv_path])
        run = rebuild_run(cfg, weights_path, device)
        size = batch_size or run.eval_batch_size(32)
        written = _classify(run, items, csv_path, size, progress)
    else:
        plans = {item: _plan_segmentation(item, out_dir, save_probabilities) for item in items}
        _check_distinct(plans)
        check_outputs_free([path for plan in plans.values() for path in plan.all_files])
        for item in plans:
            if item.kind == "volume":
                # A damaged scan anywhere in the input stops the command before any mask is written.
                check_volume_complete(item.path, case_id=item.name, channel=INPUT_CHANNEL)
        run = rebuild_run(cfg, weights_path, device)
        size = batch_size or int(getattr(run.parts.module, "eval_batch_size", 16))
        written = _segment(run, plans, size, save_probabilities, progress)
    _logger.info("Predicted %d input(s) with %s; wrote %d file(s) to %s.", len(items), weights_path, len(written), out_dir)
    return written
