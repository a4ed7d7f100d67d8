"""One view of the two encoder families, so a method is written once for both.

timm's ``VisionTransformer`` and segment-anything's ``ImageEncoderViT`` share the shape of
their blocks (``norm1 -> attn(qkv, proj) -> norm2 -> mlp``) but not the names of the MLP
layers (``fc1``/``fc2`` vs ``lin1``/``lin2``) nor their wrappers. This module wraps an
encoder in its prompt-capable module and answers the questions methods ask.
"""

from __future__ import annotations

from typing import Optional

from segment_anything.modeling.image_encoder import ImageEncoderViT
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpt.errors import ConfigError
from vpt.prompts import PromptedSamEncoder, PromptedViT

__all__ = ["wrap_encoder", "inner_encoder", "encoder_family", "encoder_blocks", "mlp_layer_names", "mark_follows_train_mode"]


def encoder_family(encoder: nn.Module) -> str:
    """``"timm"`` or ``"sam"`` for a raw or wrapped encoder."""
    raw = inner_encoder(encoder) if isinstance(encoder, (PromptedViT, PromptedSamEncoder)) else encoder
    if isinstance(raw, VisionTransformer):
        return "timm"
    if isinstance(raw, ImageEncoderViT):
        return "sam"
    raise ConfigError(
        f"Methods apply to timm VisionTransformer and segment-anything ImageEncoderViT encoders, got "
        f"{type(raw).__name__}; pick a model from configs/model/."
    )


def wrap_encoder(
    encoder: nn.Module,
    num_tokens: int = 0,
    deep: bool = True,
    dropout: float = 0.0,
    project_dim: Optional[int] = None,
    backbone_eval: bool = True,
    gate: bool = False,
) -> nn.Module:
    """The encoder in its prompt-capable wrapper (which freezes it).

    Args:
        encoder: timm ``VisionTransformer`` or SAM ``ImageEncoderViT``.
        num_tokens, deep, dropout: Prompt settings (0 tokens: the plain encoder).
        project_dim: Prompt projection width (timm only).
        backbone_eval: Hold the encoder in eval mode while training (all but ``full``).
        gate: Zero-initialised per-head gates on deep prompts' attention.
    """
    family = encoder_family(encoder)
    if family == "timm":
        return PromptedViT(
            encoder, num_tokens, deep=deep, dropout=dropout, project_dim=project_dim, backbone_eval=backbone_eval, gate=gate
        )
    if project_dim is not None:
        raise ConfigError("method.project_dim is only available for timm ViTs; set method.project_dim=null for SAM.")
    return PromptedSamEncoder(encoder, num_tokens, deep=deep, dropout=dropout, backbone_eval=backbone_eval, gate=gate)


def inner_encoder(wrapped: nn.Module) -> nn.Module:
    """The timm ViT or SAM image encoder inside a wrapper."""
    if isinstance(wrapped, PromptedViT):
        return wrapped.vit
    if isinstance(wrapped, PromptedSamEncoder):
        return wrapped.image_encoder
    raise ConfigError(f"{type(wrapped).__name__} is not a vpt encoder wrapper.")


def encoder_blocks(wrapped: nn.Module) -> list[nn.Module]:
    """The transformer blocks, first to last."""
    return list(inner_encoder(wrapped).blocks)


def mlp_layer_names(family: str) -> tuple[str, str]:
    """Names of the two MLP linears in a block's ``mlp``: (expand, contract)."""
    return ("fc1", "fc2") if family == "timm" else ("lin1", "lin2")


def mark_follows_train_mode(module: nn.Module) -> None:
    """Let ``module`` follow ``train()``/``eval()`` although the frozen encoder around it is
    held in eval mode (adapters, LoRA dropout, unfrozen blocks)."""
    module.follows_train_mode = True
