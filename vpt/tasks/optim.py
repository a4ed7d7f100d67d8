"""Optimiser and learning-rate schedule as the VPT paper trains prompts.

SGD (momentum) or AdamW over the trainable parameters, weight decay except on biases,
norms and the backbone's embeddings (timm's grouping), a learning rate scaled linearly
with the global batch size (lr = base_lr * batch / 256), linear warm-up, then cosine decay,
stepped per iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from vpt.errors import ConfigError
from vpt.methods.report import default_group

__all__ = ["OptimizerConfig", "SchedulerConfig", "WarmupCosine", "build_optimizer", "scaled_lr"]


@dataclass
class OptimizerConfig:
    """Args:
    name: ``sgd`` (momentum, as in the paper) or ``adamw``.
    base_lr: Learning rate for a global batch of 256; scaled by ``batch / 256``.
    weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay.
    momentum: SGD momentum.
    betas: AdamW betas.
    prompt_lr_scale: Learning rate of what trains inside the encoder (prompts and their
        gates, LoRA, adapters, BitFit biases, unfrozen blocks) as a multiple of the head's
        or decoder's; 1 trains both at one rate, as the paper.
    """

    name: str = "sgd"
    base_lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    prompt_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer.name must be 'sgd' or 'adamw', got {self.name!r}.")
        if self.base_lr <= 0:
            raise ConfigError(f"optimizer.base_lr must be positive, got {self.base_lr}.")
        if self.prompt_lr_scale <= 0:
            raise ConfigError(f"optimizer.prompt_lr_scale must be positive, got {self.prompt_lr_scale}.")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class SchedulerConfig:
    """Args:
    warmup_epochs: Linear warm-up length in epochs (fractions allowed).
    min_lr_ratio: Final learning rate as a fraction of the peak.
    """

    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule used by VPT: ``base_lr * global_batch_size / 256``."""
    return base_lr * global_batch_size / 256.0


def build_optimizer(model: nn.Module, config: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """An optimiser over ``model``'s trainable parameters: timm's weight-decay groups, each
    split into the encoder's part (learning rate ``lr * prompt_lr_scale``) and the head's or
    decoder's (``lr``), parameter names grouped by :func:`vpt.methods.report.default_group`."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    names = {id(param): name for name, param in model.named_parameters()}
    groups = []
    for decay_group in param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=skip):
        head = [p for p in decay_group["params"] if default_group(names[id(p)]) == "head"]
        encoder = [p for p in decay_group["params"] if default_group(names[id(p)]) != "head"]
        groups.append({**decay_group, "params": encoder, "lr": lr * config.prompt_lr_scale, "part": "encoder"})
        groups.append({**decay_group, "params": head, "lr": lr, "part": "head"})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("The model has no trainable parameters; check the method config.")
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas)


class WarmupCosine:
    """Multiplier for ``LambdaLR``: linear warm-up from ~0 to 1, then cosine to ``min_ratio``.

    A small class rather than a closure, so the scheduler state stays plain data in
    checkpoints (loadable with ``weights_only=True``).
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def as_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a dataclass config (for hyper-parameter logging)."""
    from dataclasses import asdict

    return asdict(config)
