"""What every family's prompt-capable wrapper shares (:class:`PromptedEncoder`).

A wrapper holds a frozen encoder (its *trunk*), adds the prompt tensors, and honours timm's
hooks (``no_weight_decay``, ``set_grad_checkpointing``) and vpt's (``compile_target``, the
block loop ``model.compile=true`` compiles; ``backbone_eval``, the trunk held in eval mode
while training, except the modules a method marked ``follows_train_mode``). One base class
says this once, so the wrappers of timm ViTs, SAM and SAM2 Hiera cannot drift apart and
``isinstance(module, PromptedEncoder)`` finds any of them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["PromptedEncoder", "follow_train_mode"]


def follow_train_mode(frozen: nn.Module, mode: bool) -> None:
    """Put the modules a method added or unfroze inside a frozen trunk (marked with
    ``follows_train_mode = True``: adapters, LoRA dropout, unfrozen blocks) back in ``mode``
    after the trunk was held in eval mode."""
    for module in frozen.modules():
        if getattr(module, "follows_train_mode", False):
            module.train(mode)


class PromptedEncoder(nn.Module):
    """Base of the prompt-capable wrappers.

    Subclasses set :attr:`trunk_attribute` (the name of the wrapped encoder) and, in
    ``__init__``, ``backbone_eval``, ``grad_checkpointing`` and ``compile_target``.
    """

    #: Attribute holding the frozen encoder (``"vit"``, ``"image_encoder"``, ``"hiera"``).
    trunk_attribute: ClassVar[str] = ""
    backbone_eval: bool = True
    grad_checkpointing: bool = False
    compile_target: str = "forward"

    @property
    def trunk(self) -> nn.Module:
        """The frozen encoder inside."""
        return getattr(self, self.trunk_attribute)

    def hold_trunk_in_eval(self) -> None:
        """Put the trunk in eval mode (dropout and drop-path off) while the wrapper trains."""
        self.trunk.eval()

    def train(self, mode: bool = True) -> "PromptedEncoder":
        super().train(mode)
        if mode and self.backbone_eval:
            self.hold_trunk_in_eval()
            follow_train_mode(self.trunk, mode)
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Prompts keep weight decay, as in the reference VPT optimiser; only the trunk's own
        # exemptions (position embeddings, ...) apply, under the wrapper's prefix.
        own = getattr(self.trunk, "no_weight_decay", None)
        return {f"{self.trunk_attribute}.{name}" for name in own()} if callable(own) else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        own = getattr(self.trunk, "set_grad_checkpointing", None)
        if callable(own):
            own(enable)
