"""A multi-level segmentation decoder for (prompted) timm ViTs.

A plain ViT has one resolution: every block sees the same ``H/p x W/p`` patch grid, and
the last block's grid alone (the light :class:`~vpt.heads.PatchTokenDecoder`) cannot
carry structures thinner than a patch. Like DPT (Ranftl et al., 2021) and UNETR
(Hatamizadeh et al., 2022), this decoder reads several blocks (evenly spaced, earliest
to last), reassembles them to a pyramid (early blocks upsampled, the last downsampled),
fuses it top-down, and ends at the input resolution with a skip connection from a small
convolutional stem on the image itself, which sees every pixel.

timm has ``forward_intermediates`` but no decoder of this kind, and ours must take the
prompt-free grids :meth:`vpt.prompts.PromptedViT.forward_intermediates` returns; that is
why it is written here. It stays small next to the encoder (about 0.6 M parameters at
ViT-B width with the default 128 channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpt.errors import ConfigError

__all__ = ["MultiLevelDecoder", "evenly_spaced_blocks"]


def evenly_spaced_blocks(depth: int, levels: int) -> list[int]:
    """``levels`` block indices spread over a ``depth``-block ViT, ending at the last block.

    ViT-B (12 blocks), 4 levels: ``[2, 5, 8, 11]``, the blocks UNETR and DPT read.
    """
    if not 1 <= levels <= depth:
        raise ConfigError(f"A {depth}-block ViT cannot give {levels} decoder levels; set task.decoder_levels to 1..{depth}.")
    return [depth * (level + 1) // levels - 1 for level in range(levels)]


def _conv_unit(channels_in: int, channels_out: int, stride: int = 1) -> nn.Sequential:
    # Replicate, not zero, padding: the inputs are normalised images (MR/CT background, 0 in
    # [0, 1] units, is about -2 after the ImageNet mean/std) and feature maps, so a zero border
    # is a bright frame the convolutions answer to. Zero padding gave an untrained model on an
    # MR-like slice logits up to about 1 off the background's in the outer 4 columns (a lesion
    # stripe along the edge of every slice); replicated edges keep the prediction equivariant to
    # shifts there (tests/test_edge_artefact.py).
    return nn.Sequential(
        nn.Conv2d(
            channels_in, channels_out, kernel_size=3, stride=stride, padding=1, padding_mode="replicate", bias=False
        ),
        nn.GroupNorm(min(8, channels_out), channels_out),
        nn.GELU(),
    )


class _Reassemble(nn.Module):
    """One block's token grid -> a feature map at ``scale`` times the patch grid."""

    def __init__(self, embed_dim: int, channels: int, scale: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.project = nn.Conv2d(embed_dim, channels, kernel_size=1)
        self.scale = scale
        # Strided for the coarser level, a 3x3 smoothing after bilinear upsampling otherwise.
        self.resample = _conv_unit(channels, channels, stride=2 if scale < 1 else 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.norm(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.project(x)
        if self.scale > 1:
            size = (round(grid.shape[-2] * self.scale), round(grid.shape[-1] * self.scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.resample(x)


class MultiLevelDecoder(nn.Module):
    """Several blocks' patch grids + the image -> class logits at the input resolution.

    Args:
        embed_dim: Token width of the encoder, or one width per level (a hierarchical
            encoder such as Hiera widens stage by stage).
        num_classes: Classes including background.
        blocks: The block indices read (see :func:`evenly_spaced_blocks`); the first is
            upsampled most, the last downsampled once. For a hierarchical encoder: the stages.
        hidden_dim: Channels of the pyramid.
        stem_dim: Channels of the full-resolution image stem (and of the final layer).
        in_chans: Channels of the input image.
        image_stem: Join the full-resolution convolutional stem on the image before the
            last layer. Without it the logits come from the encoder's grids alone
            (upsampled), so the decoder cannot segment from intensities by itself.
        scales: How much each level's grid is resized before fusing; by default DPT's 4x,
            2x, 1x, 1/2 of a plain ViT's single grid. A hierarchical encoder's stage grids
            (strides 4/8/16/32) are a pyramid already: pass 1 for each.
    """

    #: The segmenter hands this decoder the encoder's feature grids (not tokens).
    reads_grids = True

    def __init__(
        self,
        embed_dim: int | Sequence[int],
        num_classes: int,
        blocks: Sequence[int],
        hidden_dim: int = 128,
        stem_dim: int = 32,
        in_chans: int = 3,
        image_stem: bool = True,
        scales: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = [int(index) for index in blocks]
        if not self.blocks:
            raise ConfigError("The multi-level decoder needs at least one block; set task.decoder_levels >= 1.")
        levels = len(self.blocks)
        if scales is None:
            # Four levels: 4x, 2x, 1x and 1/2 the patch grid, as DPT reassembles ViT-B.
            scales = [2.0 ** (levels - 2 - level) for level in range(levels)] if levels > 1 else [1.0]
        widths = [int(embed_dim)] * levels if isinstance(embed_dim, int) else [int(width) for width in embed_dim]
        if len(widths) != levels or len(scales) != levels:
            raise ConfigError(f"The decoder reads {levels} levels but got {len(widths)} widths and {len(scales)} scales.")
        self.reassemble = nn.ModuleList(
            _Reassemble(width, hidden_dim, float(scale)) for width, scale in zip(widths, scales)
        )
        self.fuse = nn.ModuleList(_conv_unit(hidden_dim, hidden_dim) for _ in range(levels - 1))
        self.squeeze = nn.Conv2d(hidden_dim, stem_dim, kernel_size=1)
        self.stem = nn.Sequential(_conv_unit(in_chans, stem_dim), _conv_unit(stem_dim, stem_dim)) if image_stem else None
        joined = 2 * stem_dim if image_stem else stem_dim
        self.head = nn.Sequential(_conv_unit(joined, stem_dim), nn.Conv2d(stem_dim, num_classes, kernel_size=1))

    def forward(self, grids: Sequence[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Patch grids (one (B, D, h, w) per block of ``blocks``) and the images (B, C, H, W)
        -> logits (B, num_classes, H, W)."""
        if len(grids) != len(self.reassemble):
            raise ValueError(f"The decoder reads {len(self.reassemble)} blocks, got {len(grids)} grids")
        pyramid = [reassemble(grid) for reassemble, grid in zip(self.reassemble, grids)]
        x = pyramid[-1]
        # Top-down: each coarser result is resized onto the next finer level and refined.
        for level in range(len(pyramid) - 2, -1, -1):
            finer = pyramid[level]
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse[level](x + finer)
        x = F.interpolate(self.squeeze(x), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.stem is not None:
            x = torch.cat([x, self.stem(images)], dim=1)
        return self.head(x)
