"""SAM prompts from the ground truth: boxes and points derived from label masks.

Interactive segmentation (:mod:`vpt.tasks.interactive`) asks SAM for one organ's mask given a
box or a point on it. Those prompts are made from the label slices, jittered or sampled at
random for training and exact for evaluation, so they are a view of the data and live with
it; the task only decides when to ask for which kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from vpt.errors import ConfigError, DataError

__all__ = [
    "PROMPT_KINDS",
    "GroundTruthPrompts",
    "ground_truth_prompts",
    "mask_boxes",
    "jitter_boxes",
    "random_foreground_points",
    "interior_points",
]

PROMPT_KINDS = ("box", "point")
_TARGET_CHUNK = 64  # prompts whose organ masks are cut from the labels at once


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
