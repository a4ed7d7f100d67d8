"""Interactive segmentation scores: 2D Dice of each prompted mask and 3D scores per organ.

One prompt asks for one organ on one slice, so its mask is scored alone (:func:`mask_dice`);
a test volume's prompt masks are also stacked per organ and scored in 3D with
:func:`vpt.metrics.segmentation.volume_scores` (:func:`score_volume_prompts`). They sit with
the other metrics so that the task only collects and logs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from vpt.metrics.segmentation import DEFAULT_NSD_TOLERANCE, volume_scores

if TYPE_CHECKING:  # only for the annotation: metrics need not import the data package
    from vpt.data.medical.prompt_geometry import GroundTruthPrompts

__all__ = ["mask_dice", "score_volume_prompts"]


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
