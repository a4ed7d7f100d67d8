"""A light segmentation decoder on the patch tokens of a (prompted) timm ViT."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchTokenDecoder"]


class _UpBlock(nn.Sequential):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            # Replicated edges, as in the multi-level decoder: a zero border makes the outer
            # cells of every slice answer differently from the same content inside.
            nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, padding_mode="replicate", bias=False),
            nn.GroupNorm(min(8, channels_out), channels_out),
            nn.GELU(),
        )


class PatchTokenDecoder(nn.Module):
    """Patch tokens -> class logits at 4x the patch grid (SETR-style progressive upsampling,
    kept small: a projection and two upsampling blocks).

    Args:
        embed_dim: Token width of the encoder.
        num_classes: Classes including background.
        hidden_dim: Channels after the projection; halved by each upsampling block.
    """

    def __init__(self, embed_dim: int, num_classes: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(embed_dim, hidden_dim, kernel_size=1), nn.GELU())
        self.up = nn.Sequential(_UpBlock(hidden_dim, hidden_dim // 2), _UpBlock(hidden_dim // 2, hidden_dim // 4))
        self.classify = nn.Conv2d(hidden_dim // 4, num_classes, kernel_size=1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, h*w, D) on a ``grid`` of (h, w) -> logits (B, num_classes, 4h, 4w)."""
        batch, length, dim = tokens.shape
        if length != grid[0] * grid[1]:
            raise ValueError(f"{length} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        x = tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])
        return self.classify(self.up(self.project(x)))
