"""Interactive SAM segmentation: one binary mask per organ from a box or point taken from the ground truth.

This is the interactive mode of the SAM adaptations to medical images (MedSAM, SAM-Med2D),
with VPT prompt tokens in SAM's frozen image encoder. Two kinds of prompt meet here:
*VPT prompts* are learned tokens inside the image encoder (:class:`PromptedSamEncoder`);
*SAM prompts* are the boxes and points that SAM's (frozen) prompt encoder embeds for its mask
decoder. The SAM prompts are made from the ground truth, so the task asks "given where the
organ is, draw its outline", not "find the organs".

Training (``task.prompt: box`` or ``point``): for each training slice and each organ in its
mask, up to ``task.max_prompts_per_slice`` organs chosen at random (seeded by the run seed and
the step), one prompt:

- ``box``: the organ's bounding box in model-input pixels, each side moved at random by up to
  ``task.box_jitter`` times the box's width (x sides) or height (y sides), then clipped to the
  image, as MedSAM and SAM-Med2D perturb their training boxes;
- ``point``: a foreground pixel of the organ drawn uniformly, labelled positive.

The encoder runs once per slice; each prompt decodes against its own slice's embedding with
SAM's single-mask output (``multimask_output=False``: all output tokens attend, mask token 0
makes the mask). The loss is ``ce_weight`` x binary cross-entropy + ``dice_weight`` x soft Dice,
per prompt, on the mask logits upsampled bilinearly to the input resolution.

Evaluation uses prompts without randomness: the exact bounding box, or for points the organ
pixel farthest from the organ's boundary (the first click of SAM's and RITM's evaluations).
Validation logs ``val/dice``, the mean over prompts of the 2D Dice of each thresholded mask.

Testing, as MedSAM and SAM-Med2D report interactive results: every slice of every test volume
and every organ present in that slice's ground truth gets one evaluation prompt of the trained
kind (with the default ``box``: the exact bounding box, taken from the original-resolution label
and scaled to the input size as segment-anything's ``ResizeLongestSide`` does); the mask logits
are resized bilinearly to the original slice size and thresholded at 0. Then

- ``test/dice``: per organ, the mean over all its prompts (slices, over all test volumes) of the
  2D Dice ``2|P ∩ G| / (|P| + |G|)`` of the prompt's mask against the organ's ground truth on
  that slice (0 for an empty mask); then the mean over organs. ``test/per_organ`` gives each
  organ's mean, its number of prompts and how many of them scored 0 (``missed_slices``);
- ``test/dice_3d`` and ``test/hd95``: per test volume and organ, the slice masks stacked into a
  3D mask (empty on slices where the organ has no ground truth, since those get no prompt) and
  scored with :func:`vpt.metrics.volume_scores`; per organ the mean over volumes, then the mean
  over organs (:func:`vpt.metrics.summarize_volume_scores`). HD95 is in mm when every test
  volume has a spacing, else in voxels (``test/hd95_unit``).

All of these are upper bounds for automatic segmentation: the ground truth tells the model on
which slices each organ is and roughly where, and a 3D mask cannot have false positives outside
the organ's slices. Do not compare them with the automatic task's (``task.name: segmentation``)
numbers.

The pieces live with their kind: the prompts from the ground truth in
:mod:`vpt.data.medical.prompt_geometry`, SAM's single-mask head in :mod:`vpt.heads.sam_single_mask`,
the 2D and 3D scores in :mod:`vpt.metrics.interactive` and the test pictures in :mod:`vpt.runs`.
This module composes them: the model, its loss, the LightningModule and its builder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from vpt.data.medical.prompt_geometry import PROMPT_KINDS, GroundTruthPrompts, ground_truth_prompts
from vpt.errors import ConfigError
from vpt.metrics.interactive import mask_dice, score_volume_prompts
from vpt.metrics.segmentation import DEFAULT_NSD_TOLERANCE, metric_definitions, summarize_volume_scores
from vpt.tasks.base import OptimizationMixin, TrainableCheckpointMixin, check_finite_loss
from vpt.tasks.optim import OptimizerConfig, SchedulerConfig
from vpt.tasks.registry import TaskParts, register_task
from vpt.tasks.segmentation import plan_segmentation_data

__all__ = [
    "InteractiveSegmentationTask",
    "binary_dice_loss",
    "build_interactive_segmentation",
]

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Loss


def binary_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss of each mask, averaged over masks.

    Args:
        logits: (P, H, W) mask logits.
        targets: (P, H, W) bool or {0, 1} masks.
    """
    probs = logits.float().sigmoid()
    targets = targets.to(probs.dtype)
    intersection = (probs * targets).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + targets.flatten(1).sum(1)
    return 1.0 - ((2 * intersection + smooth) / (total + smooth)).mean()


# ----------------------------------------------------------------------------------------------
# Lightning module


class InteractiveSegmentationTask(TrainableCheckpointMixin, OptimizationMixin, L.LightningModule):
    """Training on ground-truth SAM prompts, per-prompt Dice validation, per-slice and 3D testing.

    Args:
        model: A :class:`~vpt.models.InteractiveSamSegmenter`.
        class_names: Names by class index, background first.
        prompt: ``"box"`` or ``"point"``.
        box_jitter: Largest training move of a box side, as a fraction of the box's extent.
        max_prompts_per_slice: Most training prompts per slice; None for all organs.
        optimizer: Optimiser settings.
        scheduler: Warm-up and cosine settings.
        ce_weight: Weight of binary cross-entropy in the loss.
        dice_weight: Weight of soft Dice in the loss.
        eval_batch_size: Slices per encoder pass when predicting a test volume.
        nsd_tolerance: Normalised Surface Dice tolerance (mm, or voxels without spacing).
        seed: Seeds the choice of training prompts (with the step).
        backbone_id: Names the frozen encoder; checkpoints of another are refused.
        hparams: The resolved config as plain containers.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        prompt: str = "box",
        box_jitter: float = 0.1,
        max_prompts_per_slice: Optional[int] = 4,
        optimizer: Optional[dict[str, Any]] = None,
        scheduler: Optional[dict[str, Any]] = None,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        eval_batch_size: int = 16,
        nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
        seed: int = 0,
        backbone_id: str = "",
        hparams: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if prompt not in PROMPT_KINDS:
            raise ConfigError(f"task.prompt must be one of {PROMPT_KINDS}, got {prompt!r}.")
        if not 0 <= box_jitter < 1:
            raise ConfigError(f"task.box_jitter must be in [0, 1) (a fraction of the box size), got {box_jitter}.")
        if max_prompts_per_slice is not None and max_prompts_per_slice < 1:
            raise ConfigError(
                f"task.max_prompts_per_slice must be 1 or more (or null for all organs), got {max_prompts_per_slice}."
            )
        self.save_hyperparameters(hparams or {})
        self.model = model
        self.class_names = list(class_names)
        self.prompt = prompt
        self.box_jitter = float(box_jitter)
        self.max_prompts_per_slice = max_prompts_per_slice
        self.optimizer_config = OptimizerConfig(**(optimizer or {}))
        self.scheduler_config = SchedulerConfig(**(scheduler or {}))
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.eval_batch_size = eval_batch_size
        self.nsd_tolerance = float(nsd_tolerance)
        self.seed = int(seed)
        self.backbone_id = backbone_id
        self.train_dice = MeanMetric()
        self.val_dice = MeanMetric()
        self.prompt_dice: dict[int, list[float]] = {}
        self.case_scores: dict[str, dict[int, dict[str, float]]] = {}
        self.spacing_known = True
        self.report: dict[str, Any] = {}

    def forward(self, images: torch.Tensor, prompts: GroundTruthPrompts) -> torch.Tensor:
        """Mask logits at the input resolution, (P, H, W), for prompts on images (B, 3, H, W)."""
        logits = self.model(images, prompts.image_index, boxes=prompts.boxes, points=prompts.points)
        return F.interpolate(logits.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        return self.ce_weight * bce + self.dice_weight * binary_dice_loss(logits, targets)

    def training_prompts(self, labels: torch.Tensor, batch_idx: int) -> GroundTruthPrompts:
        """Random prompts for a training batch, reproducible from the seed, rank, step and batch."""
        rng = np.random.default_rng([self.seed, self.global_rank, self.global_step, batch_idx])
        return ground_truth_prompts(
            labels, self.prompt, rng=rng, max_per_slice=self.max_prompts_per_slice, box_jitter=self.box_jitter
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Optional[torch.Tensor]:
        images, labels = batch["image"], batch["mask"]
        prompts = self.training_prompts(labels, batch_idx)
        if prompts.count == 0:  # slices without organs: nothing to prompt, the step is skipped
            return None
        logits = self(images, prompts)
        loss = self._loss(logits, prompts.targets)
        check_finite_loss(loss, self.global_step)
        self.train_dice.update(mask_dice(logits.detach() > 0, prompts.targets))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=prompts.count)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_dice.update_count:
            self.log("train/dice", self.train_dice.compute())
        self.train_dice.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels = batch["image"], batch["mask"]
        prompts = ground_truth_prompts(labels, self.prompt)
        if prompts.count == 0:
            return
        logits = self(images, prompts)
        self.val_dice.update(mask_dice(logits > 0, prompts.targets))
        loss = self._loss(logits, prompts.targets)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=prompts.count)

    def on_validation_epoch_end(self) -> None:
        if self.val_dice.update_count == 0:  # no validation slice held an organ
            if not self.trainer.sanity_checking:
                _logger.warning("No validation slice holds an organ, so val/dice is NaN; check the validation labels.")
            self.log("val/dice", float("nan"), prog_bar=True)
        else:
            self.log("val/dice", self.val_dice.compute(), prog_bar=True)
        self.val_dice.reset()

    @torch.no_grad()
    def predict_with_ground_truth_prompts(
        self, slices: torch.Tensor, label: torch.Tensor
    ) -> tuple[GroundTruthPrompts, torch.Tensor]:
        """A mask for every (slice, organ) of a volume, prompted from its label.

        Args:
            slices: (D, 3, H, W) model-ready slices.
            label: (D, H0, W0) class indices at the original resolution.

        Returns:
            The prompts (``image_index`` = slice position, ``targets`` at (H0, W0),
            coordinates in input pixels) and their masks, (P, H0, W0) bool, on the CPU.
        """
        label = label.cpu()
        prompts = ground_truth_prompts(label, self.prompt, input_size=tuple(slices.shape[-2:]))
        masks = torch.zeros(prompts.count, *label.shape[-2:], dtype=torch.bool)
        for start in range(0, slices.shape[0], self.eval_batch_size):
            stop = min(start + self.eval_batch_size, slices.shape[0])
            rows = ((prompts.image_index >= start) & (prompts.image_index < stop)).nonzero().flatten()
            if len(rows) == 0:
                continue
            chunk = prompts.select(rows)
            logits = self.model(
                slices[start:stop].to(self.device),
                (chunk.image_index - start).to(self.device),
                boxes=chunk.boxes.to(self.device) if chunk.boxes is not None else None,
                points=chunk.points.to(self.device) if chunk.points is not None else None,
            )
            logits = F.interpolate(
                logits.float().unsqueeze(1), size=label.shape[-2:], mode="bilinear", align_corners=False
            )
            masks[rows] = (logits[:, 0] > 0).cpu()
        return prompts, masks

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A test item is a whole volume: keep it on the host (as the automatic segmentation task does);
        # predict_with_ground_truth_prompts moves slices a chunk at a time.
        if self.trainer is not None and self.trainer.testing:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self.prompt_dice = {}
        self.case_scores = {}
        self.spacing_known = True

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "label" not in batch:
            raise ConfigError(
                "Interactive segmentation is tested on whole volumes; pass the data module's test_dataloader() "
                "(or dataloader(split, volumes=True))."
            )
        slices, label = batch["image"], batch["label"]
        if slices.ndim == 5:  # a batch of one case
            slices, label = slices[0], label[0]
        case = batch["case"][0] if isinstance(batch["case"], (list, tuple)) else batch["case"]
        spacing_values: Optional[tuple[float, ...]] = None
        if batch.get("spacing") is not None:
            values = torch.as_tensor(batch["spacing"]).reshape(-1)[-3:].tolist()
            if all(math.isfinite(v) for v in values):
                spacing_values = tuple(float(v) for v in values)
        if spacing_values is None:
            self.spacing_known = False
        prompts, masks = self.predict_with_ground_truth_prompts(slices, label)
        per_prompt, per_organ = score_volume_prompts(prompts, masks, label, spacing_values, self.nsd_tolerance)
        for organ, values in per_prompt.items():
            self.prompt_dice.setdefault(organ, []).extend(values)
        self.case_scores[str(case)] = per_organ

    def on_test_epoch_end(self) -> None:
        unit = "mm" if self.spacing_known else "voxels"
        volume_summary = summarize_volume_scores(self.case_scores, self.class_names, unit=unit)
        organs: dict[str, dict[str, Any]] = {}
        for organ in sorted(self.prompt_dice):
            name = self.class_names[organ]
            values = self.prompt_dice[organ]
            volume = volume_summary["organs"].get(name, {})
            organs[name] = {
                "class_index": organ,
                "dice": float(np.mean(values)),
                "prompts": len(values),
                "dice_3d": volume.get("dice", float("nan")),
                "hd95": volume.get("hd95", float("nan")),
                "hd95_penalised": volume.get("hd95_penalised", float("nan")),
                "nsd": volume.get("nsd", float("nan")),
                "missed": volume.get("missed", 0),
                "cases": volume.get("cases", 0),
                "missed_slices": int(sum(value == 0.0 for value in values)),
            }
        dice = float(np.mean([entry["dice"] for entry in organs.values()])) if organs else float("nan")
        self.report = {
            "summary": {
                "dice": dice,
                "dice_3d": volume_summary["dice"],
                "hd95": volume_summary["hd95"],
                "hd95_penalised": volume_summary["hd95_penalised"],
                "nsd": volume_summary["nsd"],
                "hd95_unit": unit,
                "organs": organs,
            },
            "cases": self.case_scores,
        }
        logged = {
            "test/dice": dice,
            "test/dice_3d": volume_summary["dice"],
            "test/hd95": volume_summary["hd95"],
            "test/hd95_penalised": volume_summary["hd95_penalised"],
            "test/nsd": volume_summary["nsd"],
        }
        for key, value in logged.items():
            if not math.isnan(value):
                self.log(key, float(value), batch_size=1)

    @torch.no_grad()
    def write_report(self, run_dir: Path, datamodule: L.LightningDataModule, num_pictures: int) -> dict[str, Any]:
        """Per-organ table for metrics.json and pictures of prompted test slices."""
        summary = self.report.get("summary", {})
        extras: dict[str, Any] = {
            "test/prompt": f"{self.prompt} from the ground truth of every slice holding the organ (upper bound)",
            "test/hd95_unit": summary.get("hd95_unit"),
            "test/nsd_tolerance": self.nsd_tolerance,
            "test/metric_definitions": metric_definitions(self.nsd_tolerance, summary.get("hd95_unit") or "mm"),
            "test/per_organ": summary.get("organs"),
            "test/cases": {
                case: {self.class_names[k]: v for k, v in scores.items()}
                for case, scores in self.report.get("cases", {}).items()
            },
        }
        if num_pictures > 0:
            from vpt.runs import _save_prompt_pictures

            was_training = self.training
            self.eval()
            _save_prompt_pictures(self, datamodule, num_pictures, run_dir / "test_prompts.png", self.class_names)
            self.train(was_training)
        return extras


# ----------------------------------------------------------------------------------------------
# Builder


@register_task("interactive_segmentation")
def build_interactive_segmentation(cfg: DictConfig) -> TaskParts:
    """SAM encoder -> method -> SAM prompt encoder + mask decoder -> volume data -> task."""
    from vpt.data.registry import build_datamodule
    from vpt.families import family_named
    from vpt.models import build_interactive

    task_cfg = cfg.task
    family = family_named(cfg.model.family).name
    family_named(family).require("interactive_segmentation", cfg.model.name)
    prompt = str(task_cfg.prompt)
    if prompt not in PROMPT_KINDS:
        raise ConfigError(f"task.prompt must be one of {PROMPT_KINDS}, got {prompt!r}.")
    class_names = plan_segmentation_data(task_cfg)
    model, data = build_interactive(cfg)
    datamodule = build_datamodule(OmegaConf.to_container(task_cfg.data, resolve=True), num_classes=len(class_names), **data)
    geometry = getattr(datamodule, "geometry", None)
    if geometry is not None and geometry.tiled:
        raise ConfigError(
            "Interactive segmentation prompts whole slices; remove task.data.spacing and task.data.patch_size "
            "(tiles are for task=organ_seg / volume_seg)."
        )
    cap = task_cfg.max_prompts_per_slice
    module = InteractiveSegmentationTask(
        model,
        class_names=class_names,
        prompt=prompt,
        box_jitter=float(task_cfg.box_jitter),
        max_prompts_per_slice=int(cap) if cap is not None else None,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        ce_weight=float(task_cfg.loss.ce_weight),
        dice_weight=float(task_cfg.loss.dice_weight),
        eval_batch_size=int(task_cfg.eval_batch_size),
        nsd_tolerance=float(task_cfg.nsd_tolerance),
        seed=int(cfg.seed),
        backbone_id=f"{cfg.model.name}@{cfg.model.img_size or 'default'}",
        hparams=OmegaConf.to_container(cfg, resolve=True),
    )
    metadata = {
        "task": "interactive_segmentation",
        "prompt": prompt,
        "backbone": cfg.model.name,
        "family": family,
        "method": cfg.method.name,
        "num_classes": len(class_names),
        "class_names": class_names,
        "input_size": list(data["image_size"]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
    }
    return TaskParts(module=module, datamodule=datamodule, model=model, metadata=metadata)
