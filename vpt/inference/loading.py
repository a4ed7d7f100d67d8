"""Rebuild a finished run's model for inference: config, frozen backbone, trained weights, device.

A run is rebuilt the way ``vpt-evaluate`` rebuilds it: the resolved config comes from the
run folder's ``config.yaml`` (or from the metadata of a ``prompts.safetensors`` file), the
global seed is set before building (a random-init backbone is then the same one the run
trained on), and only the trained tensors are loaded on top.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vpt.assets import register_resolvers
from vpt.config_schema import with_overrides
from vpt.config_version import migrate_run_config
from vpt.errors import CheckpointError, ConfigError, DataError
from vpt.messages import rebuilding_a_run
from vpt.methods import load_trained_weights
from vpt.data.preprocessing import Preprocessing
from vpt.methods.trained_weights import base_encoder_identity, check_base_encoder, read_trained_metadata
from vpt.tasks import TaskParts, build_task
from vpt.tasks.registry import build_for_prediction

__all__ = [
    "LoadedRun",
    "autocast_context",
    "config_and_weights",
    "load_run",
    "rebuild_run",
    "resolve_device",
    "run_config",
]

_logger = logging.getLogger(__name__)

# Tasks whose predictions need nothing but the image; interactive SAM also needs clicks or
# boxes, which vpt derives from the ground truth.
_PREDICTABLE_TASKS = ("segmentation", "classification")


def config_and_weights(
    run_dir: Optional[str | Path], weights: Optional[str | Path], purpose: str = "evaluate"
) -> tuple[DictConfig, Path]:
    """The resolved config of a finished run and the path of its trained weights.

    Args:
        run_dir: A run folder with ``config.yaml``; its ``prompts.safetensors`` is used
            unless ``weights`` names another file.
        weights: A trained-weights file; without ``run_dir`` its metadata must carry the
            run config.
        purpose: What the caller does with the run, for the message when neither is given.

    Returns:
        ``(config, weights_path)``.

    Raises:
        ConfigError: Neither given, a folder that is not a finished run, or weights
            without a stored config.
        CheckpointError: ``weights`` is missing or not a vpt trained-weights file.
    """
    if run_dir:
        folder = Path(run_dir)
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"{folder} is not a finished vpt run (no config.yaml); pass run_dir=<a run folder> or weights=<prompts.safetensors>.")
        weights_path = Path(weights) if weights else folder / "prompts.safetensors"
        return migrate_run_config(OmegaConf.load(folder / "config.yaml"), str(folder / "config.yaml")), weights_path
    if weights:
        metadata = read_trained_metadata(weights)
        if not isinstance(metadata.get("config"), dict):
            raise ConfigError(f"{weights} carries no run config; pass run_dir=<its run folder> instead.")
        return migrate_run_config(OmegaConf.create(metadata["config"]), str(weights)), Path(weights)
    raise ConfigError(f"Nothing to {purpose}; pass run_dir=<a run folder> or weights=<prompts.safetensors>.")


def resolve_device(name: Optional[str]) -> torch.device:
    """The torch device to predict on.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"``, ``"mps"``; ``None`` or ``"auto"``
            picks the first CUDA GPU when there is one, else the CPU.

    Raises:
        ConfigError: Not a device name, or a device this machine does not have.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a torch device; use device=cpu, cuda or cuda:<index>.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} needs a CUDA GPU, but torch sees none on this machine; use device=cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} does not exist (this machine has {torch.cuda.device_count()} GPU(s)); use device=cuda:0.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} needs Apple's MPS, which torch does not see here; use device=cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name} is not supported for prediction; use device=cpu, cuda or mps.")
    return device


def autocast_context(precision: str, device: torch.device) -> ContextManager[Any]:
    """Mixed precision as the run's Lightning ``trainer.precision`` used it when testing.

    Args:
        precision: Lightning's precision string (``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ...).
        device: Where the model runs.

    Returns:
        An autocast context for the mixed precisions, else a context that does nothing
        (``"16-true"``/``"bf16-true"`` runs predict in float32: more exact, same weights).
    """
    precision = str(precision)
    if precision in ("16-mixed", "16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if precision in ("bf16-mixed", "bf16") and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LoadedRun:
    """A finished run, rebuilt and ready to predict.

    Attributes:
        config: The run's resolved config (with the caller's overrides merged in).
        parts: The task's module, network and metadata (its data module only for runs saved
            before vpt stored their preprocessing, else ``None``); the module is in eval mode
            on ``device``.
        weights_path: The trained-weights file that was loaded.
        class_names: Class names by output index, as the weights were trained on.
        device: Where the model runs.
        precision: The run's ``trainer.precision``.
        trained_metadata: The metadata stored with the trained weights.
        preprocessing: How inputs become the model's inputs: the one saved with the weights,
            or (older runs) read from the rebuilt data module.
    """

    config: DictConfig
    parts: TaskParts
    weights_path: Path
    class_names: list[str]
    device: torch.device
    precision: str = "32-true"
    trained_metadata: dict[str, Any] = field(default_factory=dict)
    preprocessing: Optional[Preprocessing] = None

    def eval_batch_size(self, default: int) -> int:
        """The batch size the run evaluated with (``task.data.eval_batch_size``), else ``default``."""
        size = getattr(self.parts.datamodule, "eval_batch_size", None)
        if size is None:  # as the data modules do: eval_batch_size, else the training batch size
            size = OmegaConf.select(self.config, "task.data.eval_batch_size", default=None)
            size = size or OmegaConf.select(self.config, "task.data.batch_size", default=None)
        return int(size) if size else default

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"classification"``."""
        return str(self.config.task.name)

    def autocast(self) -> ContextManager[Any]:
        """The mixed-precision context the run was tested under (see :func:`autocast_context`)."""
        return autocast_context(self.precision, self.device)


def run_config(
    run_dir: Optional[str | Path] = None,
    weights: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
) -> tuple[DictConfig, Path]:
    """The config of a finished run that can predict, and its weights file; builds nothing.

    Args:
        run_dir: A run folder (see :func:`config_and_weights`).
        weights: A trained-weights file, instead of or besides ``run_dir``.
        overrides: ``key=value`` changes to the run's config (another backbone checkpoint
            path, another data folder).

    Returns:
        ``(config, weights_path)``.

    Raises:
        ConfigError: An interactive SAM run (it needs ground-truth prompts) or another task
            that cannot predict.
    """
    register_resolvers()  # overrides may name packaged assets (${vpt_asset:...})
    cfg, weights_path = config_and_weights(run_dir, weights, purpose="predict with")
    if overrides:
        cfg = with_overrides(cfg, overrides, "the overrides")
    task = str(cfg.task.name)
    source = run_dir or weights_path
    if task == "interactive_segmentation":
        raise ConfigError(
            f"{source} is an interactive SAM run, whose prompts come from ground-truth masks, so it cannot predict "
            "unlabelled images; train a task=organ_seg run (no prompts needed) for prediction."
        )
    if task not in _PREDICTABLE_TASKS:
        raise ConfigError(f"{source} is a {task} run; prediction supports {', '.join(_PREDICTABLE_TASKS)} runs.")
    return cfg, weights_path


def rebuild_run(cfg: DictConfig, weights_path: Path, device: Optional[str] = None) -> LoadedRun:
    """Build the model a run config describes and load its trained weights.

    Args:
        cfg: From :func:`run_config`.
        weights_path: The trained-weights file.
        device: See :func:`resolve_device`.

    Returns:
        The rebuilt run, its module in eval mode on the device.

    Raises:
        ConfigError: A bad device.
        DataError: The data folder of a run saved without its preprocessing is gone.
        CheckpointError: Weights that do not fit the rebuilt model, or a base encoder other
            than the one they were trained on.
    """
    torch_device = resolve_device(device)
    saved = read_trained_metadata(weights_path)
    record = saved.get("preprocessing")
    # The frozen backbone is rebuilt, not loaded: a random-init one is the run's only with its seed.
    L.seed_everything(cfg.seed, verbose=False)
    if isinstance(record, dict):
        # The weights carry their preprocessing: the model is built from it, no data folder read.
        preprocessing = Preprocessing.from_dict(record, str(weights_path))
        if preprocessing.task != str(cfg.task.name):
            raise CheckpointError(
                f"{weights_path} holds the preprocessing of a {preprocessing.task} run but its config is a {cfg.task.name} "
                "run; pass the weights file of that run (or its run_dir=)."
            )
        with rebuilding_a_run():
            parts = build_for_prediction(cfg, preprocessing)
    else:
        parts = _build_from_data(cfg, weights_path)
        preprocessing = Preprocessing.from_datamodule(str(cfg.task.name), parts.datamodule, parts.metadata)
    check_base_encoder(saved.get("base_encoder"), base_encoder_identity(cfg.model, parts.model), weights_path)
    trained = load_trained_weights(parts.model, weights_path)
    built_names = list(parts.metadata.get("class_names") or [])
    trained_names = trained.get("class_names")
    class_names = list(trained_names) if isinstance(trained_names, list) and trained_names else built_names
    if built_names and class_names != built_names:
        _logger.warning(
            "%s was trained on the classes %s but the rebuilt config names %s; outputs use the trained names.",
            weights_path, class_names, built_names,
        )
    parts.module.eval()
    parts.module.to(torch_device)
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    _logger.info("Loaded %s (%s, %d classes) on %s.", weights_path, cfg.task.name, len(class_names), torch_device)
    return LoadedRun(cfg, parts, weights_path, class_names, torch_device, precision, trained, preprocessing)


def _build_from_data(cfg: DictConfig, weights_path: Path) -> TaskParts:
    """A run saved before vpt stored its preprocessing: its data module gives the settings."""
    try:
        with rebuilding_a_run():  # the run's training said what it found and built
            return build_task(cfg)
    except DataError as error:
        root = OmegaConf.select(cfg, "task.data.root", default=None)
        if root is None or Path(str(root)).expanduser().exists():
            raise
        # The builders' own sentence advises on training data; prediction only needs the folder's settings.
        raise DataError(
            f"{weights_path} is rebuilt from its run config, whose data folder {root} does not exist; pass "
            "task.data.root=<the folder the run was trained on> (prediction reads none of its images; runs trained "
            "with this vpt version carry their preprocessing and need no data folder)."
        ) from error


def load_run(
    run_dir: Optional[str | Path] = None,
    weights: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    device: Optional[str] = None,
) -> LoadedRun:
    """Rebuild a finished run's model and load its trained weights (:func:`run_config`, then
    :func:`rebuild_run`).

    Args:
        run_dir: A run folder (see :func:`config_and_weights`).
        weights: A trained-weights file, instead of or besides ``run_dir``.
        overrides: ``key=value`` changes to the run's config.
        device: See :func:`resolve_device`.

    Returns:
        The rebuilt run, its module in eval mode on the device.
    """
    cfg, weights_path = run_config(run_dir, weights, overrides)
    return rebuild_run(cfg, weights_path, device)
