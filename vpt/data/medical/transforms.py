"""Slice transforms for segmentation: one geometric transform for image and mask, then RGB input.

Slices arrive in [0, 1] (windowed CT, or 8-bit images scaled); the backbone wants three
channels normalised with its own mean and standard deviation, so a grey slice is replicated
to RGB after the geometric transform (warping one channel costs a third of warping three).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from vpt.data.transforms import to_size
from vpt.errors import ConfigError

__all__ = ["build_segmentation_transforms", "to_model_input"]

_logger = logging.getLogger(__name__)

# Small enough to stay anatomically plausible: patients lie within a few degrees of straight
# and vary in size by about this much. No flips: left and right organs are different classes.
_ROTATE_DEGREES = (-15.0, 15.0)
_SCALE = (0.85, 1.15)
_TRANSLATE = (-0.05, 0.05)


def build_segmentation_transforms(
    image_size: int | tuple[int, int],
    train: bool,
    augment: bool = True,
    seed: int | None = None,
    crop_size: tuple[int, int] | None = None,
) -> A.Compose:
    """Build the albumentations pipeline applied to an image slice and its mask together.

    Training with ``augment`` applies a random affine transform (rotation within 15 degrees,
    scale 0.85-1.15, shift up to 5%; outside the slice becomes 0 = air/background) and a
    mild brightness/contrast change to the image only, then resizes. Evaluation only resizes.
    Masks always use nearest-neighbour interpolation, so class indices stay whole.

    Args:
        image_size: Output side, or ``(height, width)``; the backbone's input size.
        train: Whether the pipeline is for training (random) or evaluation (deterministic).
        augment: Whether training uses random transforms; ``False`` resizes only.
        seed: Seed for the pipeline's own random generator; ``None`` draws one from the OS.
        crop_size: Training on tiles: a random ``(h, w)`` crop (a third of them centred on a
            labelled pixel, as nnU-Net oversamples foreground) after the affine change and
            before the resize; the slice must be at least this large. Evaluation crops its
            tiles itself, so this only acts when ``train``.

    Returns:
        A ``Compose`` called as ``pipeline(image=image, mask=mask)`` with image float32
        ``(H, W)`` or ``(H, W, 3)`` in [0, 1] and mask uint8/uint16 ``(H, W)``; it returns
        both at ``image_size`` as numpy arrays.
    """
    height, width = to_size(image_size)
    steps: list[A.BasicTransform] = []
    if train and augment:
        steps += [
            A.Affine(
                scale=_SCALE,
                rotate=_ROTATE_DEGREES,
                translate_percent=_TRANSLATE,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.8,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    if train and crop_size is not None:
        crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
        steps.append(
            A.OneOf([A.CropNonEmptyMaskIfExists(crop_h, crop_w, p=1 / 3), A.RandomCrop(crop_h, crop_w, p=2 / 3)], p=1.0)
        )
    # INTER_NEAREST samples floor(x * scale), shifting masks against the (centre-aligned) image;
    # INTER_NEAREST_EXACT samples pixel centres.
    steps.append(A.Resize(height, width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST_EXACT))
    return A.Compose(steps, seed=seed)


def to_model_input(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Turn a [0, 1] slice into the backbone's normalised RGB input.

    Args:
        image: float ``(H, W)`` (grey, replicated to three channels) or ``(H, W, 3)``.
        mean: Per-channel mean in [0, 1] units (the backbone's).
        std: Per-channel standard deviation in [0, 1] units (the backbone's).

    Returns:
        float32 tensor ``(3, H, W)``.
    """
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"Normalisation mean {tuple(mean)} / std {tuple(std)} is not valid; give three values each, std > 0."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor.unsqueeze(0).expand(3, -1, -1) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((tensor - mean_tensor) / std_tensor).contiguous()
