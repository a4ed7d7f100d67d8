"""Predict with a finished run on unlabelled volumes, DICOM series or 2D images.

    vpt-predict run_dir=outputs/2026-11-22/10-00-00 input=scans/ output=masks/
    vpt-predict weights=prompts.safetensors model.checkpoint=vit_b.npz input=ct.nii.gz output=masks/
    vpt-predict model=models/organ_vpt input=scans/ output=masks/      # a folder vpt-export wrote

Arguments are ``key=value`` pairs. This tool's own keys:

  run_dir=RUN                a finished run folder (its config.yaml and prompts.safetensors)
  model=DIR                  a model folder written by vpt-export (model.safetensors, config.json)
  weights=FILE               a trained-weights file (alone: its stored config is used); give
                             several (weights=a weights=b ...) to classify with a prompt
                             bank: every task from one encoder pass, predictions_<task>.csv each
  input=PATH                 a volume (.nii.gz .nii .nrrd .mha .mhd), a 2D image, a folder of
                             them, or a DICOM series folder
  output=DIR                 where the results go; existing files are never overwritten
  save_probabilities=false   also write class probabilities (segmentation)
  batch_size=N               slices (or images) per forward pass; default: the run's eval batch size
  device=auto                cpu, cuda, cuda:<index> or mps; auto picks CUDA when available
  progress=auto              progress bars: true, false, or auto (on a terminal)

Every other key overrides the run's resolved config (for example model.checkpoint=...).

Segmentation runs write, per volume, a label volume of the same name and format with the
input's exact geometry (a DICOM series: <folder>.nii.gz), and per 2D image <name>_mask.png
and <name>_overlay.png; classification runs write predictions.csv (path, predicted, one
probability per class).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from vpt.assets import register_resolvers
from vpt.cli.arguments import key_value_arguments
from vpt.cli.console import quiet_console
from vpt.cli.errors import exit_on_user_error
from vpt.errors import ConfigError

__all__ = ["main"]

register_resolvers()

_logger = logging.getLogger("vpt.predict")

_OWN_KEYS = ("run_dir", "model", "weights", "input", "output", "save_probabilities", "batch_size", "device", "progress")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _flag(key: str, value: Optional[str], default: Optional[bool]) -> Optional[bool]:
    """``true``/``false`` (or ``auto`` for ``None`` where allowed) from the command line."""
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    if lowered == "auto" and key == "progress":
        return None
    raise ConfigError(f"{key}={value} is not a yes/no value; use {key}=true or {key}=false.")


def _positive_int(key: str, value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{key}={value} is not valid; use a whole number of 1 or more.")
    return number


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``vpt-predict key=value ...``); returns nothing (call
    :func:`vpt.inference.predict` for the list of written files)."""
    own: dict[str, Optional[str]] = {key: None for key in _OWN_KEYS}
    overrides = []
    weights: list[str] = []
    for key, value in key_value_arguments(argv, "vpt-predict", __doc__):
        if key == "weights":
            weights.append(value)
        elif key in own:
            own[key] = value
        else:
            overrides.append(f"{key}={value}")
    own["weights"] = weights[0] if weights else None
    if own["model"]:
        if own["run_dir"] or weights:
            raise ConfigError("Pass one of model=<exported folder>, run_dir= or weights=, not several.")
        from vpt.inference.export import model_weights

        own["weights"] = str(model_weights(own["model"]))
    if not own["input"]:
        raise ConfigError("No input given; pass input=<a volume file, a folder of volumes or 2D images, or a DICOM series folder>.")
    # torch, Lightning and the backbones load only for a command that will run.
    from vpt.inference import predict
    from vpt.inference.predict import predict_bank

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    quiet_console()  # after basicConfig: its console handler gets the filters too
    if len(weights) > 1:
        if own["run_dir"]:
            raise ConfigError("Pass either run_dir= or several weights= (a prompt bank), not both.")
        written = predict_bank(
            own["input"], own["output"], weights, overrides=overrides,
            batch_size=_positive_int("batch_size", own["batch_size"]), device=own["device"],
            progress=_flag("progress", own["progress"], None),
        )
        folders = sorted({str(path.parent) for path in written})
        print(f"Wrote {len(written)} file(s) to {', '.join(folders) if folders else own['output']}")
        return
    written = predict(
        own["input"],
        own["output"],
        run_dir=own["run_dir"],
        weights=own["weights"],
        overrides=overrides,
        batch_size=_positive_int("batch_size", own["batch_size"]),
        device=own["device"],
        save_probabilities=bool(_flag("save_probabilities", own["save_probabilities"], False)),
        progress=_flag("progress", own["progress"], None),
    )
    folders = sorted({str(path.parent) for path in written})
    print(f"Wrote {len(written)} file(s) to {', '.join(folders) if folders else own['output']}")


if __name__ == "__main__":
    main()
