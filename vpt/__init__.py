"""vpt: visual prompt tuning (and the baselines it is compared with) for frozen vision
foundation models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpt.methods import apply_method
    from vpt.metrics import volume_scores
    from vpt.inference.export import load_pretrained
    from vpt.prompts import PromptedSamEncoder, PromptedViT

__all__ = ["PromptedViT", "PromptedSamEncoder", "apply_method", "load_pretrained", "volume_scores"]

# Imported on first use (PEP 562), so that ``import vpt`` (and every command-line tool's
# ``--help``) does not pay for torch, timm and Lightning.
_LAZY_NAMES = {
    "PromptedViT": "vpt.prompts",
    "PromptedSamEncoder": "vpt.prompts",
    "apply_method": "vpt.methods",
    "volume_scores": "vpt.metrics",
    "load_pretrained": "vpt.inference.export",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'vpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
