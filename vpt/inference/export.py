"""A finished run as a shareable model folder, the way Hugging Face Hub model folders look.

    vpt-export run_dir=outputs/2026-12-03/10-00-00 output=models/organ_vpt
    vpt-predict model=models/organ_vpt input=scans/ output=masks/
    >>> run = vpt.load_pretrained("models/organ_vpt")

The folder holds three files and no code:

- ``model.safetensors``: the trained tensors only (prompts, LoRA, adapters ..., the head or
  decoder), with the metadata ``vpt-predict`` needs: the run config, the preprocessing
  (:class:`vpt.data.preprocessing.Preprocessing`) and the base encoder's identity and
  fingerprint. The frozen base encoder is not copied: it is rebuilt from its own weights
  (``model.checkpoint=`` or its hub tag) and checked against the fingerprint.
- ``config.json``: the same run config and preprocessing as plain JSON, with the classes, the
  method and its options, the base encoder and the test metrics, for people and tools that do
  not read safetensors metadata.
- ``README.md``: a model card: task, classes, base encoder and fingerprint, method and
  trained-parameter count, the data it was tested on, the test metrics, how to predict, and
  the base model's licence.

``push_to_hub=<user>/<repo>`` uploads the folder with ``huggingface_hub`` when it is
installed (it is not a vpt dependency).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from vpt.errors import CheckpointError, ConfigError

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "MODEL_CONFIG", "MODEL_WEIGHTS", "export_model", "load_pretrained", "model_card"]

EXPORT_FORMAT = "vpt.model"
EXPORT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_CARD = "README.md"

# Licences of base encoders whose terms are stated by their authors; anything else is left to
# the reader to check (never guessed).
_KNOWN_LICENCES = (
    ("dinov2", "Apache-2.0 (DINOv2 code and weights, Meta AI)"),
    ("sam2", "Apache-2.0 (SAM 2, Meta AI)"),
    ("sam_", "Apache-2.0 (Segment Anything, Meta AI)"),
    ("augreg", "Apache-2.0 (Google Research ViT / AugReg weights)"),
)


def _finished_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from vpt.methods.trained_weights import read_trained_metadata

    for name in ("config.yaml", "prompts.safetensors", "metrics.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a finished vpt run (no {name}); pass run_dir=<the folder a training run wrote>.")
    metadata = read_trained_metadata(run_dir / "prompts.safetensors")
    if not isinstance(metadata.get("preprocessing"), dict):
        raise ConfigError(
            f"{run_dir / 'prompts.safetensors'} was saved before vpt stored the preprocessing with the weights, so "
            "it cannot travel without its data folder; retrain it with this vpt version, or predict with run_dir=<the run> task.data.root=<its data>."
        )
    return metadata, json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def _test_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if key.startswith("test/") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else "n/a"


def _own_weights_licence(base: Mapping[str, Any]) -> str:
    if base.get("checkpoint"):
        return f"that of the checkpoint file `{base['checkpoint']}` (vpt does not know it: check it before you share this model)"
    return "none needed for the base (random initialisation); the trained tensors are yours"


def _licence(name: str) -> str:
    lowered = name.lower()
    for needle, licence in _KNOWN_LICENCES:
        if needle in lowered:
            return licence
    return f"not recorded by vpt: check the licence of the base model `{name}` before you share or use this model"


def model_card(metadata: Mapping[str, Any], metrics: Mapping[str, Any], folder_name: str = "<this folder>") -> str:
    """The ``README.md`` of an exported model (see the module docstring)."""
    preprocessing = metadata["preprocessing"]
    base = metadata.get("base_encoder") or {}
    config = metadata.get("config") or {}
    task = str(metadata.get("task"))
    method = str(metadata.get("method"))
    backbone = str(base.get("name") or metadata.get("backbone"))
    classes = list(preprocessing.get("class_names") or [])
    if base.get("checkpoint"):
        source = f"checkpoint file `{base['checkpoint']}`"
    elif base.get("pretrained"):
        source = "its pretrained weights from the hub (timm tag in the name)"
    else:
        source = "random initialisation (seeded; no pretrained weights)"
    lines = [
        "---",
        "library_name: vpt",
        "tags:",
        "- visual-prompt-tuning",
        f"- {task}",
        f"- {method}",
        "---",
        "",
        f"# {task} with {method} on {backbone}",
        "",
        f"A `vpt` model: the frozen base encoder `{backbone}` with trained `{method}` tensors"
        + (" and a segmentation decoder." if task == "segmentation" else " and a classification head."),
        "",
        "## Classes",
        "",
        "| output | class |",
        "|---|---|",
        *[f"| {index} | {name} |" for index, name in enumerate(classes)],
        "",
        "## Base encoder",
        "",
        f"- family `{base.get('family', (config.get('model') or {}).get('family'))}`, model `{backbone}`, from {source}",
        f"- fingerprint (SHA-256 of its frozen weights): `{base.get('fingerprint', 'not recorded')}`; "
        "prediction refuses a base encoder with another fingerprint",
        f"- licence: {_licence(backbone) if base.get('pretrained') else _own_weights_licence(base)}",
        "",
        "## Method",
        "",
        f"- `{method}` with options `{json.dumps(metadata.get('method_options') or {}, sort_keys=True)}`",
    ]
    trained, total = metrics.get("trainable_params"), metrics.get("total_params")
    if isinstance(trained, int) and isinstance(total, int) and total:
        lines.append(f"- trained parameters: {trained:,} of {total:,} ({100 * trained / total:.2f} %)")
    lines += ["", "## Data and preprocessing", ""]
    lines.append(f"- input: {preprocessing['image_size'][0]}x{preprocessing['image_size'][1]} px, "
                 f"mean {preprocessing['mean']}, std {preprocessing['std']}")
    if task == "segmentation":
        window = preprocessing.get("window")
        modality = preprocessing.get("modality")
        rule = f"CT window {window} HU" if window else "each volume scaled by its 0.5/99.5 percentiles"
        if preprocessing.get("intensity") == "unit":
            intensity = f"the training images were already in [0, 1] (only clipped); scans given to vpt-predict: {rule}"
        else:
            intensity = rule
        lines.append(f"- modality: {modality or 'not stated by the data set'}; intensities: {intensity}")
        spacing = preprocessing.get("spacing")
        slices = "z-1, z, z+1 as channels (2.5D)" if preprocessing.get("context_slices") else "one slice"
        pixels = f"{spacing} mm (resampled)" if spacing else "the scan's own"
        tiles = preprocessing.get("patch_size") or "none (whole slices resized)"
        lines.append(f"- slices: {slices}; pixel size: {pixels}; tiles: {tiles}")
        cases = metrics.get("test/cases")
        if isinstance(cases, dict):
            lines.append(f"- tested on {len(cases)} held-out case(s)")
    data_root = ((config.get("task") or {}).get("data") or {}).get("root")
    if data_root:
        lines.append(f"- trained on the data folder `{Path(str(data_root)).name}` (not included)")
    scalars = _test_scalars(metrics)
    lines += ["", "## Test metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in scalars.items()] or ["| (none recorded) | |"]
    per_organ = metrics.get("test/per_organ")
    if isinstance(per_organ, dict) and per_organ:
        lines += ["", "| class | Dice |", "|---|---|"]
        lines += [f"| {name} | {_number(scores.get('dice'))} |" for name, scores in per_organ.items()]
    checkpoint_hint = " model.checkpoint=<the base weights file>" if base.get("checkpoint") else ""
    python_hint = ', overrides=["model.checkpoint=<the base weights file>"]' if base.get("checkpoint") else ""
    lines += [
        "",
        "## How to predict",
        "",
        "```bash",
        "# with vpt installed (pip install -e . in its repository)",
        f"vpt-predict model={folder_name} input=<scans or images> output=<folder>{checkpoint_hint}",
        "```",
        "",
        "```python",
        "import vpt",
        f"run = vpt.load_pretrained(\"{folder_name}\"{python_hint})",
        "```",
        "",
        "No training data is needed: the preprocessing is stored with the weights.",
        "",
    ]
    return "\n".join(lines)


def export_model(run_dir: str | Path, output: str | Path, push_to_hub: Optional[str] = None) -> Path:
    """Write a finished run as a model folder (see the module docstring).

    Args:
        run_dir: The run folder.
        output: The folder to create; it must not exist or be empty (nothing is overwritten).
        push_to_hub: A Hugging Face Hub repository id to upload the folder to afterwards.

    Returns:
        The model folder.

    Raises:
        ConfigError: Not a finished run, a run saved without its preprocessing, an output that
            holds files, or ``push_to_hub`` without ``huggingface_hub`` installed.
    """
    from vpt.atomic import atomic_write_text
    from vpt.runs import check_folder_writable

    run = Path(run_dir).expanduser()
    out = Path(output).expanduser()
    metadata, metrics = _finished_run(run)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; pass another output=<new folder>.")
    if push_to_hub:
        _hub_api()  # refuse before writing anything
    check_folder_writable(out, "output")
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(run / "prompts.safetensors", out / MODEL_WEIGHTS)
    except OSError as error:
        raise ConfigError(f"Cannot write {out / MODEL_WEIGHTS} ({error.strerror}); free space or choose another output=.") from None
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "task": metadata.get("task"),
        "class_names": metadata["preprocessing"].get("class_names"),
        "method": metadata.get("method"),
        "method_options": metadata.get("method_options"),
        "base_encoder": metadata.get("base_encoder"),
        "preprocessing": metadata["preprocessing"],
        "test_metrics": _test_scalars(metrics),
        "trainable_params": metrics.get("trainable_params"),
        "total_params": metrics.get("total_params"),
        "config": metadata.get("config"),
    }
    atomic_write_text(out / MODEL_CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / MODEL_CARD, model_card(metadata, metrics, out.name))
    if push_to_hub:
        api = _hub_api()
        try:
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(folder_path=str(out), repo_id=push_to_hub)
        except Exception as error:  # HTTP, login and network errors of huggingface_hub
            raise ConfigError(
                f"Wrote {out}, but uploading it to {push_to_hub} failed ({type(error).__name__}: {error}); "
                "log in with `huggingface-cli login` and check the repository id, then upload the folder again."
            ) from None
    return out


def _hub_api() -> Any:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("push_to_hub needs huggingface_hub, which is not installed; run `pip install huggingface_hub`.") from None
    return HfApi()


def model_weights(folder: str | Path) -> Path:
    """The weights file of an exported model folder, after checking the folder is one.

    Raises:
        ConfigError: Not a folder, or no ``model.safetensors`` / ``config.json``.
        CheckpointError: A ``config.json`` of another format or a newer version.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model={path} is not a folder; pass the folder vpt-export wrote.")
    for name in (MODEL_WEIGHTS, MODEL_CONFIG):
        if not (path / name).is_file():
            raise ConfigError(f"{path} holds no {name}; pass a folder written by vpt-export (or run_dir=<a run folder>).")
    try:
        config = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / MODEL_CONFIG} is not valid JSON ({error}); export the model again.") from None
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path / MODEL_CONFIG} is not a vpt model config (format {config.get('format')!r}); pass a folder written by vpt-export.")
    if not isinstance(config.get("version"), int) or config["version"] > EXPORT_VERSION:
        raise CheckpointError(f"{path} is a vpt model folder of version {config.get('version')!r}; this vpt reads up to {EXPORT_VERSION}: update vpt.")
    return path / MODEL_WEIGHTS


def load_pretrained(folder: str | Path, device: Optional[str] = None, overrides: Sequence[str] = ()) -> Any:
    """An exported model folder, rebuilt and ready to predict (a :class:`vpt.inference.LoadedRun`).

    Args:
        folder: The folder ``vpt-export`` wrote.
        device: ``cpu``, ``cuda``, ...; ``None`` picks CUDA when available.
        overrides: ``key=value`` changes to its config, e.g. ``model.checkpoint=<the base weights>``.
    """
    from vpt.inference.loading import load_run

    return load_run(weights=model_weights(folder), overrides=overrides, device=device)
