"""Name -> method registry. A method turns a frozen timm ViT into the module that trains."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, Optional

from torch import nn
from timm.models.vision_transformer import VisionTransformer

from vpt.errors import ConfigError

__all__ = ["MethodBuilder", "register_method", "build_method", "available_methods"]

_logger = logging.getLogger(__name__)

MethodBuilder = Callable[..., nn.Module]
_METHODS: Dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register ``builder(vit, num_classes, **options) -> nn.Module`` under ``name``."""

    def decorator(builder: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = builder
        return builder

    return decorator


def available_methods() -> list[str]:
    return sorted(_METHODS)


def _accepted_options(builder: MethodBuilder) -> Optional[set[str]]:
    """Keyword options ``builder`` takes, or None when it takes any (``**options``)."""
    parameters = list(inspect.signature(builder).parameters.values())[2:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return getattr(builder, "options", None)
    return {p.name for p in parameters}


def build_method(name: str, vit: VisionTransformer, num_classes: int, **options: Any) -> nn.Module:
    """Apply method ``name`` to ``vit`` with a fresh ``num_classes`` head.

    Args:
        name: A registered method (``vpt_deep``, ``vpt_shallow``, ``linear``, ``full``).
        vit: The timm backbone, pretrained weights already loaded.
        num_classes: Classes of the new head.
        **options: The method's own settings (e.g. ``num_tokens``), validated by it.

    Returns:
        The model to train; only what the method trains has ``requires_grad``.
    """
    if name not in _METHODS:
        raise ConfigError(f"Unknown method {name!r}; choose one of {available_methods()} (method=...).")
    builder = _METHODS[name]
    accepted = _accepted_options(builder)
    if accepted is not None:
        # Composed configs can carry another method's settings (an experiment sets
        # method.num_tokens, the command line says method=linear): say so, then drop them.
        ignored = sorted(set(options) - accepted)
        if ignored:
            _logger.warning("Method %r ignores the options %s.", name, ignored)
        options = {k: v for k, v in options.items() if k in accepted}
    return builder(vit, num_classes, **options)
