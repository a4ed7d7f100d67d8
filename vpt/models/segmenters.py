"""The networks the segmentation tasks train: an adapted encoder and a decoder.

Each takes its parts in the constructor (built by :mod:`vpt.models.build`); the encoder is
whatever :func:`vpt.apply_method` returned, so nothing here depends on the method.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vpt.heads import SamMulticlassDecoder

__all__ = ["SamSegmenter", "VitSegmenter", "InteractiveSamSegmenter"]


class SamSegmenter(nn.Module):
    """Prompted SAM image encoder -> multi-class mask decoder.

    Args:
        encoder: A :class:`~vpt.prompts.sam.PromptedSamEncoder`.
        decoder: A :class:`~vpt.heads.SamMulticlassDecoder`.
    """

    def __init__(self, encoder: nn.Module, decoder: SamMulticlassDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> class logits (B, C, H/4, W/4)."""
        return self.decoder(self.encoder(images))


class VitSegmenter(nn.Module):
    """Prompted timm ViT -> segmentation decoder.

    Args:
        encoder: A :class:`~vpt.prompts.PromptedViT` (its classifier is unused).
        decoder: A decoder of feature grids (``reads_grids``): :class:`~vpt.heads.MultiLevelDecoder`
            (the grids of several blocks and the image; logits at the input size) or, on Hiera,
            :class:`~vpt.heads.Sam2MulticlassDecoder` (the four stage grids; logits at 1/4); or the light
            :class:`~vpt.heads.PatchTokenDecoder` (last block only; logits at 4x the patch grid).
        zero_features: A control: the decoder gets zeros instead of the encoder's features,
            so a run measures what the decoder does alone.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, zero_features: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.zero_features = zero_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> class logits (B, C, H, W) (multi-level) or (B, C, 4 H/p, 4 W/p) (light)."""
        if getattr(self.decoder, "reads_grids", False):
            grids = self.encoder.forward_intermediates(images, self.decoder.blocks)
            if self.zero_features:
                grids = [torch.zeros_like(grid) for grid in grids]
            return self.decoder(grids, images)
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens :]
        if self.zero_features:
            tokens = torch.zeros_like(tokens)
        patch = self.encoder.vit.patch_embed.patch_size
        grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
        return self.decoder(tokens, grid)


class InteractiveSamSegmenter(nn.Module):
    """Prompted SAM image encoder -> SAM's prompt-driven mask decoder (or SAM2's on Hiera).

    Args:
        encoder: A :class:`~vpt.prompts.sam.PromptedSamEncoder`, or a
            :class:`~vpt.prompts.hiera.PromptedHiera`.
        decoder: A :class:`~vpt.heads.SamSingleMaskDecoder`, or (Hiera) a
            :class:`~vpt.heads.sam2_decoder.Sam2SingleMaskDecoder`, which reads stage grids.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
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
        if getattr(self.decoder, "reads_grids", False):  # SAM2's decoder reads Hiera's stage grids
            grids = self.encoder.forward_intermediates(images[used])
            return self.decoder(grids, boxes=boxes, points=points, rows=rows)
        embeddings = self.encoder(images[used])
        return self.decoder(embeddings[rows], boxes=boxes, points=points)
