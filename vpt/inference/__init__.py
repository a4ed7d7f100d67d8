"""Inference with finished runs: rebuild the model, read unlabelled inputs, write predictions.

- :mod:`vpt.inference.loading`: a run folder or weights file -> the rebuilt model on a device.
- :mod:`vpt.inference.inputs`: what ``input=`` names (volumes, DICOM series, 2D images).
- :mod:`vpt.inference.segmentation` / :mod:`vpt.inference.classification`: preprocessing and
  batched prediction, as the run's testing did them.
- :mod:`vpt.inference.volumes` / :mod:`vpt.inference.images` / :mod:`vpt.inference.outputs`:
  outputs that keep the input's geometry and never replace a file.
- :mod:`vpt.inference.predict`: :func:`predict`, all of it together (``vpt-predict``).
"""

from vpt.inference.inputs import PredictionInput, find_inputs
from vpt.inference.loading import (
    LoadedRun,
    config_and_weights,
    load_run,
    rebuild_run,
    resolve_device,
    run_config,
)
from vpt.inference.predict import PREDICTIONS_CSV, predict

__all__ = [
    "PREDICTIONS_CSV",
    "LoadedRun",
    "PredictionInput",
    "config_and_weights",
    "find_inputs",
    "load_run",
    "predict",
    "rebuild_run",
    "resolve_device",
    "run_config",
]
