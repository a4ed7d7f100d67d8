"""Trainable-parameter accounting, printed at the start of every run."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn

__all__ = ["parameter_groups", "parameter_table", "default_group"]


# Name parts of tensors a method adds to the encoder (prompts, LoRA, adapters).
_METHOD_PARTS = ("prompt", "lora_", "adapter")
# Top-level names of heads and decoders (the timm classifier lives inside the ViT).
_HEAD_PREFIXES = ("vit.head.", "head.", "decoder.", "mask_decoder.")


def default_group(name: str) -> str:
    """Group of a parameter name: ``method`` (what a method added), ``head`` (classifier or
    decoder) or ``encoder`` (the pretrained encoder's own tensors, trained or not)."""
    parts = name.split(".")
    if any(part.startswith(_METHOD_PARTS) for part in parts):
        return "method"
    if name.startswith(_HEAD_PREFIXES):
        return "head"
    return "encoder"


def parameter_groups(
    model: nn.Module, group_of: Callable[[str], str] = default_group
) -> "OrderedDict[str, tuple[int, int]]":
    """Trainable and total parameter counts per group.

    Returns:
        {group: (trainable, total)} for method, head, encoder (in that order), then "total".
    """
    counts: "OrderedDict[str, list[int]]" = OrderedDict((g, [0, 0]) for g in ("method", "head", "encoder"))
    for name, param in model.named_parameters():
        entry = counts.setdefault(group_of(name), [0, 0])
        entry[1] += param.numel()
        if param.requires_grad:
            entry[0] += param.numel()
    trainable = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    result = OrderedDict((g, (c[0], c[1])) for g, c in counts.items())
    result["total"] = (trainable, total)
    return result


def parameter_table(model: nn.Module, group_of: Callable[[str], str] = default_group) -> str:
    """A fixed-width table of trainable / total parameters and the trainable percentage."""
    groups = parameter_groups(model, group_of)
    all_params = groups["total"][1] or 1
    lines = [f"{'group':<10} {'trainable':>14} {'total':>14} {'% of model':>11}"]
    for group, (trainable, total) in groups.items():
        if group == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{group:<10} {trainable:>14,} {total:>14,} {100.0 * trainable / all_params:>10.3f}%")
    return "\n".join(lines)
