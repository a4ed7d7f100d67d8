"""Bottleneck adapters, placed as Adapter+ (Steitz & Roth, CVPR 2024) by default.

Adapter+ found the best place for a bottleneck adapter in a ViT to be after the
feed-forward network, reading its output, with a learned channel-wise scaling and no extra
normalisation: ``mlp(x) + s * up(act(down(mlp(x))))``. ``placement=parallel`` gives the
parallel form (AdaptFormer, Medical-SAM-Adapter's MLP adapter): ``mlp(x) + s * adapter(x)``.
The up projection starts at zero, so at step 0 the model is exactly the frozen encoder.

Written here rather than taken from peft: peft's bottleneck adapters target language models'
layer names, and neither placement exists there for timm or SAM blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpt.errors import ConfigError
from vpt.methods.encoders import encoder_blocks, mark_follows_train_mode, wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__ = ["AdapterConfig", "BottleneckAdapter", "MlpWithAdapter"]

_PLACEMENTS = ("post", "parallel")


@dataclass
class AdapterConfig(MethodConfig):
    """Args:
        dim: Bottleneck width (Adapter+ uses 8 for ViT-B).
        placement: ``post`` (Adapter+: reads the MLP's output) or ``parallel`` (reads its input).
        dropout: Dropout inside the adapter, after the activation.
    """

    dim: int = 8
    placement: str = "post"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"method.dim must be >= 1, got {self.dim}.")
        if self.placement not in _PLACEMENTS:
            raise ConfigError(f"method.placement must be one of {_PLACEMENTS}, got {self.placement!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}.")


class BottleneckAdapter(nn.Module):
    """``s * up(dropout(gelu(down(x))))`` with ``up`` zero-initialised.

    Args:
        width: Channels of ``x`` (the encoder's width).
        bottleneck: Hidden width.
        dropout: Dropout after the activation.

    Shapes: (..., width) -> (..., width).
    """

    def __init__(self, width: int, bottleneck: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(width))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale


class MlpWithAdapter(nn.Module):
    """A block's frozen ``mlp`` with an adapter after it (``post``) or beside it (``parallel``).

    Args:
        mlp: The block's MLP (frozen).
        adapter: The trainable adapter.
        placement: ``post`` or ``parallel``.
    """

    def __init__(self, mlp: nn.Module, adapter: BottleneckAdapter, placement: str = "post") -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.placement = placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out + self.adapter(out if self.placement == "post" else x)


def _width(block: nn.Module) -> int:
    norm = block.norm2
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return int(norm.weight.shape[-1])


@register_method("adapter", AdapterConfig)
def adapter(encoder: nn.Module, config: AdapterConfig) -> nn.Module:
    """One bottleneck adapter per block; only the adapters train."""
    model = wrap_encoder(encoder, 0)
    for block in encoder_blocks(model):
        module = BottleneckAdapter(_width(block), config.dim, config.dropout)
        mark_follows_train_mode(module)
        block.mlp = MlpWithAdapter(block.mlp, module, config.placement)
    return model
