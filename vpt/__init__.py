"""vpt: visual prompt tuning (and the baselines it is compared with) for frozen vision
foundation models."""

from vpt.methods import apply_method
from vpt.metrics import volume_scores
from vpt.prompts import PromptedSamEncoder, PromptedViT

__all__ = ["PromptedViT", "PromptedSamEncoder", "apply_method", "volume_scores"]
