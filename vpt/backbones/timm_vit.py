"""Build a timm VisionTransformer backbone and give it weights: a local file, the hub, or none.

Three sources of weights, in order of precedence:

* ``checkpoint``: a local ``.safetensors``/``.pth``/``.pt``/``.bin``/``.ckpt`` state dict
  (read without unpickling objects) adapted by timm's own ``checkpoint_filter_fn``, so
  position embeddings are resized to the model's grid and DINOv2/CLIP/JAX-style key layouts
  are renamed, exactly as timm does for its hub weights; or an original JAX ``.npz``, read
  by timm's converter (``np.load`` without pickle).
* ``pretrained=True``: the hub weights of the timm name, through ``timm.create_model``. A
  machine without network gets :class:`~vpt.errors.WeightsUnavailableError` naming the two
  ways out instead of a stack of HTTP errors.
* neither: random init, warned about loudly, because prompt tuning on a random backbone
  measures nothing about transfer.

The checkpoint's classifier head is never loaded: vpt always trains a new head.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from vpt.backbones.checkpoint import LoadReport, existing_checkpoint_path, load_weights, read_state_dict
from vpt.errors import CheckpointError, ConfigError, WeightsUnavailableError
from vpt.messages import log_setup

__all__ = ["create_vit", "load_vit_checkpoint", "vit_data_config"]

_logger = logging.getLogger(__name__)

# Exception types raised by the download stack live in these packages; only those (plus
# OSError/RuntimeError, which timm and torch.hub raise for missing files) mean "no weights".
_HUB_ERROR_MODULES = ("huggingface_hub", "hf_xet", "httpx", "httpcore", "requests", "urllib3")
_NO_WEIGHTS_PUBLISHED = "No pretrained weights exist"
_STATE_DICT_MISMATCH = "Error(s) in loading state_dict"


_WEIGHTS_HINT = "pass model.checkpoint=/path/to/weights (.safetensors, .pth or .npz) or model.pretrained=false for a random-init backbone."


def create_vit(
        name: str,
        *,
        pretrained: bool = True,
        checkpoint: str | Path | None = None,
        num_classes: int = 0,
        img_size: int | None = None,
        **model_kwargs: Any,
) -> VisionTransformer:
    """Create a timm ViT with weights from a local checkpoint, the hub, or random init.

    Args:
        name: A timm model name, optionally with a pretrained tag
            (``vit_base_patch16_224.augreg2_in21k_ft_in1k``).
        pretrained: Load the hub weights of ``name`` when no ``checkpoint`` is given.
        checkpoint: A local weights file; takes precedence over ``pretrained``. Its
            classifier head is skipped.
        num_classes: Classifier outputs of the returned model; 0 gives an identity head
            (a pure feature extractor).
        img_size: Input resolution; position embeddings of the weights are resized to it.
        **model_kwargs: Further timm architecture arguments (``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``drop_path_rate`` ...).

    Returns:
        The model in train mode with every parameter trainable; freezing is the method's job.

    Raises:
        ConfigError: unknown name, a model that is not a VisionTransformer, or rejected arguments.
        CheckpointError: the checkpoint is missing, unsafe, unreadable or does not fit.
        WeightsUnavailableError: hub weights were asked for but cannot be had.
    """
    kwargs: dict[str, Any] = dict(model_kwargs, num_classes=num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size

    if checkpoint:
        if pretrained:
            _logger.info("model.checkpoint is set, so %s's hub weights are not downloaded.", name)
        model = _build_architecture(name, kwargs)
        load_vit_checkpoint(model, checkpoint)
    elif pretrained:
        model = _create_with_hub_weights(name, kwargs)
    else:
        model = _build_architecture(name, kwargs)
        message = (
            f"Building {name} as a random-init backbone: results will not reflect pretrained transfer; "
            "set model.pretrained=true or model.checkpoint=... for a real run."
        )
        # Logged only (no warnings.warn as well): the console would show it twice. Said at every build
        # (each builds a new random model), but not when a finished run is rebuilt: its training said it.
        log_setup(_logger, logging.WARNING, message, once=False)
    if img_size is not None:
        _warn_if_not_patch_multiple(model, name)
    return model


def _warn_if_not_patch_multiple(model: VisionTransformer, name: str) -> None:
    """Warn when the input size is no multiple of the patch size: the patch grid then leaves
    the last rows/columns of every image out (or pads them, with ``dynamic_img_pad``)."""
    patch_embed = getattr(model, "patch_embed", None)
    size, patch = getattr(patch_embed, "img_size", None), getattr(patch_embed, "patch_size", None)
    if size is None or patch is None:  # no fixed input size to check
        return
    size, patch = tuple(int(side) for side in size), tuple(int(side) for side in patch)
    if all(side % step == 0 for side, step in zip(size, patch)):
        return
    lower = tuple(max(step, side // step * step) for side, step in zip(size, patch))
    upper = tuple(-(-side // step) * step for side, step in zip(size, patch))
    square = len(set(size)) == 1 and len(set(patch)) == 1

    def show(sides: tuple[int, ...]) -> str:
        return str(sides[0]) if square else str(list(sides))

    padded = getattr(patch_embed, "dynamic_img_pad", False)
    effect = "pads each image up to the next multiple" if padded else "never sees the last rows/columns of each image"
    _logger.warning(
        "model.img_size=%s is not a multiple of the patch size %s of %s, so the model %s; "
        "set model.img_size to %s or %s.",
        show(size), show(patch), name, effect, show(lower), show(upper),
    )


def _check_known(name: str) -> None:
    # "hf-hub:org/repo" and "local-dir:/path" names are resolved by timm itself.
    if ":" not in name and not timm.is_model(name):
        raise ConfigError(
            f"Unknown timm model '{name}'; pick a registered name such as vit_base_patch16_224 "
            "(timm.list_models('vit_*') lists them)."
        )


def _check_is_vit(model: torch.nn.Module, name: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"timm model '{name}' is a {type(model).__name__}, not a VisionTransformer, which vpt's prompted "
            "backbone wraps; pick a ViT such as vit_base_patch16_224."
        )


def _build_architecture(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    """The architecture of ``name`` with random weights, validated to be a ViT."""
    _check_known(name)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as error:
        # Constructors reject keywords they do not have (img_size on a ResNet, typos).
        raise ConfigError(
            f"timm model '{name}' rejected the arguments {sorted(kwargs)} ({error}); "
            "use a VisionTransformer name and only its arguments (img_size, patch_size, embed_dim, depth ...)."
        ) from None
    _check_is_vit(model, name)
    return model


def _is_hub_failure(error: Exception) -> bool:
    if isinstance(error, (OSError, ConnectionError, TimeoutError, RuntimeError, ImportError)):
        return True
    return any(cls.__module__.split(".")[0] in _HUB_ERROR_MODULES for cls in type(error).__mro__)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``) opens within ``timeout`` s."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _use_cache_only_when_offline() -> None:
    """Without a route to the hub, let huggingface_hub read its local cache only.

    Otherwise every file is retried five times with back-off (about a minute and some forty
    log lines) before the one useful sentence. ``HF_HUB_OFFLINE=1`` says the same up front.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode() or hub_reachable():
        return
    _logger.info("The Hugging Face hub is not reachable from this machine; looking for the weights in the local cache only.")
    constants.HF_HUB_OFFLINE = True


def _create_with_hub_weights(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    _check_known(name)
    _use_cache_only_when_offline()
    try:
        # One construction: timm builds the model and then fetches weights, applying the
        # variant's own filter (FlexiViT, RADIO resampling) that a hand-made load would miss.
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # classified below; KeyboardInterrupt is not an Exception
        # Rebuilding without weights tells a config mistake (not a ViT, bad keyword) apart
        # from missing weights, and raises ConfigError for the former.
        _build_architecture(name, kwargs)
        if _STATE_DICT_MISMATCH in str(error):
            raise CheckpointError(
                f"The pretrained weights of '{name}' do not fit the architecture arguments {sorted(kwargs)}; "
                "drop the size arguments that change parameter shapes (embed_dim, depth, num_heads ...) "
                "or set model.pretrained=false."
            ) from None
        if _NO_WEIGHTS_PUBLISHED in str(error):
            raise WeightsUnavailableError(f"timm publishes no pretrained weights for '{name}'; {_WEIGHTS_HINT}") from None
        if not _is_hub_failure(error):
            raise
        _logger.debug("Fetching pretrained weights of %s failed.", name, exc_info=error)
        raise WeightsUnavailableError(
            f"Could not download pretrained weights for '{name}' (no network or hub access?); {_WEIGHTS_HINT}"
        ) from None
    _check_is_vit(model, name)
    _logger.info("Loaded pretrained weights of %s from the hub (classifier head: %d classes).", name, kwargs["num_classes"])
    return model


def _classifier_prefixes(model: VisionTransformer) -> list[str]:
    classifier = model.default_cfg.get("classifier", "head") or "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)  # distilled models have two
    return [f"{name}." for name in names]


def load_vit_checkpoint(model: VisionTransformer, checkpoint: str | Path) -> LoadReport:
    """Load a local weights file into a timm ViT, skipping its classifier head.

    Args:
        model: The ViT to load into (in place).
        checkpoint: ``.npz`` (original JAX/big_vision layout) or a file
            :func:`~vpt.backbones.checkpoint.read_state_dict` reads.

    Returns:
        What was loaded, missing, unexpected and skipped.

    Raises:
        CheckpointError: the file is missing, unsafe, unreadable or does not fit the model.
    """
    path = existing_checkpoint_path(checkpoint)
    head_prefixes = _classifier_prefixes(model)
    if path.suffix.lower() == ".npz":
        return _load_npz(model, path, head_prefixes)

    state_dict = read_state_dict(path)
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        raise CheckpointError(
            f"Checkpoint {path} cannot be adapted to {type(model).__name__} ({error}); "
            "use a ViT checkpoint whose patch size and embedding width match the model."
        ) from None
    return load_weights(model, state_dict, ignore=head_prefixes, source=path)


def _load_npz(model: VisionTransformer, path: Path, head_prefixes: list[str]) -> LoadReport:
    import numpy as np

    # timm copies the JAX head whenever its width matches; restoring it afterwards keeps the
    # "checkpoint heads are never loaded" rule the same for every file kind.
    head_state = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if any(key.startswith(prefix) for prefix in head_prefixes)
    }
    try:
        with np.load(path, allow_pickle=False) as archive:
            archive_keys = list(archive.files)
        model.load_pretrained(str(path))
    except Exception as error:  # KeyError (absent layer), ValueError (layout), OSError (not a zip)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"Checkpoint {path} is not a JAX ViT .npz that fits {type(model).__name__} ({reason}); "
            "use the original .npz of this architecture or convert the weights to .safetensors."
        ) from None
    model.load_state_dict(head_state, strict=False)

    skipped = [key for key in archive_keys if re.search(r"(^|/)head/", key)]
    loaded = sum(1 for key in model.state_dict() if not any(key.startswith(p) for p in head_prefixes))
    report = LoadReport(skipped=skipped, loaded=loaded)
    _logger.info("Checkpoint %s loaded: %s", path, report)
    return report


def vit_data_config(model: VisionTransformer) -> dict[str, Any]:
    """Input size and normalisation the model expects, for the data pipeline.

    Mean, std and interpolation come from the weights' pretrained config; the input size is
    the model's own ``patch_embed.img_size``, since timm's resolved config keeps the
    pretrained resolution even when ``img_size`` was overridden.

    Args:
        model: A timm ViT.

    Returns:
        ``{"input_size": (H, W), "mean": (r, g, b), "std": (r, g, b), "interpolation": str}``.
    """
    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    input_size = tuple(int(v) for v in img_size) if img_size is not None else tuple(config["input_size"][-2:])
    return {
        "input_size": input_size,
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "interpolation": config.get("interpolation", "bicubic"),
    }
