"""What methods ask of an encoder, answered by its family (:mod:`vpt.families`).

A method is written once for every family: it wraps the encoder in the family's
prompt-capable module, finds the blocks, and targets linears by the names the family gives
(``fc1``/``fc2`` in timm, ``lin1``/``lin2`` in SAM, ...).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from vpt.families import family_of

__all__ = ["wrap_encoder", "inner_encoder", "encoder_family", "encoder_blocks", "mlp_layer_names", "mark_follows_train_mode"]


def encoder_family(encoder: nn.Module) -> str:
    """The family name (``"timm"``, ``"sam"``, ...) of a raw or wrapped encoder."""
    return family_of(encoder).name


def wrap_encoder(
    encoder: nn.Module,
    num_tokens: int = 0,
    deep: bool = True,
    dropout: float = 0.0,
    project_dim: Optional[int] = None,
    backbone_eval: bool = True,
    gate: bool = False,
) -> nn.Module:
    """The encoder in its family's prompt-capable wrapper (which freezes it).

    Args:
        encoder: A raw encoder of a registered family.
        num_tokens, deep, dropout: Prompt settings (0 tokens: the plain encoder).
        project_dim: Prompt projection width (where the family supports it).
        backbone_eval: Hold the encoder in eval mode while training (all but ``full``).
        gate: Zero-initialised per-head gates on deep prompts' attention.
    """
    return family_of(encoder).wrap(
        encoder, num_tokens, deep=deep, dropout=dropout, project_dim=project_dim, backbone_eval=backbone_eval, gate=gate
    )


def inner_encoder(wrapped: nn.Module) -> nn.Module:
    """The raw encoder inside a family's wrapper."""
    return family_of(wrapped).inner(wrapped)


def encoder_blocks(wrapped: nn.Module) -> list[nn.Module]:
    """The transformer blocks, first to last."""
    return family_of(wrapped).blocks(wrapped)


def mlp_layer_names(encoder: nn.Module) -> tuple[str, str]:
    """Names of the two MLP linears in a block's ``mlp`` of ``encoder``'s family: (expand, contract)."""
    return family_of(encoder).mlp_layers


def mark_follows_train_mode(module: nn.Module) -> None:
    """Let ``module`` follow ``train()``/``eval()`` although the frozen encoder around it is
    held in eval mode (adapters, LoRA dropout, unfrozen blocks)."""
    module.follows_train_mode = True
