"""The hiera family: SAM2 / SAM2.1 / MedSAM2 image encoders' Hiera trunk, through timm's
``HieraDet`` (``timm.models.hieradet_sam2``), prompted by :class:`~vpt.prompts.hiera.PromptedHiera`;
the multi-level decoder on its four stage grids (strides 4/8/16/32).

Model configs: ``sam2_hiera_tiny``, ``sam2_hiera_small``, ``sam2_hiera_base_plus``,
``sam2_hiera_large``, ``medsam2`` (SAM2.1 Hiera-T at 512 px) and ``sam2_hiera_micro`` (tiny,
random init, for tests). ``model.checkpoint=`` takes an official SAM2 / SAM2.1 / MedSAM2
``.pt`` file (``{"model": state_dict}``, the trunk under ``image_encoder.trunk.*``, MLP layers
``mlp.layers.0/1``), read with ``torch.load(weights_only=True)``. Segmentation decoders
(``task.decoder``): vpt's multi-level decoder (``multilevel``, the default), or SAM2's own FPN
neck and mask decoder (``sam2``: :class:`~vpt.heads.Sam2MulticlassDecoder`, transformers'
SAM2 modules loaded from the same checkpoint). Interactive segmentation (box / point
prompts): SAM2's prompt encoder and mask decoder in single-mask mode
(:class:`~vpt.heads.sam2_decoder.Sam2SingleMaskDecoder`). The memory modules are reported
as not used.

This file plus its model configs is the whole family: nothing else in vpt knows Hiera.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from timm.models.hieradet_sam2 import HieraDet
from torch import nn

from vpt.errors import ConfigError, WeightsUnavailableError
from vpt.families.base import EncoderFamily, FeatureLevel, register_family
from vpt.messages import log_setup
from vpt.prompts.hiera import PromptedHiera, hiera_checkpoint_filter

__all__ = ["HieraFamily", "create_hiera", "load_hiera_checkpoint"]

_logger = logging.getLogger(__name__)

# timm's registered SAM2 Hiera sizes (their architecture; weights come from model.checkpoint).
#: SAM2's input size (its image predictor resizes to it).
SAM2_INPUT_SIZE = 1024

#: ``task.decoder`` values a Hiera model can segment with.
HIERA_DECODERS = ("multilevel", "sam2")

_TIMM_NAMES = ("sam2_hiera_tiny", "sam2_hiera_small", "sam2_hiera_base_plus", "sam2_hiera_large")


def load_hiera_checkpoint(model: HieraDet, checkpoint: str | Mapping[str, Any], source: Any = None) -> Any:
    """Load an official SAM2 / SAM2.1 / MedSAM2 checkpoint's trunk into ``model``.

    Args:
        model: The ``HieraDet`` to load into.
        checkpoint: A path, or a checkpoint already read (``{"model": state_dict}``).
        source: Where an already-read checkpoint came from, for messages.

    Returns:
        The :class:`~vpt.backbones.LoadReport` (missing / unexpected keys are reported,
        never dropped silently; a wrong-shaped tensor is refused naming the key).
    """
    from vpt.backbones.checkpoint import load_weights

    if isinstance(checkpoint, Mapping):
        raw = checkpoint
    else:
        source, raw = _read_checkpoint(checkpoint)
    state = hiera_checkpoint_filter(raw, model)
    # SAM2 has no classifier: the encoder's unused head keeps its own (filled-in) tensors.
    return load_weights(model, state, source=source)


def _read_checkpoint(checkpoint: str) -> tuple[Any, dict[str, Any]]:
    """(path, state dict) of a checkpoint file, read with our safe loader."""
    from vpt.backbones.checkpoint import existing_checkpoint_path, read_state_dict

    path = existing_checkpoint_path(checkpoint)
    return path, read_state_dict(path)


def create_hiera(model_cfg: DictConfig, checkpoint_state: Optional[Mapping[str, Any]] = None) -> HieraDet:
    """The ``HieraDet`` of a model config: timm's architecture ``model.name`` (with
    ``model.kwargs`` overrides), weights from ``model.checkpoint``.

    Args:
        model_cfg: The model config.
        checkpoint_state: ``model.checkpoint`` already read (so a caller that also needs
            SAM2's decoder reads the file once).

    Raises:
        ConfigError: an unknown architecture name.
        WeightsUnavailableError: ``model.pretrained`` without ``model.checkpoint`` (SAM2's
            weights are not on the timm hub in this layout; vpt never downloads them silently).
    """
    import timm

    name = str(model_cfg.name)
    if name not in _TIMM_NAMES:
        raise ConfigError(f"model.name={name} is not a SAM2 Hiera architecture; use one of {', '.join(_TIMM_NAMES)}.")
    kwargs = OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.kwargs else {}
    model = timm.create_model(name, pretrained=False, **kwargs)  # type: ignore[arg-type]
    checkpoint = model_cfg.checkpoint
    if checkpoint and checkpoint_state is not None:
        load_hiera_checkpoint(model, checkpoint_state, source=checkpoint)
    elif checkpoint:
        load_hiera_checkpoint(model, str(checkpoint))
    elif model_cfg.pretrained:
        raise WeightsUnavailableError(
            f"model={model_cfg.get('config_name', name)} needs SAM2 weights; pass model.checkpoint=/path/sam2.1_hiera_*.pt "
            "(or MedSAM2_latest.pt), or model.pretrained=false for a random-init encoder."
        )
    else:
        log_setup(
            _logger, logging.WARNING,
            "Building %s as a random-init encoder: results will not reflect pretrained transfer; pass "
            "model.checkpoint=... for a real run.", name,
        )
    return model


class HieraFamily(EncoderFamily):
    name = "hiera"
    wrapper = PromptedHiera
    tasks = ("segmentation", "interactive_segmentation")
    mlp_layers = ("fc1", "fc2")  # timm's Mlp (SAM2 names them mlp.layers.0/1; the loader renames)
    qkv_layer = "qkv"
    shallow_prompts = False  # the token grid is pooled between stages: no place for shallow prompts
    prompt_projection = False
    example_model = "sam2_hiera_tiny"

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, HieraDet)

    def _raw(self, encoder: nn.Module) -> HieraDet:
        return self.inner(encoder) if isinstance(encoder, self.wrapper) else encoder

    def feature_levels(self, encoder: nn.Module) -> list[FeatureLevel]:
        """The four stage grids (timm's ``feature_info``): widths C, 2C, 4C, 8C at strides 4, 8, 16, 32."""
        return [FeatureLevel(int(info["num_chs"]), int(info["reduction"])) for info in self._raw(encoder).feature_info]

    def data_settings(self, encoder: nn.Module, model_cfg: Any = None) -> dict[str, Any]:
        """``model.img_size`` square (SAM2 and SAM2.1 use 1024, MedSAM2 512; any multiple of 32
        works), 1024 without a config (timm's ``input_size`` is its own pretraining size, not
        SAM2's), and ImageNet statistics as SAM2 normalises."""
        config = getattr(self._raw(encoder), "pretrained_cfg", None) or {}  # set by timm.create_model
        size = int(model_cfg.get("img_size") or SAM2_INPUT_SIZE) if model_cfg is not None else SAM2_INPUT_SIZE
        data = {
            "image_size": (size, size),
            "mean": tuple(float(v) for v in config.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(float(v) for v in config.get("std", (0.229, 0.224, 0.225))),
        }
        return self.configured_normalisation(data, model_cfg)

    def checkpoint_filter(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """An official SAM2 / SAM2.1 / MedSAM2 checkpoint -> ``HieraDet`` keys (trunk only)."""
        return hiera_checkpoint_filter(state_dict, self._raw(model))

    def load_checkpoint(self, model: nn.Module, path: str | Path) -> Any:
        return load_hiera_checkpoint(self._raw(model), str(path))

    def build_segmenter(self, cfg: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        """Hiera (method applied) -> a decoder of its four stage grids (``task.decoder``):
        ``multilevel`` (vpt's multi-level decoder, strides 4/8/16/32 and the image) or
        ``sam2`` (SAM2's own FPN neck and mask decoder, one token per class; from
        ``model.checkpoint`` when given)."""
        from vpt.heads import MultiLevelDecoder
        from vpt.models.segmenters import VitSegmenter

        kind = str(cfg.task.decoder)
        if kind not in HIERA_DECODERS:
            raise ConfigError(
                f"task.decoder={kind} reads a plain ViT's token grid; Hiera models use task.decoder=multilevel or "
                "task.decoder=sam2 (SAM2's mask decoder)."
            )
        features = str(cfg.task.encoder_features)
        if features not in ("real", "zeros"):
            raise ConfigError(f"task.encoder_features={features} is not valid; use real, or zeros (a decoder-alone control).")
        hiera, encoder, parts, data = self._encoder_and_parts(cfg, with_sam2_parts=kind == "sam2")
        decoder: nn.Module
        if parts is not None:
            from vpt.heads.sam2_decoder import Sam2MulticlassDecoder

            decoder = Sam2MulticlassDecoder(parts, num_classes)
            decoder.requires_grad_(bool(cfg.task.train_decoder))
        else:
            widths = [level.width for level in self.feature_levels(hiera)]
            decoder = MultiLevelDecoder(
                widths, num_classes, list(range(len(widths))), hidden_dim=int(cfg.task.decoder_dim),
                in_chans=3, image_stem=bool(cfg.task.image_stem), scales=[1.0] * len(widths),
            )
        return VitSegmenter(encoder, decoder, zero_features=features == "zeros"), data

    def build_interactive(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        """Hiera (method applied) -> SAM2's prompt encoder (frozen) and mask decoder in
        single-mask mode: one mask per box or point."""
        from vpt.heads.sam2_decoder import Sam2SingleMaskDecoder
        from vpt.models.segmenters import InteractiveSamSegmenter

        _, encoder, parts, data = self._encoder_and_parts(cfg, with_sam2_parts=True)
        assert parts is not None
        decoder = Sam2SingleMaskDecoder(parts)
        decoder.requires_grad_(bool(cfg.task.train_decoder))  # its prompt encoder stays frozen
        return InteractiveSamSegmenter(encoder, decoder), data

    def _encoder_and_parts(self, cfg: Any, with_sam2_parts: bool) -> tuple[HieraDet, nn.Module, Any, dict[str, Any]]:
        """The Hiera (weights loaded), its method-applied wrapper, SAM2's decoder parts (when
        asked for; from the same checkpoint file, read once) and the data settings."""
        from vpt.methods import apply_method, options_of

        size = cfg.model.img_size
        if not size:
            raise ConfigError(f"model={cfg.model.name} needs model.img_size (SAM2 uses 1024, MedSAM2 512).")
        source, state = None, None
        if with_sam2_parts and cfg.model.checkpoint:
            source, state = _read_checkpoint(str(cfg.model.checkpoint))
        hiera = create_hiera(cfg.model, state)
        options = options_of(OmegaConf.to_container(cfg.method, resolve=True))  # type: ignore[arg-type]
        encoder = apply_method(hiera, cfg.method.name, **options)
        parts = None
        if with_sam2_parts:
            from vpt.heads.sam2_decoder import Sam2DecoderParts

            parts = Sam2DecoderParts([level.width for level in self.feature_levels(hiera)], image_size=int(size))
            if state is not None:
                parts.load_official(state, source=source)
        return hiera, encoder, parts, self.data_settings(hiera, cfg.model)


register_family(HieraFamily())
