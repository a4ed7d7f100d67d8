"""Prompt insertion into frozen encoders."""

from vpt.prompts.sam import PromptedSamEncoder
from vpt.prompts.vit import PromptedViT, prompt_init_bound

__all__ = ["PromptedViT", "PromptedSamEncoder", "prompt_init_bound"]
