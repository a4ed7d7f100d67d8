"""LoRA (Hu et al., ICLR 2022) through peft, with SAMed's q/v setting on fused ``qkv`` layers.

SAMed adapts SAM with rank-4 LoRA on the queries and values of every block. timm's and SAM's
attention compute queries, keys and values with one fused ``qkv`` linear, so LoRA on
``qkv`` would also move the keys. For ``targets`` naming ``q``, ``k`` or ``v``, the fused
layer is replaced by :class:`SplitQKV`, three linears holding its row blocks whose outputs
are concatenated exactly as before; peft then puts its LoRA layers on the named ones, as on
SAMed's separate q and v projections. ``qkv``, ``proj``, ``fc1`` and ``fc2`` target those
layers as they are (``fc1``/``fc2`` are ``lin1``/``lin2`` in SAM).

:func:`merge_lora` folds the low-rank updates into the weights for inference and restores
the fused layers, so a merged model costs what the frozen encoder costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from vpt.errors import ConfigError
from vpt.methods.encoders import encoder_blocks, inner_encoder, mark_follows_train_mode, mlp_layer_names, wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__ = ["LoraConfig", "SplitQKV", "merge_lora"]

_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")


@dataclass
class LoraConfig(MethodConfig):
    """Args:
        rank: Rank of each update (SAMed: 4).
        alpha: Scale numerator (update = alpha / rank * B A x); None means ``rank``.
        dropout: Dropout on the LoRA input.
        targets: Layers of every block that get an update: any of ``q``, ``k``, ``v``
            (slices of the fused qkv), ``qkv`` (the fused layer whole), ``proj``, ``fc1``, ``fc2``.
    """

    rank: int = 4
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"method.rank must be >= 1, got {self.rank}.")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"method.alpha must be positive or null (= rank), got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.targets, str):  # method.targets=qkv means the fused layer, not q, k and v
            self.targets = [self.targets]
        self.targets = [str(t) for t in self.targets]
        unknown = sorted(set(self.targets) - set(_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"method.targets must be a non-empty list of {list(_TARGETS)}, got {self.targets}.")
        if "qkv" in self.targets and set(self.targets) & {"q", "k", "v"}:
            raise ConfigError("method.targets names qkv and its slices; use either [qkv] or some of [q, k, v].")


class SplitQKV(nn.Module):
    """A fused ``qkv`` linear as three linears (same weights, same output layout).

    Args:
        qkv: The fused ``Linear(D, 3D)`` whose rows are [queries; keys; values].

    Shapes: (..., D) -> (..., 3D).
    """

    def __init__(self, qkv: nn.Linear) -> None:
        super().__init__()
        width = qkv.out_features // 3
        has_bias = qkv.bias is not None
        for index, name in enumerate("qkv"):
            layer = nn.Linear(qkv.in_features, width, bias=has_bias, device=qkv.weight.device, dtype=qkv.weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(qkv.weight[index * width : (index + 1) * width])
                if has_bias:
                    layer.bias.copy_(qkv.bias[index * width : (index + 1) * width])
            layer.requires_grad_(qkv.weight.requires_grad)
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fused(self) -> nn.Linear:
        """The equivalent single ``Linear`` (with any merged LoRA update inside)."""
        parts = [_base(getattr(self, name)) for name in "qkv"]
        first = parts[0]
        fused = nn.Linear(first.in_features, 3 * first.out_features, bias=first.bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(False)
        return fused


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _target_pattern(targets: list[str], mlp_layers: tuple[str, str]) -> str:
    """The module-name pattern of the target linears in every block; the MLP's names are
    the family's (``fc1``/``fc2`` in timm, ``lin1``/``lin2`` in SAM, ...)."""
    fc1, fc2 = (re.escape(name) for name in mlp_layers)
    names = {"q": r"attn\.qkv\.q", "k": r"attn\.qkv\.k", "v": r"attn\.qkv\.v", "qkv": r"attn\.qkv",
             "proj": r"attn\.proj", "fc1": rf"mlp\.{fc1}", "fc2": rf"mlp\.{fc2}"}
    return r"^blocks\.\d+\.(" + "|".join(names[t] for t in targets) + r")$"


@register_method("lora", LoraConfig)
def lora(encoder: nn.Module, config: LoraConfig) -> nn.Module:
    """peft LoRA layers on the chosen linears of every block; only they train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    model = wrap_encoder(encoder, 0)
    raw = inner_encoder(model)
    if set(config.targets) & {"q", "k", "v"}:
        for block in encoder_blocks(model):
            block.attn.qkv = SplitQKV(block.attn.qkv)
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        lora_dropout=config.dropout,
        target_modules=_target_pattern(config.targets, mlp_layer_names(model)),
        bias="none",
    )
    inject_adapter_in_model(peft_config, raw)
    for name, param in raw.named_parameters():
        param.requires_grad_("lora_" in name)
    for module in raw.modules():
        if hasattr(module, "lora_dropout"):
            mark_follows_train_mode(module.lora_dropout)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain layers back.

    Args:
        model: A model holding peft LoRA layers (in place).

    Returns:
        ``model``, now without LoRA layers: same outputs, frozen-encoder cost.
    """
    from peft.tuners.lora import LoraLayer

    def replace(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                base = child.get_base_layer()
                base.requires_grad_(False)
                setattr(parent, name, base)
            else:
                replace(child)
            if isinstance(getattr(parent, name), SplitQKV):
                setattr(parent, name, getattr(parent, name).fused())

    replace(model)
    for module in model.modules():
        if getattr(module, "method_name", None) == "lora":
            # Saved after merging, the file holds no LoRA tensors; say so, so a LoRA model
            # refuses it by name instead of by missing tensors.
            module.method_name = "lora_merged"
    return model
