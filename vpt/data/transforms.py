"""Image transforms for classification: augmentation, resizing and normalisation.

The input size and the normalisation statistics belong to the backbone, so they are always
passed in by the caller (from the model's pretrained config), never chosen here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import albumentations as A
import torch
from albumentations.pytorch import ToTensorV2
from lightning.pytorch.utilities import rank_zero_only

from vpt.errors import ConfigError

__all__ = ["build_transforms", "reseed_worker_transform", "to_size"]

_logger = logging.getLogger(__name__)

# Crops smaller than this lose too much of the object in small medical or synthetic images.
_TRAIN_CROP_SCALE = (0.6, 1.0)


def to_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Turn an image size given as one side or as ``(height, width)`` into ``(height, width)``.

    Args:
        image_size: One side for a square image, or ``(height, width)``.

    Returns:
        ``(height, width)`` as positive ints.
    """
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(
            f"Image size {image_size!r} is not valid; give one positive int or a (height, width) pair."
        )
    return size  # type: ignore[return-value]


def build_transforms(
    image_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augment: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """Build the albumentations pipeline that turns an RGB image into a normalised tensor.

    Training with ``augment`` takes a random resized crop (60-100% of the area) and a random
    horizontal flip; otherwise the image is resized to ``image_size`` without cropping, so
    evaluation sees the whole image.

    Args:
        image_size: Output side, or ``(height, width)``; the backbone's input size.
        mean: Per-channel mean in [0, 1] units, from the backbone's pretrained config.
        std: Per-channel standard deviation in [0, 1] units, from the backbone's config.
        train: Whether the pipeline is for training (random) or evaluation (deterministic).
        augment: Whether training uses random crops and flips; ``False`` resizes only.
        seed: Seed for the pipeline's own random generator (albumentations ignores global
            seeds); ``None`` draws one from the operating system.

    Returns:
        A ``Compose`` called as ``pipeline(image=array)`` with a ``(H, W, 3)`` uint8 RGB
        array; its ``"image"`` entry is a float32 tensor of shape ``(3, height, width)``.
    """
    height, width = to_size(image_size)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"Normalisation mean {mean} / std {std} is not valid; give three values each, std > 0."
        )
    if train and augment:
        geometry: list[A.BasicTransform] = [
            A.RandomResizedCrop(size=(height, width), scale=_TRAIN_CROP_SCALE),
            A.HorizontalFlip(p=0.5),
        ]
    else:
        geometry = [A.Resize(height, width)]
    return A.Compose(
        [*geometry, A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()],
        seed=seed,
    )


def reseed_worker_transform(worker_id: int) -> None:
    """``DataLoader`` ``worker_init_fn`` that gives each worker its own augmentation stream.

    Albumentations keeps its random generator inside the ``Compose``, and every worker gets
    a copy of the same generator state, so without this all workers (and, without persistent
    workers, all epochs) would draw the same crops and flips. Torch's per-worker seed differs
    per worker and per epoch and follows ``lightning.seed_everything``.

    Args:
        worker_id: Index of the worker process (unused; the seed comes from torch).
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, A.BaseCompose):
        # torch's worker seed is the same on every DDP process (seed_everything): mix in the rank.
        rank = int(getattr(rank_zero_only, "rank", 0) or 0)
        transform.set_random_seed((info.seed + 7919 * rank) % 2**32)
