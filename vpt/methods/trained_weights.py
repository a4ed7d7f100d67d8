"""Save and load only what a method trained (prompts, projection, head), peft-style.

The file is a ``.safetensors`` of the trainable tensors plus string metadata naming the
backbone, the method and the run's resolved config, so a few MB (prompts + head) stand in
for a run even when the frozen backbone is ViT-H.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vpt.atomic import atomic_path
from vpt.errors import CheckpointError
from vpt.methods.registry import applied_method

__all__ = [
    "trainable_state_dict",
    "save_trained_weights",
    "load_trained_weights",
    "read_trained_metadata",
    "frozen_fingerprint",
    "base_encoder_identity",
    "check_base_encoder",
]

_logger = logging.getLogger(__name__)

FORMAT = "vpt.trained_weights"
FORMAT_VERSION = "1"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of every parameter that requires grad, keyed as in ``model.state_dict()``."""
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen tensors of ``model`` (every parameter that does not train, by name,
    dtype, shape and bytes): the identity of the base encoder the trained tensors sit on.

    Two builds agree exactly when their frozen weights are bit for bit the same, whatever file
    or hub tag they came from. Take it before training changes precision (Lightning's
    ``*-true`` precisions cast the whole model)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            continue
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def base_encoder_identity(model_cfg: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """What the trained tensors were trained on: family, name, pretrained tag or checkpoint file
    name, and :func:`frozen_fingerprint` of the built model (stored as ``base_encoder``)."""
    checkpoint = model_cfg.checkpoint
    return {
        "family": str(model_cfg.family),
        "name": str(model_cfg.name),
        "pretrained": bool(model_cfg.pretrained) and not checkpoint,
        "checkpoint": Path(str(checkpoint)).name if checkpoint else None,
        "fingerprint": frozen_fingerprint(model),
    }


def _describe_base(identity: Mapping[str, Any]) -> str:
    if identity.get("checkpoint"):
        source = f"checkpoint {identity['checkpoint']}"
    elif identity.get("pretrained"):
        source = "its hub weights"
    else:
        source = "random init"
    return f"{identity.get('name')} from {source} (fingerprint {str(identity.get('fingerprint'))[:12]})"


def check_base_encoder(saved: Optional[Mapping[str, Any]], built: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a rebuilt base encoder that is not the one the trained tensors were trained on.

    Args:
        saved: The weights file's ``base_encoder`` (``None`` for files written before vpt stored it:
            nothing to compare).
        built: :func:`base_encoder_identity` of the rebuilt model.
        path: The weights file, for the message.

    Raises:
        CheckpointError: The fingerprints differ; the sentence names both encoders.
    """
    if not saved or not saved.get("fingerprint"):
        return
    if saved["fingerprint"] != built["fingerprint"]:
        raise CheckpointError(
            f"{path} was trained on {_describe_base(saved)}, but the rebuilt base encoder is {_describe_base(built)}; "
            "pass model.checkpoint=<the file it was trained on> (or the same model.name / pretrained tag)."
        )


def save_trained_weights(model: nn.Module, path: str | Path, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the trainable tensors of ``model`` with metadata.

    Args:
        model: The trained model.
        path: Target ``.safetensors`` file.
        metadata: JSON-serialisable values (backbone name, method, config, class names).

    Returns:
        The written path.
    """
    path = Path(path)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    encoder = _method_carrier(model)
    if encoder is not None:
        header["method"] = str(encoder.method_name)
        header["method_options"] = json.dumps(encoder.method_options, sort_keys=True)
    for key, value in (metadata or {}).items():
        header.setdefault(key, value if isinstance(value, str) else json.dumps(value))
    with atomic_path(path) as tmp:
        save_file(trainable_state_dict(model), str(tmp), metadata=header)
    return path


def read_trained_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a trained-weights file, JSON values decoded.

    Raises:
        CheckpointError: the file is missing or not a vpt trained-weights file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Trained-weights file {path} does not exist; pass the prompts.safetensors of a finished run.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Cannot read {path} as safetensors ({error}); pass the prompts.safetensors of a vpt run.") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vpt trained-weights file (no '{FORMAT}' metadata); pass the prompts.safetensors of a vpt run.")
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def _method_carrier(model: nn.Module) -> Optional[nn.Module]:
    """The submodule :func:`vpt.methods.apply_method` returned (it records the method)."""
    return applied_method(model)


def _check_method(model: nn.Module, metadata: Mapping[str, Any], path: Path) -> None:
    encoder = _method_carrier(model)
    if encoder is None or "method_options" not in metadata:
        return
    saved = (metadata.get("method"), metadata.get("method_options"))
    built = (encoder.method_name, json.loads(json.dumps(encoder.method_options)))
    if saved != built:
        raise CheckpointError(
            f"{path} was trained with method={saved[0]} {saved[1]}, but the model was built with method={built[0]} "
            f"{built[1]}; build it with the method and options the file names."
        )


def load_trained_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a trained-weights file into ``model``, whose trainable set must match it exactly.

    Args:
        model: A model built the same way as the one that was saved (same backbone,
            method and number of classes).
        path: A file written by :func:`save_trained_weights`.

    Returns:
        The file's metadata.

    Raises:
        CheckpointError: missing, extra or mis-shaped tensors (named in the message).
    """
    metadata = read_trained_metadata(path)
    _check_method(model, metadata, Path(path))
    tensors = load_file(str(path))
    expected = dict(model.named_parameters())
    trainable = {name for name, param in expected.items() if param.requires_grad}
    missing = sorted(trainable - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = [
        f"{name} {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        for name, tensor in tensors.items()
        if name in expected and tensor.shape != expected[name].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}")
        if mis_shaped:
            problems.append(f"mis-shaped {mis_shaped[:5]}")
        raise CheckpointError(
            f"{path} does not fit this model ({'; '.join(problems)}); build the model with the backbone, "
            f"method and classes the file was trained with (its metadata names them: "
            f"backbone={metadata.get('backbone')}, method={metadata.get('method')})."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor.to(expected[name].dtype))
    return metadata
