"""A generated shape-classification set: no download, deterministic, learnable in minutes.

Each image is one filled shape (disk, square, triangle, cross, ring or bar) with random
colour, size and position on a noisy, striped background of a contrasting random colour.
Small images (32 x 32 by default) are drawn with numpy and resized to the backbone's input
size by the usual transforms, so smoke tests and tutorials run end to end offline.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vpt.data.classification import ArrayDataset, ClassificationDataModule, Item, Transform
from vpt.errors import ConfigError

__all__ = ["SHAPE_NAMES", "generate_shapes", "SyntheticShapesDataModule"]

_logger = logging.getLogger(__name__)

# Chosen to stay distinct at 32 x 32: solid round, solid corners, one slanted pair of edges,
# thin orthogonal arms, a hole, and a wide flat bar.
SHAPE_NAMES = ("disk", "square", "triangle", "cross", "ring", "bar")

_MIN_SIZE = 8


def _shape_masks(
    shape: str, size: int, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray
) -> np.ndarray:
    """Masks of one shape kind for several images at once.

    Args:
        shape: One of ``SHAPE_NAMES``.
        size: Image side in pixels.
        cx: Shape centre x per image, shape ``(n,)``.
        cy: Shape centre y per image, shape ``(n,)``.
        radius: Half the shape's extent per image, shape ``(n,)``.

    Returns:
        Boolean masks of shape ``(n, size, size)``.
    """
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    dx = np.abs(coords[None, None, :] - cx[:, None, None])
    dy = np.abs(coords[None, :, None] - cy[:, None, None])
    r = radius[:, None, None]
    # Thin parts are at least one pixel thick, or they vanish at small sizes.
    thickness = np.maximum(0.25 * r, 1.0)
    if shape == "disk":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (dx <= r) & (dy <= r)
    if shape == "triangle":
        # Apex up: the half-width grows from 0 at the top edge to r at the bottom edge.
        depth = coords[None, :, None] - (cy[:, None, None] - r)
        return (depth >= 0) & (depth <= 2 * r) & (dx <= depth / 2)
    if shape == "cross":
        return ((dx <= thickness) & (dy <= r)) | ((dy <= thickness) & (dx <= r))
    if shape == "ring":
        distance = dx**2 + dy**2
        return (distance <= r**2) & (distance >= (0.55 * r) ** 2)
    if shape == "bar":
        return (dx <= r) & (dy <= thickness)
    raise ConfigError(f"Shape {shape!r} is not known; use one of {', '.join(SHAPE_NAMES)}.")


def generate_shapes(
    num_classes: int = 4, samples_per_class: int = 200, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the synthetic shapes images, balanced over classes, in shuffled order.

    Args:
        num_classes: Number of shape kinds, 2 to 6 (the first of ``SHAPE_NAMES``).
        samples_per_class: Images per shape kind.
        size: Image side in pixels (8 or more).
        seed: Seed of everything random; the same arguments give identical arrays.

    Returns:
        ``(images, labels)``: uint8 RGB images of shape ``(N, size, size, 3)`` and int64
        labels of shape ``(N,)`` with ``N = num_classes * samples_per_class``.
    """
    if not 2 <= num_classes <= len(SHAPE_NAMES):
        raise ConfigError(f"num_classes={num_classes} is not available; use 2 to {len(SHAPE_NAMES)} shapes.")
    if samples_per_class < 1 or size < _MIN_SIZE:
        raise ConfigError(
            f"samples_per_class={samples_per_class}, size={size} are too small; "
            f"use at least 1 sample per class and a size of {_MIN_SIZE} or more."
        )
    rng = np.random.default_rng(seed)
    n = num_classes * samples_per_class
    labels = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), samples_per_class))

    # Background and shape sit in opposite brightness bands so every shape stays visible.
    dark_background = rng.random(n) < 0.5
    background_colour = rng.uniform(0, 100, (n, 3))
    shape_colour = rng.uniform(155, 255, (n, 3))
    background_colour[~dark_background] += 155
    shape_colour[~dark_background] -= 155

    radius = rng.uniform(0.22, 0.4, n) * size
    cx = rng.uniform(radius + 1, size - 1 - radius)
    cy = rng.uniform(radius + 1, size - 1 - radius)

    masks = np.zeros((n, size, size), dtype=bool)
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        masks[members] = _shape_masks(SHAPE_NAMES[label], size, cx[members], cy[members], radius[members])

    # Stripes of random direction and frequency, so the background is textured, not flat.
    coords = np.arange(size, dtype=np.float32)
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    frequency = rng.uniform(0.3, 1.2, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    along = np.cos(angle) * coords[None, None, :] + np.sin(angle) * coords[None, :, None]
    stripes = 15.0 * np.sin(frequency * along + phase)

    images = np.where(
        masks[..., None],
        shape_colour[:, None, None, :],
        background_colour[:, None, None, :] + stripes[..., None],
    )
    images += rng.normal(0.0, 8.0, images.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


class SyntheticShapesDataModule(ClassificationDataModule):
    """Generated shape images (see ``generate_shapes``) split by the base fractions.

    The class names are the shape names and are known at construction. Images are drawn at
    ``source_size`` and resized to ``image_size`` by the transforms.

    Args:
        num_classes: Number of shape kinds, 2 to 6.
        samples_per_class: Images per shape kind, before splitting.
        source_size: Side of the generated images in pixels.
        **kwargs: ``ClassificationDataModule`` arguments (image size, normalisation,
            batch size, seed, fractions, ...); ``seed`` seeds the images and the split.
    """

    def __init__(
        self, num_classes: int = 4, samples_per_class: int = 200, source_size: int = 32, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 2 <= num_classes <= len(SHAPE_NAMES):
            raise ConfigError(f"num_classes={num_classes} is not available; use 2 to {len(SHAPE_NAMES)} shapes.")
        self.num_shapes = int(num_classes)
        self.samples_per_class = int(samples_per_class)
        self.source_size = int(source_size)
        self._images: np.ndarray | None = None

    def _scan(self) -> list[str]:
        return list(SHAPE_NAMES[: self.num_shapes])

    def _load_items(self) -> dict[str, list[Item]]:
        images, labels = generate_shapes(self.num_shapes, self.samples_per_class, self.source_size, self.seed)
        self._images = images
        return {"train": [(index, int(label)) for index, label in enumerate(labels)]}

    def _make_dataset(self, items: list[Item], transform: Transform) -> Dataset:
        assert self._images is not None, "setup() generates the images before datasets are built"
        indices = np.asarray([index for index, _ in items], dtype=np.int64)
        labels = np.asarray([label for _, label in items], dtype=np.int64)
        return ArrayDataset(self._images[indices], labels, transform)
