"""The composition root: encoder + method + head for every task, from the config.

Tasks ask here for their network (:func:`build_segmenter`, :func:`build_classifier_encoder`,
:func:`build_interactive`); the config's encoder family (:mod:`vpt.families`) answers with
its own builder, which loads the encoder, applies the method (:func:`vpt.apply_method`) and
attaches the head or decoder the task needs. Each builder returns the network and the input settings (size,
normalisation) the data module must use.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from vpt.errors import ConfigError
from vpt.families import family_named, family_of
from vpt.heads import MultiLevelDecoder, PatchTokenDecoder, evenly_spaced_blocks, SamMulticlassDecoder, SamSingleMaskDecoder
from vpt.methods import apply_method, build_method, options_of
from vpt.models.segmenters import InteractiveSamSegmenter, SamSegmenter, VitSegmenter

__all__ = [
    "build_vit",
    "build_classifier_encoder",
    "build_interactive",
    "build_classifier",
    "build_segmenter",
    "build_sam_segmenter",
    "build_vit_segmenter",
    "build_interactive_sam",
    "build_prompted_sam",
    "sam_normalisation",
]


def _model_kwargs(model_cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.kwargs else {}  # type: ignore[return-value]


def _method(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    return cfg.method.name, options_of(OmegaConf.to_container(cfg.method, resolve=True))  # type: ignore[arg-type]


def _create_vit(cfg: DictConfig) -> nn.Module:
    from vpt.backbones import create_vit

    model_cfg = cfg.model
    return create_vit(
        model_cfg.name,
        pretrained=model_cfg.pretrained,
        checkpoint=model_cfg.checkpoint,
        img_size=model_cfg.img_size,
        **_model_kwargs(model_cfg),
    )


def build_vit(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The config's timm ViT (weights loaded, no method yet) and its data settings: the data
    module needs them before it can say how many classes there are."""
    vit = _create_vit(cfg)
    return vit, family_of(vit).data_settings(vit)


def build_classifier_encoder(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The config's encoder for classification (its family builds it) and its data settings."""
    family = family_named(cfg.model.family)
    family.require("classification", cfg.model.name)
    return family.build_classifier_encoder(cfg)


def build_classifier(cfg: DictConfig, vit: nn.Module, num_classes: int) -> nn.Module:
    """The method of the config applied to ``vit`` (from :func:`build_vit`), with a new
    ``num_classes`` head."""
    name, options = _method(cfg)
    return build_method(name, vit, num_classes, **options)


def build_segmenter(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The automatic segmentation network of the config's model family (the family builds it)."""
    family = family_named(cfg.model.family)
    family.require("segmentation", cfg.model.name)
    return family.build_segmenter(cfg, num_classes)


def build_interactive(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The box / point prompted segmentation network of the config's model family."""
    family = family_named(cfg.model.family)
    family.require("interactive_segmentation", cfg.model.name)
    return family.build_interactive(cfg)


def sam_normalisation(model_cfg: DictConfig, sam: nn.Module) -> dict[str, tuple[float, ...]]:
    """Input mean/std in 0-1 units: the model config's ``mean``/``std`` when given (MedSAM
    feeds [0, 1] images unnormalised), else SAM's own ImageNet statistics (0-255 units / 255);
    the SAM family's :meth:`~vpt.families.EncoderFamily.data_settings` decides."""
    data = family_of(sam.image_encoder).data_settings(sam.image_encoder, model_cfg)
    return {"mean": data["mean"], "std": data["std"]}


def build_prompted_sam(cfg: DictConfig) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """SAM from ``cfg.model``, its image encoder adapted by ``cfg.method``.

    Returns:
        ``(sam, encoder, data)``: the segment-anything model (its prompt encoder and mask
        decoder for the heads), the adapted encoder (a :class:`~vpt.prompts.PromptedSamEncoder`),
        and the input size and normalisation the data module must use.
    """
    from vpt.backbones.sam import build_sam

    model_cfg = cfg.model
    sam = build_sam(
        model_cfg.name,
        checkpoint=model_cfg.checkpoint,
        img_size=int(model_cfg.img_size or 1024),
        pretrained=model_cfg.pretrained,
        **_model_kwargs(model_cfg),
    )
    name, options = _method(cfg)
    encoder = apply_method(sam.image_encoder, name, **options)
    return sam, encoder, family_of(encoder).data_settings(encoder, model_cfg)


def build_sam_segmenter(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """SAM encoder (method applied) -> multi-class mask decoder, and the data settings."""
    sam, encoder, data = build_prompted_sam(cfg)
    decoder = SamMulticlassDecoder(sam.mask_decoder, sam.prompt_encoder, num_classes)
    decoder.requires_grad_(bool(cfg.task.train_decoder))
    return SamSegmenter(encoder, decoder), data


DECODERS = ("multilevel", "light")


def build_vit_segmenter(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """timm ViT (method applied) -> decoder (``task.decoder``), and the data settings.

    ``task.decoder=multilevel`` (the task configs' default) reads ``task.decoder_levels`` evenly spaced blocks
    and the image (:class:`~vpt.heads.MultiLevelDecoder`); ``light`` is the last block's
    patch tokens only (:class:`~vpt.heads.PatchTokenDecoder`). ``task.decoder_dim`` sets
    the width of either.
    """
    # Always set: the task configs state it, and vpt.config_version migrates older run configs.
    kind = OmegaConf.select(cfg, "task.decoder", default=None)
    if kind is None:
        raise ConfigError(f"task.decoder is not set; use one of {', '.join(DECODERS)} (run configs from before it existed are migrated on loading).")
    kind = str(kind)
    if kind not in DECODERS:
        raise ConfigError(f"task.decoder={kind} is not a decoder; use one of {', '.join(DECODERS)}.")
    vit, data = build_vit(cfg)
    levels = family_of(vit).feature_levels(vit)  # one grid per block
    name, options = _method(cfg)
    encoder = apply_method(vit, name, **options)
    encoder.reset_classifier(0)
    width = int(cfg.task.decoder_dim)
    decoder: nn.Module
    if kind == "light":
        decoder = PatchTokenDecoder(levels[-1].width, num_classes, hidden_dim=width)
    else:
        blocks = evenly_spaced_blocks(len(levels), int(cfg.task.decoder_levels))
        decoder = MultiLevelDecoder(
            [levels[block].width for block in blocks], num_classes, blocks, hidden_dim=width, in_chans=vit.patch_embed.proj.in_channels,
            image_stem=bool(cfg.task.image_stem),
        )
    features = str(cfg.task.encoder_features)
    if features not in ("real", "zeros"):
        raise ConfigError(f"task.encoder_features={features} is not valid; use real, or zeros (a decoder-alone control).")
    return VitSegmenter(encoder, decoder, zero_features=features == "zeros"), data


def build_interactive_sam(cfg: DictConfig) -> tuple[InteractiveSamSegmenter, dict[str, Any]]:
    """The adapted SAM encoder and single-mask decoder, and the data settings SAM expects."""
    sam, encoder, data = build_prompted_sam(cfg)
    decoder = SamSingleMaskDecoder(sam.prompt_encoder, sam.mask_decoder)
    decoder.requires_grad_(bool(cfg.task.train_decoder))
    decoder.sam_prompt_encoder.requires_grad_(False)  # SAM's prompt encoder never trains here
    return InteractiveSamSegmenter(encoder, decoder), data
