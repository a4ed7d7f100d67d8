"""Prompt insertion into frozen encoders: one prompt-capable wrapper per encoder family."""

from typing import Any

from vpt.prompts.base import PromptedEncoder
from vpt.prompts.hiera import PromptedHiera
from vpt.prompts.sam import PromptedSamEncoder
from vpt.prompts.vit import PromptedViT, prompt_init_bound

__all__ = ["PromptedEncoder", "PromptedViT", "PromptedSamEncoder", "PromptedHiera", "PromptBank", "PromptTask", "prompt_init_bound"]


def __getattr__(name: str) -> Any:
    # The prompt bank serves trained prompt files at inference, so it lives in vpt.inference
    # (it reads those files through vpt.methods, which imports this package); the old names
    # still work.
    if name in ("PromptBank", "PromptTask"):
        from vpt.inference import bank

        return getattr(bank, name)
    raise AttributeError(f"module 'vpt.prompts' has no attribute {name!r}")
