"""Read weights files without unpickling code, and load them into a model with a report.

``torch.load`` of an arbitrary pickle can run any code the file's author wrote, so this
module only reads ``.safetensors`` and ``weights_only`` pickles (tensors, dicts, numbers).
Loading never drops keys silently: shape mismatches and missing keys are errors that name
the keys, unexpected keys are warnings, and every load returns a :class:`LoadReport`.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vpt.errors import CheckpointError

__all__ = ["SUPPORTED_SUFFIXES", "LoadReport", "existing_checkpoint_path", "read_state_dict", "load_weights"]

_logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUPPORTED_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz")

# Training scripts nest the weights under one of these; the first present one wins, so the
# DINO teacher (the network its papers evaluate) is preferred over a student next to it.
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module", "net", "network")
_DDP_PREFIX = "module."
_MAX_LISTED_MISMATCHES = 5
_MAX_LISTED_MISSING = 10


@dataclass
class LoadReport:
    """What a weights load did.

    Args:
        missing: Model keys the checkpoint did not provide (they keep their initial values).
        unexpected: Checkpoint keys the model has no place for (not loaded).
        skipped: Checkpoint keys deliberately not loaded, such as the classifier head.
        loaded: Number of tensors copied into the model.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    loaded: int = 0

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("skipped", self.skipped)):
            parts.append(f"{len(keys)} {label}" + (f" ({_preview(keys, 5)})" if keys else ""))
        return ", ".join(parts)


def _preview(keys: Sequence[str], limit: int) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def existing_checkpoint_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` once it is known to be a file.

    Raises:
        CheckpointError: the path does not exist or is a folder.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist; check model.checkpoint.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} is a folder, not a weights file; point model.checkpoint at the file inside it.")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from a weights file, never unpickling objects.

    ``.safetensors`` files are read with safetensors; ``.pth``, ``.pt``, ``.bin`` and ``.ckpt``
    with ``torch.load(weights_only=True)``. A state dict nested under a training wrapper key
    (``state_dict``, ``model``, ``teacher``, ``module`` ...) is unwrapped, a DDP ``module.``
    prefix is stripped, and entries that are not tensors (epoch counters, nested dicts) are
    dropped. ``.npz`` archives are not read here: they hold JAX layouts that the ViT builder
    loads with timm's converter.

    Args:
        path: The weights file.

    Returns:
        The tensors keyed by parameter/buffer name, on the CPU.

    Raises:
        CheckpointError: the file is missing, unsafe (pickled objects), unreadable, of an
            unsupported kind, or holds no tensors.
    """
    path = existing_checkpoint_path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        raw = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch_pickle(path)
    elif suffix == ".npz":
        raise CheckpointError(
            f"Checkpoint {path} is a JAX .npz archive, which only the ViT builder reads; "
            "pass it as model.checkpoint to create_vit rather than to read_state_dict."
        )
    else:
        raise CheckpointError(
            f"Checkpoint {path} has the unsupported suffix '{path.suffix}'; "
            f"save the weights as one of {', '.join(SUPPORTED_SUFFIXES)}."
        )

    state_dict = _flatten_to_tensors(_unwrap(raw), path)
    _logger.debug("Read %d tensors from %s.", len(state_dict), path)
    return state_dict


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError, OSError: both mean the file is not usable as is
        raise CheckpointError(
            f"Checkpoint {path} is not a readable safetensors file ({error}); re-download or re-save it."
        ) from None


def _read_torch_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler refuses any global it does not know (a class, a
        # function): the file would run code on load, so we stop rather than fall back.
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"Checkpoint {path} contains pickled Python objects, which vpt does not unpickle for safety; "
                "re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as .safetensors."
            ) from None
        raise _corrupt(path, error) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, IndexError) as error:
        # Truncated zips raise RuntimeError, empty files EOFError, random bytes KeyError.
        raise _corrupt(path, error) from None


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(
        f"Checkpoint {path} cannot be read as a PyTorch file ({reason}); it is truncated or corrupt, so re-download or re-save it."
    )


def _unwrap(raw: Any) -> Any:
    for _ in range(4):  # deep enough for {"state_dict": {"model": {...}}}, bounded against odd files
        if not isinstance(raw, Mapping):
            break
        inner = next((raw[key] for key in _WRAPPER_KEYS if isinstance(raw.get(key), Mapping)), None)
        if inner is None:
            break
        raw = inner
    return raw


def _flatten_to_tensors(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(raw).__name__}, not a state dict; save model.state_dict() instead."
        )
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            dropped.append(str(key))
            continue
        key = str(key)
        tensors[key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key] = value
    if dropped:
        _logger.debug("Ignored %d non-tensor entries of %s: %s", len(dropped), path, _preview(dropped, 10))
    if not tensors:
        raise CheckpointError(
            f"Checkpoint {path} holds no tensors (top-level keys: {_preview([str(k) for k in raw], 5)}); "
            "save the backbone's model.state_dict() to a file and pass that."
        )
    return tensors


def _compile_ignore(ignore: Sequence[str]) -> list[tuple[str, re.Pattern[str] | None]]:
    compiled = []
    for pattern in ignore:
        try:
            regex: re.Pattern[str] | None = re.compile(pattern)
        except re.error:
            regex = None  # plain prefixes like "head[" need not be valid regexes
        compiled.append((pattern, regex))
    return compiled


def _is_ignored(key: str, patterns: list[tuple[str, re.Pattern[str] | None]]) -> bool:
    return any(key.startswith(prefix) or (regex is not None and regex.fullmatch(key)) for prefix, regex in patterns)


def load_weights(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        *,
        ignore: Sequence[str] = (),
        strict_missing: bool = True,
        source: str | Path | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``model``, reporting every key that does not line up.

    Nothing is loaded when any shared key has a different shape, so a failed load never
    leaves the model half-overwritten.

    Args:
        model: The module to load into (in place).
        state_dict: Tensors keyed as in ``model.state_dict()``.
        ignore: Key prefixes or full-match regexes to leave out on both sides: matching
            checkpoint keys are not loaded (listed in ``skipped``) and matching model keys may
            be absent (such as a new classifier head).
        strict_missing: Raise when the checkpoint lacks model keys; if false, warn instead.
        source: Where the weights came from, for messages (a path or a name).

    Returns:
        The :class:`LoadReport`, also logged at info level.

    Raises:
        CheckpointError: shapes differ, or (with ``strict_missing``) model keys are missing.
    """
    what = f"Checkpoint {source}" if source is not None else "The checkpoint"
    patterns = _compile_ignore(ignore)
    model_state = model.state_dict()

    skipped = [key for key in state_dict if _is_ignored(key, patterns)]
    to_load = {key: value for key, value in state_dict.items() if not _is_ignored(key, patterns)}

    # Listed in the model's order (cls_token, pos_embed, patch_embed first), which names the
    # telling keys; safetensors files come back sorted alphabetically.
    mismatched = [
        (key, tuple(to_load[key].shape), tuple(value.shape))
        for key, value in model_state.items()
        if key in to_load and to_load[key].shape != value.shape
    ]
    if mismatched:
        listed = "; ".join(f"{key}: checkpoint {ckpt} vs model {mine}" for key, ckpt, mine in mismatched[:_MAX_LISTED_MISMATCHES])
        more = f" and {len(mismatched) - _MAX_LISTED_MISMATCHES} more" if len(mismatched) > _MAX_LISTED_MISMATCHES else ""
        raise CheckpointError(
            f"{what} has {len(mismatched)} tensors whose shapes do not fit the model ({listed}{more}); "
            "it was trained for another architecture, so choose the model name and size arguments it was saved with."
        )

    missing = [key for key in model_state if key not in to_load and not _is_ignored(key, patterns)]
    unexpected = [key for key in to_load if key not in model_state]
    if missing:
        # Unexpected keys next to missing ones usually mean an extra prefix ("backbone.", "encoder.").
        hint = f", while it has {len(unexpected)} keys the model lacks ({_preview(unexpected, 3)})" if unexpected else ""
        message = (
            f"{what} lacks {len(missing)} of the model's tensors ({_preview(missing, _MAX_LISTED_MISSING)}){hint}; "
            "use a checkpoint of this architecture, with keys named as in model.state_dict()."
        )
        if strict_missing:
            raise CheckpointError(message)
        _logger.warning(message)
    if unexpected:
        _logger.warning(
            "%s has %d keys the model does not use, not loaded: %s",
            what, len(unexpected), _preview(unexpected, _MAX_LISTED_MISSING),
        )

    model.load_state_dict({key: value for key, value in to_load.items() if key in model_state}, strict=False)
    report = LoadReport(
        missing=missing,
        unexpected=unexpected,
        skipped=skipped,
        loaded=sum(1 for key in to_load if key in model_state),
    )
    _logger.info("%s loaded: %s", what, report)
    return report
