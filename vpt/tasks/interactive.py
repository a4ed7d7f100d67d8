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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn
from torchmetrics import MeanMetric

from vpt.errors import ConfigError, DataError
from vpt.heads import decode_masks
from vpt.metrics.segmentation import DEFAULT_NSD_TOLERANCE, metric_definitions, summarize_volume_scores, volume_scores
from vpt.tasks.base import OptimizationMixin, TrainableCheckpointMixin, check_finite_loss
from vpt.tasks.optim import OptimizerConfig, SchedulerConfig
from vpt.tasks.registry import TaskParts, register_task
from vpt.tasks.segmentation import build_prompted_sam, check_data_folder

__all__ = [
    "PROMPT_KINDS",
    "GroundTruthPrompts",
    "ground_truth_prompts",
    "SamSingleMaskDecoder",
    "InteractiveSamSegmenter",
    "InteractiveSegmentationTask",
    "mask_boxes",
    "jitter_boxes",
    "random_foreground_points",
    "interior_points",
    "binary_dice_loss",
    "mask_dice",
    "score_volume_prompts",
    "build_interactive_segmentation",
]

_logger = logging.getLogger(__name__)

PROMPT_KINDS = ("box", "point")
_TARGET_CHUNK = 64  # prompts whose organ masks are cut from the labels at once


# ----------------------------------------------------------------------------------------------
# SAM prompts from the ground truth


@dataclass
class GroundTruthPrompts:
    """One SAM prompt per (slice, organ) pair, with the organ's mask it asks for.

    Attributes:
        image_index: (P,) int64, the slice (row of the label batch) each prompt belongs to.
        organ: (P,) int64, the organ's class index.
        targets: (P, H, W) bool, the organ's mask at the labels' resolution.
        boxes: (P, 4) float32 ``(x0, y0, x1, y1)`` in model-input pixels (corners are pixel
            indices, inclusive), or None for point prompts.
        points: (P, 1, 2) float32 ``(x, y)`` in model-input pixels, or None for box prompts.
    """

    image_index: torch.Tensor
    organ: torch.Tensor
    targets: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None

    @property
    def count(self) -> int:
        return int(self.image_index.shape[0])

    def select(self, rows: torch.Tensor) -> "GroundTruthPrompts":
        """The prompts at ``rows`` ((K,) indices or a (P,) bool mask)."""
        return GroundTruthPrompts(
            image_index=self.image_index[rows],
            organ=self.organ[rows],
            targets=self.targets[rows],
            boxes=self.boxes[rows] if self.boxes is not None else None,
            points=self.points[rows] if self.points is not None else None,
        )


def ground_truth_prompts(
    labels: torch.Tensor,
    kind: str,
    rng: Optional[np.random.Generator] = None,
    max_per_slice: Optional[int] = None,
    box_jitter: float = 0.0,
    input_size: Optional[tuple[int, int]] = None,
) -> GroundTruthPrompts:
    """Boxes or points for the organs of a batch of label slices.

    With ``rng`` (training) the organs of a crowded slice are sampled, boxes are jittered and
    points are drawn uniformly from the organ. Without it (evaluation) everything is
    deterministic: the first ``max_per_slice`` organs by class index, exact boxes, and the
    organ pixel farthest from its boundary.

    Args:
        labels: (B, H, W) integer class indices, background 0.
        kind: ``"box"`` or ``"point"``.
        rng: Random source for training prompts, or None for evaluation prompts.
        max_per_slice: Most prompts per slice; None for one per organ present.
        box_jitter: Largest move of each box side, as a fraction of the box's width (x sides) or
            height (y sides); only with ``rng``.
        input_size: (H_in, W_in) of the model input the coordinates are for, when the labels
            have another resolution; coordinates are scaled by ``H_in / H`` and ``W_in / W``.

    Returns:
        The prompts, ordered by slice, then organ; on the device of ``labels``.
    """
    if kind not in PROMPT_KINDS:
        raise ConfigError(f"task.prompt must be one of {PROMPT_KINDS}, got {kind!r}.")
    if labels.ndim != 3:
        raise DataError(f"Labels for prompts must be (B, H, W), got shape {tuple(labels.shape)}.")
    _, height, width = labels.shape
    device = labels.device
    pairs = _present_organs(labels)
    if max_per_slice is not None:
        pairs = _cap_per_slice(pairs, max_per_slice, rng)
    image_index, organ = pairs[:, 0].to(device), pairs[:, 1].to(device)
    targets = torch.empty(len(pairs), height, width, dtype=torch.bool, device=device)
    # In chunks: a whole test volume's labels[image_index] would be an int64 copy per prompt.
    for start in range(0, len(pairs), _TARGET_CHUNK):
        rows = slice(start, start + _TARGET_CHUNK)
        targets[rows] = labels[image_index[rows]] == organ[rows, None, None]
    prompts = GroundTruthPrompts(image_index=image_index, organ=organ, targets=targets)
    if prompts.count == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        if kind == "box":
            prompts.boxes = empty.reshape(0, 4)
        else:
            prompts.points = empty.reshape(0, 1, 2)
        return prompts

    scale_y, scale_x = 1.0, 1.0
    if input_size is not None:
        scale_y, scale_x = input_size[0] / height, input_size[1] / width
    if kind == "box":
        boxes = mask_boxes(targets)
        if rng is not None and box_jitter > 0:
            boxes = jitter_boxes(boxes, box_jitter, (height, width), rng)
        prompts.boxes = boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    else:
        points = random_foreground_points(targets, rng) if rng is not None else interior_points(targets)
        prompts.points = (points * points.new_tensor([scale_x, scale_y])).unsqueeze(1)
    return prompts


def _present_organs(labels: torch.Tensor) -> torch.Tensor:
    """(K, 2) int64 ``(slice, organ)`` pairs on the CPU, for each organ present in each slice."""
    if labels.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    flat = labels.flatten(1).long()
    present = torch.zeros(labels.shape[0], int(flat.max()) + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    present[:, 0] = False
    return present.nonzero().cpu()


def _cap_per_slice(pairs: torch.Tensor, cap: int, rng: Optional[np.random.Generator]) -> torch.Tensor:
    """At most ``cap`` pairs per slice: a random choice with ``rng``, else the lowest class indices."""
    if cap < 1:
        raise ConfigError(f"task.max_prompts_per_slice must be 1 or more (or null for all), got {cap}.")
    keep = []
    for image in pairs[:, 0].unique().tolist():
        rows = (pairs[:, 0] == image).nonzero().flatten()
        if len(rows) > cap:
            chosen = np.sort(rng.choice(len(rows), cap, replace=False)) if rng is not None else np.arange(cap)
            rows = rows[torch.from_numpy(chosen)]
        keep.append(rows)
    return pairs[torch.cat(keep)] if keep else pairs


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of non-empty masks.

    Args:
        masks: (P, H, W) bool, each with at least one True pixel.

    Returns:
        (P, 4) float32 ``(x0, y0, x1, y1)``: the first and last column and row holding the
        mask (inclusive pixel indices, as MedSAM takes them).
    """
    rows = masks.any(dim=2).to(torch.uint8)  # (P, H)
    cols = masks.any(dim=1).to(torch.uint8)  # (P, W)
    y0 = rows.argmax(dim=1)
    y1 = rows.shape[1] - 1 - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = cols.shape[1] - 1 - cols.flip(1).argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def jitter_boxes(
    boxes: torch.Tensor, jitter: float, image_size: tuple[int, int], rng: np.random.Generator
) -> torch.Tensor:
    """Move each side of each box by up to ``jitter`` times the box's extent, inside the image.

    Args:
        boxes: (P, 4) ``(x0, y0, x1, y1)`` inclusive pixel indices.
        jitter: Largest move as a fraction of the width (x sides) or height (y sides), which
            count pixels inclusively (a one-pixel box is 1 wide).
        image_size: (H, W); the sides are clipped to ``[0, W - 1]`` and ``[0, H - 1]``.
        rng: Draws the moves, uniformly in ``[-jitter, jitter]`` times the extent.

    Returns:
        (P, 4) float32 boxes with ``x0 <= x1`` and ``y0 <= y1``.
    """
    height, width = image_size
    extent = torch.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], dim=1).repeat(1, 2)
    moves = torch.from_numpy(rng.uniform(-jitter, jitter, size=tuple(boxes.shape))).to(boxes)
    moved = boxes + moves * extent
    x = moved[:, 0::2].clamp(0, width - 1)
    y = moved[:, 1::2].clamp(0, height - 1)
    # Sides that crossed swap back, so the box stays a box.
    x, _ = x.sort(dim=1)
    y, _ = y.sort(dim=1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def random_foreground_points(masks: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One pixel of each mask drawn uniformly: (P, H, W) bool -> (P, 2) float32 ``(x, y)``."""
    generator = torch.Generator(device=masks.device).manual_seed(int(rng.integers(2**62)))
    flat = torch.multinomial(masks.flatten(1).float(), 1, generator=generator).squeeze(1)
    width = masks.shape[-1]
    return torch.stack([flat % width, flat // width], dim=1).float()


def interior_points(masks: torch.Tensor) -> torch.Tensor:
    """The pixel of each mask farthest from its boundary (Euclidean distance transform).

    Inside a non-convex organ this stays on the organ, where the centroid may not. Computed
    on the CPU within each mask's bounding box.

    Args:
        masks: (P, H, W) bool, each non-empty.

    Returns:
        (P, 2) float32 ``(x, y)`` on the masks' device.
    """
    boxes = mask_boxes(masks).long().tolist()
    masks_cpu = masks.cpu().numpy()
    points = []
    for mask, (x0, y0, x1, y1) in zip(masks_cpu, boxes):
        # One pixel of background around the crop, so the image border counts as boundary.
        crop = np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], 1)
        distance = ndimage.distance_transform_edt(crop)
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        points.append((x0 + x - 1, y0 + y - 1))
    return torch.tensor(points, dtype=torch.float32, device=masks.device).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# Model


class SamSingleMaskDecoder(nn.Module):
    """SAM's frozen prompt encoder and its mask decoder in single-mask mode.

    As segment-anything's ``MaskDecoder`` with ``multimask_output=False``: the IoU token and all
    mask tokens go through the two-way transformer, and mask token 0 with its hypernetwork makes
    the mask. The IoU head and the other hypernetworks are left out, since nothing here uses
    or trains them.

    Args:
        prompt_encoder: segment-anything's ``PromptEncoder``; frozen. Stored as
            ``sam_prompt_encoder`` so that it is not mistaken for VPT prompts.
        mask_decoder: segment-anything's ``MaskDecoder``; its transformer, upscaling, tokens and
            first hypernetwork are used (trainable unless frozen by the caller).
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.sam_prompt_encoder = prompt_encoder
        self.sam_prompt_encoder.requires_grad_(False)
        self.transformer = mask_decoder.transformer
        self.output_upscaling = mask_decoder.output_upscaling
        tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
        self.output_tokens = nn.Parameter(tokens.detach().clone())
        self.hypernetworks = nn.ModuleList([mask_decoder.output_hypernetworks_mlps[0]])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mask logits for one prompt per image embedding.

        Args:
            image_embeddings: (P, C, h, w), one row per prompt.
            boxes: (P, 4) ``(x0, y0, x1, y1)`` in input pixels, or None.
            points: (P, N, 2) ``(x, y)`` positive clicks in input pixels, or None.

        Returns:
            (P, 4h, 4w) mask logits.
        """
        if boxes is None and points is None:
            raise ConfigError("SAM needs a box or a point per mask; set task.prompt to box or point.")
        clicks = None
        if points is not None:
            clicks = (points, torch.ones(points.shape[:2], dtype=torch.int64, device=points.device))
        sparse, dense = self.sam_prompt_encoder(points=clicks, boxes=boxes, masks=None)
        image_pe = self.sam_prompt_encoder.get_dense_pe()
        masks = decode_masks(self, image_embeddings, image_pe, self.output_tokens, self.hypernetworks, sparse, dense)
        return masks[:, 0]


class InteractiveSamSegmenter(nn.Module):
    """Prompted SAM image encoder -> SAM's prompt-driven mask decoder.

    Args:
        encoder: A :class:`~vpt.prompts.sam.PromptedSamEncoder`.
        decoder: A :class:`SamSingleMaskDecoder`.
    """

    def __init__(self, encoder: nn.Module, decoder: SamSingleMaskDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(
        self,
        images: torch.Tensor,
        image_index: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mask logits for prompts on a batch of images.

        Each image that has a prompt is encoded once; every prompt decodes against the
        embedding of its own image.

        Args:
            images: (B, 3, H, W).
            image_index: (P,) int64, the image of each prompt.
            boxes: (P, 4) boxes in input pixels, or None.
            points: (P, N, 2) positive points in input pixels, or None.

        Returns:
            (P, H/4, W/4) mask logits.
        """
        used, rows = torch.unique(image_index, return_inverse=True)
        embeddings = self.encoder(images[used])
        return self.decoder(embeddings[rows], boxes=boxes, points=points)


# ----------------------------------------------------------------------------------------------
# Loss and scores


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


def mask_dice(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """2D Dice ``2|P ∩ G| / (|P| + |G|)`` of each binary mask.

    Args:
        predictions: (P, H, W) bool.
        targets: (P, H, W) bool, each non-empty (every prompt has its organ).

    Returns:
        (P,) float32.
    """
    intersection = (predictions & targets).flatten(1).sum(1).float()
    total = (predictions.flatten(1).sum(1) + targets.flatten(1).sum(1)).float()
    return 2.0 * intersection / total.clamp_min(1.0)


def score_volume_prompts(
    prompts: GroundTruthPrompts,
    predictions: torch.Tensor,
    label: torch.Tensor,
    spacing: Optional[Sequence[float]] = None,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
) -> tuple[dict[int, list[float]], dict[int, dict[str, float]]]:
    """2D Dice of each prompt and 3D scores of each organ for one test volume.

    Args:
        prompts: The volume's prompts (``image_index`` = slice position); ``targets`` at the
            label's resolution.
        predictions: (P, H0, W0) bool, the mask of each prompt.
        label: (D, H0, W0) the volume's class indices.
        spacing: (z, y, x) voxel size for HD95, or None for voxels.
        nsd_tolerance: Normalised Surface Dice tolerance (mm, or voxels without spacing).

    Returns:
        ``{organ: [2D Dice of each of its prompts]}`` and ``{organ: volume_scores' entry}``
        for the organs present in ``label``, where the organ's 3D mask holds its prompt masks
        on their slices and nothing elsewhere.
    """
    dice_2d = mask_dice(predictions, prompts.targets)
    per_prompt: dict[int, list[float]] = {}
    per_organ: dict[int, dict[str, float]] = {}
    label = label.cpu()
    for organ in prompts.organ.unique().tolist():
        rows = (prompts.organ == organ).nonzero().flatten()
        per_prompt[organ] = dice_2d[rows].tolist()
        slices = prompts.image_index[rows].cpu()
        first, last = int(slices.min()), int(slices.max())
        # Every slice holding the organ has a prompt, so this slab holds all of the organ, and
        # the crop changes neither Dice nor HD95 (outside the slab both masks are empty).
        predicted = torch.zeros(last - first + 1, *label.shape[-2:], dtype=torch.uint8)
        predicted[slices - first] = predictions[rows].cpu().to(torch.uint8)
        truth = (label[first : last + 1] == organ).to(torch.uint8)
        # volume_shape: a missed organ's HD95 penalty is the whole volume's diagonal, not the slab's.
        per_organ[organ] = volume_scores(
            predicted.numpy(), truth.numpy(), 2, spacing=spacing, nsd_tolerance=nsd_tolerance,
            volume_shape=tuple(label.shape[-3:]),
        )[1]
    return per_prompt, per_organ


# ----------------------------------------------------------------------------------------------
# Lightning module


class InteractiveSegmentationTask(TrainableCheckpointMixin, OptimizationMixin, L.LightningModule):
    """Training on ground-truth SAM prompts, per-prompt Dice validation, per-slice and 3D testing.

    Args:
        model: An :class:`InteractiveSamSegmenter`.
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
        model: InteractiveSamSegmenter,
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
        self.log("train/loss", loss, prog_bar=True, batch_size=prompts.count)
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
            was_training = self.training
            self.eval()
            _save_prompt_pictures(self, datamodule, num_pictures, run_dir / "test_prompts.png", self.class_names)
            self.train(was_training)
        return extras


def _save_prompt_pictures(
    module: InteractiveSegmentationTask,
    datamodule: Any,
    count: int,
    out_png: Path,
    class_names: Sequence[str],
) -> Optional[Path]:
    """Image with the prompts drawn, ground truth and prediction for the ``count`` slices of the
    first test volume with the most organs, one row per slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The overlay colours of the automatic task's pictures, so the two read the same.
    from vpt.runs import _ORGAN_COLOURS, _overlay, first_test_volume, save_with_organ_legend

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


# ----------------------------------------------------------------------------------------------
# Builder


def _build_interactive_sam(cfg: DictConfig) -> tuple[InteractiveSamSegmenter, dict[str, Any]]:
    """The prompted SAM encoder and single-mask decoder, and the data settings SAM expects."""
    sam, encoder, data = build_prompted_sam(cfg)
    decoder = SamSingleMaskDecoder(sam.prompt_encoder, sam.mask_decoder)
    decoder.requires_grad_(bool(cfg.task.get("train_decoder", True)))
    decoder.sam_prompt_encoder.requires_grad_(False)  # SAM's prompt encoder never trains here
    return InteractiveSamSegmenter(encoder, decoder), data


@register_task("interactive_segmentation")
def build_interactive_segmentation(cfg: DictConfig) -> TaskParts:
    """SAM encoder -> VPT prompts -> SAM prompt encoder + mask decoder -> volume data -> task."""
    from vpt.data.registry import build_datamodule

    task_cfg = cfg.task
    family = cfg.model.get("family", "timm")
    if family != "sam":
        raise ConfigError(
            f"Model {cfg.model.name!r} is a {family} model, but interactive prompts need a SAM model, e.g. "
            "model=sam_vit_b (use task=organ_seg for automatic segmentation with this one)."
        )
    prompt = str(task_cfg.get("prompt", "box"))
    if prompt not in PROMPT_KINDS:
        raise ConfigError(f"task.prompt must be one of {PROMPT_KINDS}, got {prompt!r}.")
    check_data_folder(task_cfg)
    class_names = list(task_cfg.class_names)
    model, data = _build_interactive_sam(cfg)
    datamodule = build_datamodule(OmegaConf.to_container(task_cfg.data, resolve=True), num_classes=len(class_names), **data)
    cap = task_cfg.get("max_prompts_per_slice", 4)
    module = InteractiveSegmentationTask(
        model,
        class_names=class_names,
        prompt=prompt,
        box_jitter=float(task_cfg.get("box_jitter", 0.1)),
        max_prompts_per_slice=int(cap) if cap is not None else None,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        ce_weight=float(task_cfg.loss.ce_weight),
        dice_weight=float(task_cfg.loss.dice_weight),
        eval_batch_size=int(task_cfg.get("eval_batch_size", 16)),
        nsd_tolerance=float(task_cfg.get("nsd_tolerance", DEFAULT_NSD_TOLERANCE)),
        seed=int(cfg.get("seed", 0)),
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
