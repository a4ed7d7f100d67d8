"""Prompt insertion into frozen encoders."""

from vpt.prompts.vit import PromptedViT, prompt_init_bound

__all__ = ["PromptedViT", "prompt_init_bound"]
