"""Class probabilities of 2D images with a classification run, preprocessed as its testing was.

Each image is read as 8-bit RGB (:func:`vpt.data.classification.read_rgb`) and goes through
the run's evaluation transform (:func:`vpt.data.transforms.build_transforms` with
``train=False``: resize to the input size, normalise); the probabilities are the softmax of
the network's logits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from vpt.data.classification import read_rgb
from vpt.data.transforms import build_transforms

__all__ = ["ImageClassifier"]

_logger = logging.getLogger(__name__)


class ImageClassifier:
    """Batched image classification.

    Args:
        model: Images ``(B, 3, H, W)`` -> logits ``(B, C)`` (the run's network, in eval mode).
        device: Where ``model`` lives.
        image_size: ``(H, W)`` the model takes.
        mean: Normalisation mean per RGB channel, [0, 1] units.
        std: Normalisation standard deviation per RGB channel.
        autocast: Returns the precision context the run was tested under.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        autocast: Callable[[], ContextManager[Any]],
    ) -> None:
        self.model = model
        self.device = device
        self.transform = build_transforms(image_size, mean, std, train=False)
        self.autocast = autocast

    def model_inputs(self, paths: Sequence[Path]) -> torch.Tensor:
        """Read and preprocess images.

        Args:
            paths: Image files.

        Returns:
            float32 ``(B, 3, H, W)``.

        Raises:
            DataError: A missing, corrupt or non-image file.
        """
        return torch.stack([self.transform(image=read_rgb(path))["image"] for path in paths])

    @torch.inference_mode()
    def probabilities(self, paths: Sequence[Path]) -> np.ndarray:
        """Class probabilities of a batch of images (the caller batches).

        Args:
            paths: Image files.

        Returns:
            float32 ``(B, C)``, each row summing to 1.
        """
        with self.autocast():
            logits = self.model(self.model_inputs(paths).to(self.device))
        return logits.float().softmax(dim=1).cpu().numpy()
