"""Prompt insertion into frozen encoders."""

from vpt.prompts.sam import PromptedSamEncoder
from vpt.prompts.vit import PromptedViT, prompt_init_bound
from vpt.prompts.bank import PromptBank, PromptTask

__all__ = ["PromptedViT", "PromptedSamEncoder", "PromptBank", "PromptTask", "prompt_init_bound"]
