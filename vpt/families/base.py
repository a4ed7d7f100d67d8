"""The encoder seam: what every encoder family answers, and the registry of families.

A family (timm ViTs, segment-anything's ViT, SAM2's Hiera) is one file in this package that
subclasses :class:`EncoderFamily` and registers an instance with :func:`register_family`.
Methods, heads, the composition root (:mod:`vpt.models`), tasks and scripts ask the family
of an encoder (:func:`family_of`) or of a config (:func:`family_named` with ``model.family``)
and never test a family's name or class themselves.

Why our own interface and not timm's alone: timm answers "what can I read out of this
model" (``forward_intermediates``, ``feature_info``), but not where prompts enter a block,
which linears LoRA may target, or how the family builds its segmentation network; peft
answers the targeting by module names that differ per family (``fc1`` vs ``lin1`` vs
``mlp.layers.0``). This base class keeps those answers in one place per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from vpt.errors import ConfigError

__all__ = [
    "EncoderFamily",
    "FeatureLevel",
    "register_family",
    "family_named",
    "family_of",
    "available_families",
    "wrapper_types",
    "is_wrapped",
]

#: What a task may ask a family to build.
TASK_KINDS = ("classification", "segmentation", "interactive_segmentation")


@dataclass(frozen=True)
class FeatureLevel:
    """One feature grid a decoder can read: its channel width and its stride in input pixels."""

    width: int
    stride: int


class EncoderFamily:
    """One encoder family's answers. Subclass, set the class attributes, implement
    :meth:`owns` and the builders the family supports (override :meth:`wrap` and
    :meth:`inner` for a wrapper that is not a :class:`~vpt.prompts.PromptedEncoder`).

    Attributes:
        name: The ``model.family`` value of its configs (``"timm"``).
        wrapper: The prompt-capable wrapper class (freezes the encoder it wraps).
        tasks: The task kinds (:data:`TASK_KINDS`) the family can build networks for.
        mlp_layers: Names of the two linears in a block's ``mlp``: (expand, contract).
        qkv_layer: Name of the fused query/key/value linear in a block's ``attn``.
        shallow_prompts: Whether ``vpt_shallow`` has a faithful definition here.
        prompt_projection: Whether ``method.project_dim`` is supported.
        example_model: A model config of the family, named in error messages.
    """

    name: str = ""
    wrapper: type[nn.Module] = nn.Module
    tasks: tuple[str, ...] = ()
    mlp_layers: tuple[str, str] = ("fc1", "fc2")
    qkv_layer: str = "qkv"
    shallow_prompts: bool = True
    prompt_projection: bool = False
    example_model: str = ""

    # -- the encoder ---------------------------------------------------------------------

    def owns(self, encoder: nn.Module) -> bool:
        """Whether ``encoder`` (a raw, unwrapped encoder) belongs to this family."""
        raise NotImplementedError

    def wrap(
        self,
        encoder: nn.Module,
        num_tokens: int = 0,
        deep: bool = True,
        dropout: float = 0.0,
        project_dim: Optional[int] = None,
        backbone_eval: bool = True,
        gate: bool = False,
    ) -> nn.Module:
        """``encoder`` in the family's prompt-capable wrapper (which freezes it).

        The prompt settings are checked against what the family defines, then passed to
        :attr:`wrapper` (``project_dim`` only where the family has a prompt projection).

        Args:
            encoder: A raw encoder of the family.
            num_tokens, deep, dropout: Prompt settings (0 tokens: the plain encoder).
            project_dim: Prompt projection width (families with ``prompt_projection``).
            backbone_eval: Hold the encoder in eval mode while training (all but ``full``).
            gate: Zero-initialised per-head gates on deep prompts' attention.
        """
        self.check_prompts(num_tokens, deep, project_dim)
        projection = {"project_dim": project_dim} if self.prompt_projection else {}
        return self.wrapper(
            encoder, num_tokens, deep=deep, dropout=dropout, backbone_eval=backbone_eval, gate=gate, **projection
        )

    def inner(self, wrapped: nn.Module) -> nn.Module:
        """The raw encoder inside the family's wrapper (a :class:`~vpt.prompts.base.PromptedEncoder`'s
        ``trunk``; a wrapper of another kind overrides this)."""
        return wrapped.trunk

    def blocks(self, wrapped: nn.Module) -> list[nn.Module]:
        """The transformer blocks, first to last (each with ``norm1``, ``attn.<qkv_layer>``,
        ``attn.proj``, ``norm2`` and ``mlp``)."""
        return list(self.inner(wrapped).blocks)

    def check_prompts(self, num_tokens: int, deep: bool, project_dim: Optional[int]) -> None:
        """Refuse prompt settings the family has no definition for, in one sentence."""
        if num_tokens > 0 and not deep and not self.shallow_prompts:
            raise ConfigError(
                f"vpt_shallow has no faithful definition for {self.name} encoders (their token grid changes size "
                "between stages); use method=vpt_deep."
            )
        if project_dim is not None and not self.prompt_projection:
            raise ConfigError(
                f"method.project_dim is not available for {self.name} encoders; set method.project_dim=null."
            )

    def feature_levels(self, encoder: nn.Module) -> list[FeatureLevel]:
        """The grids a decoder reads from ``encoder`` (raw or wrapped), in the order the
        wrapper's ``forward_intermediates`` returns them: one per block for a plain ViT, the
        neck's output for SAM, one per stage for Hiera."""
        raise NotImplementedError

    def data_settings(self, encoder: nn.Module, model_cfg: Optional[Any] = None) -> dict[str, Any]:
        """What the data pipeline must feed ``encoder`` (raw or wrapped): ``image_size``
        (H, W) and ``mean`` / ``std`` in [0, 1] units. A model config's ``mean`` and ``std``
        (MedSAM feeds [0, 1] images unnormalised) take precedence over the weights' own."""
        raise NotImplementedError

    @staticmethod
    def configured_normalisation(data: dict[str, Any], model_cfg: Optional[Any]) -> dict[str, Any]:
        """``data`` with the model config's ``mean`` / ``std`` when it states both."""
        if model_cfg is not None and model_cfg.get("mean") is not None and model_cfg.get("std") is not None:
            data = {**data, "mean": tuple(float(v) for v in model_cfg.mean), "std": tuple(float(v) for v in model_cfg.std)}
        return data

    def checkpoint_filter(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """timm's ``_builder`` pattern: adapt a checkpoint in the family's published layout
        (renamed keys, position tables resized to ``model``) to ``model``'s state dict.

        ``model`` is what the family's published checkpoints describe: the encoder (raw or
        wrapped) for timm ViTs and Hiera, segment-anything's whole ``Sam`` for SAM (its
        checkpoints hold the prompt encoder and mask decoder too)."""
        raise NotImplementedError

    def load_checkpoint(self, model: nn.Module, path: str | Path) -> Any:
        """Read ``path`` with vpt's safe loader, adapt it with :meth:`checkpoint_filter` and load
        it into ``model`` (as there), reporting missing and unexpected keys (a
        :class:`~vpt.backbones.LoadReport`)."""
        raise NotImplementedError

    # -- networks for the tasks ------------------------------------------------------------

    def supports(self, task: str) -> bool:
        return task in self.tasks

    def require(self, task: str, model_name: str) -> None:
        """Refuse a task the family cannot build, naming models that can."""
        if self.supports(task):
            return
        able = [family.example_model for family in _FAMILIES.values() if family.supports(task) and family.example_model]
        raise ConfigError(
            f"model={model_name} is a {self.name} model and cannot be used for {task.replace('_', ' ')}; "
            f"pick e.g. model={' or model='.join(able) if able else '...'}."
        )

    def build_classifier_encoder(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        """The raw encoder of ``cfg.model`` (weights loaded) and its data settings
        (``image_size``, ``mean``, ``std``), for classification."""
        raise NotImplementedError

    def build_segmenter(self, cfg: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        """The automatic segmentation network (method applied) and its data settings."""
        raise NotImplementedError

    def build_interactive(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        """The prompt-driven (box / point) segmentation network and its data settings."""
        raise NotImplementedError


_FAMILIES: dict[str, EncoderFamily] = {}


def register_family(family: EncoderFamily) -> EncoderFamily:
    """Register ``family`` under ``family.name`` (its configs' ``model.family``)."""
    if not family.name:
        raise ValueError("an encoder family needs a name")
    if family.name in _FAMILIES and type(_FAMILIES[family.name]) is not type(family):
        raise ValueError(f"encoder family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def available_families() -> list[str]:
    return sorted(_FAMILIES)


def family_named(name: Optional[str]) -> EncoderFamily:
    """The family a model config names (``model.family``; timm when unset, as older configs)."""
    key = str(name or "timm")
    if key not in _FAMILIES:
        raise ConfigError(f"Unknown model.family {key!r}; use a model config from configs/model/ ({', '.join(available_families())}).")
    return _FAMILIES[key]


def wrapper_types() -> tuple[type[nn.Module], ...]:
    """Every family's prompt-capable wrapper class."""
    return tuple(family.wrapper for family in _FAMILIES.values())


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` is a family's prompt-capable wrapper."""
    return isinstance(module, wrapper_types())


def family_of(encoder: nn.Module) -> EncoderFamily:
    """The family of a raw encoder or of a family's wrapper.

    Raises:
        ConfigError: no registered family owns it.
    """
    for family in _FAMILIES.values():
        if isinstance(encoder, family.wrapper) or family.owns(encoder):
            return family
    kinds = ", ".join(f"{family.name} ({family.example_model})" for family in _FAMILIES.values())
    raise ConfigError(
        f"Methods apply to the encoders of a registered family ({kinds}), got {type(encoder).__name__}; "
        "pick a model from configs/model/."
    )
