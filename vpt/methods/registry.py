"""Name -> method registry, in the style of peft's tuners.

A method is a transform of a frozen encoder: it takes a timm ``VisionTransformer`` or
segment-anything's ``ImageEncoderViT`` and returns the module to train (the encoder wrapped
in :class:`~vpt.prompts.PromptedViT` / :class:`~vpt.prompts.PromptedSamEncoder`, with the
method's own tensors added or unfrozen). The encoder's outputs keep their shapes, so tasks
and heads never need to know which method ran. A method is one module in ``vpt/methods/``
(a dataclass config that validates itself + an ``apply`` function registered here) and one
config in ``configs/method/``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Type

from torch import nn

from vpt.errors import ConfigError

__all__ = [
    "MethodConfig",
    "register_method",
    "available_methods",
    "method_config",
    "apply_method",
    "applied_method",
    "build_method",
]

_logger = logging.getLogger(__name__)


@dataclass
class MethodConfig:
    """Settings shared by every method's config (none today); subclasses add their own and
    validate them in ``__post_init__`` with :class:`~vpt.errors.ConfigError`."""


MethodApply = Callable[[nn.Module, Any], nn.Module]


@dataclass(frozen=True)
class _Method:
    name: str
    config: Type[MethodConfig]
    apply: MethodApply


_METHODS: Dict[str, _Method] = {}


def register_method(name: str, config: Type[MethodConfig] = MethodConfig) -> Callable[[MethodApply], MethodApply]:
    """Register ``apply(encoder, config) -> nn.Module`` as method ``name``.

    Args:
        name: The name configs use (``method=<name>``).
        config: The method's dataclass config; its fields are the method's options.
    """

    def decorator(apply: MethodApply) -> MethodApply:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = _Method(name, config, apply)
        return apply

    return decorator


def available_methods() -> list[str]:
    return sorted(_METHODS)


def _known_options() -> set[str]:
    return {f.name for method in _METHODS.values() for f in dataclasses.fields(method.config)}


def method_config(name: str, **options: Any) -> MethodConfig:
    """The validated config of method ``name``.

    A sweep sets options for every job (``-m method=vpt_deep,lora method.num_tokens=10,50``),
    so an option that another method takes is dropped here with a warning; an option no
    method takes is a typo and refused.

    Raises:
        ConfigError: unknown method, an option no method knows, or a value the method's
            config refuses.
    """
    if name not in _METHODS:
        raise ConfigError(f"Unknown method {name!r}; choose one of {available_methods()} (method=...).")
    method = _METHODS[name]
    accepted = {f.name for f in dataclasses.fields(method.config)}
    unknown = sorted(set(options) - _known_options())
    if unknown:
        raise ConfigError(f"method.{unknown[0]} is not an option of any method; {name} takes {sorted(accepted) or 'none'}.")
    ignored = sorted(k for k in set(options) - accepted if options[k] is not None)
    if ignored:
        _logger.warning("Method %r ignores the options %s (they belong to other methods).", name, ignored)
    try:
        return method.config(**{k: v for k, v in options.items() if k in accepted})
    except TypeError as error:
        raise ConfigError(f"method={name}: {error}.") from None


def apply_method(encoder: nn.Module, name: str, **options: Any) -> nn.Module:
    """Apply method ``name`` to a frozen encoder.

    Args:
        encoder: A timm ``VisionTransformer`` or segment-anything's ``ImageEncoderViT``,
            pretrained weights already loaded.
        name: A registered method (``vpt_deep``, ``vpt_shallow``, ``linear``, ``full``,
            ``lora``, ``adapter``, ``bitfit``, ``partial``).
        **options: The method's settings (e.g. ``num_tokens``, ``rank``), validated by its config.

    Returns:
        The module to train: a ``PromptedViT`` (timm) or ``PromptedSamEncoder`` (SAM)
        holding the encoder; only the method's tensors have ``requires_grad``; outputs have
        the encoder's shapes. ``method_name`` and ``method_options`` record what was applied.
    """
    config = method_config(name, **options)
    _refuse_adapted(encoder)
    model = _METHODS[name].apply(encoder, config)
    model.method_name = name
    model.method_options = dataclasses.asdict(config)
    return model


def applied_method(model: nn.Module) -> Optional[nn.Module]:
    """The submodule of ``model`` that :func:`apply_method` returned, or ``None``: its
    ``method_name`` and ``method_options`` say what was applied, with every option the
    method used (and none that it ignored)."""
    for module in model.modules():
        if hasattr(module, "method_name") and hasattr(module, "method_options"):
            return module
    return None


def _refuse_adapted(encoder: nn.Module) -> None:
    """Methods change the encoder in place; a second one on the same encoder would stack
    silently (and prompts would not see a LoRA update), so it is refused."""
    from vpt.families import is_wrapped

    if is_wrapped(encoder) or any(
        getattr(module, "method_name", None) is not None or type(module).__name__ in ("SplitQKV", "MlpWithAdapter")
        or hasattr(module, "lora_A")
        for module in encoder.modules()
    ):
        raise ConfigError(
            "This encoder was already adapted by a method; build a fresh encoder (with its pretrained weights) "
            "for each apply_method call."
        )


def build_method(name: str, vit: nn.Module, num_classes: int, **options: Any) -> nn.Module:
    """:func:`apply_method` on a timm ViT plus a fresh ``num_classes`` classifier head.

    Returns:
        A ``PromptedViT``; the method's tensors and the head train.
    """
    model = apply_method(vit, name, **options)
    if not hasattr(model, "reset_classifier"):
        raise ConfigError(f"Classification needs a timm ViT backbone, got {type(vit).__name__}; pick e.g. model=vit_b.")
    model.reset_classifier(num_classes)
    return model


# Keys a method config may carry for the training recipe rather than for the method itself
# (read by configs/train.yaml's optimizer section).
RECIPE_KEYS = ("name", "prompt_lr_scale")


def options_of(config: Optional[Any]) -> dict[str, Any]:
    """A method config node (``{name: ..., **options}``) -> its options (recipe keys left out)."""
    return {k: v for k, v in dict(config or {}).items() if k not in RECIPE_KEYS}
