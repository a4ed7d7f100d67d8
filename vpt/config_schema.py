"""Typed run configs: the model and task sections as dataclasses, stated once.

The YAML files under ``configs/`` pick values; these dataclasses say which keys exist, their
types and their defaults, so the code that builds a run reads ``cfg.task.eval_batch_size``
instead of repeating a default in ``cfg.get("eval_batch_size", 16)``. They are Hydra
structured configs, stored in Hydra's ConfigStore under ``schema/model`` and ``schema/task``
(as the method configs of :mod:`vpt.methods` are dataclasses too), and every entry point
(``vpt-train`` after composing, ``vpt-evaluate`` / ``vpt-predict`` / ``vpt-export`` after
reading a run's config back and migrating its version, :mod:`vpt.config_version`) passes its
config through :func:`typed_run_config`:

- a key that is not a setting (``task.decoder_dims=...``) is refused in one sentence listing
  the settings;
- a value of the wrong type (``task.eval_batch_size=many``) is refused naming the key;
- a key a config leaves out gets the default written here, and the run folder's
  ``config.yaml`` records it.

Nothing named in a file is instantiated: the schema is picked by ``task.name`` from the
three below. ``task.data`` stays a free mapping; the data module's constructor checks its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, ValidationError

from vpt.errors import ConfigError

__all__ = [
    "ModelConfig",
    "LossConfig",
    "ClassificationTaskConfig",
    "SegmentationTaskConfig",
    "InteractiveSegmentationTaskConfig",
    "TASK_SCHEMAS",
    "typed_run_config",
    "with_overrides",
]


@dataclass
class ModelConfig:
    """``model``: the frozen encoder (see ``configs/model/*.yaml``)."""

    name: str = "???"
    family: str = "timm"  # timm | sam | hiera (vpt.families)
    pretrained: bool = False
    checkpoint: Optional[str] = None  # a local weights file; wins over pretrained
    img_size: Optional[int] = None  # None: the family's default input size
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the encoder's constructor
    mean: Optional[List[float]] = None  # None: the family's normalisation
    std: Optional[List[float]] = None
    optimizer: Optional[Dict[str, Any]] = None  # the family's recipe (train.yaml reads it)
    grad_checkpointing: bool = False
    compile: bool = False
    channels_last: bool = False


@dataclass
class LossConfig:
    ce_weight: float = 0.2
    dice_weight: float = 0.8


@dataclass
class ClassificationTaskConfig:
    """``task`` for ``name: classification`` (shapes, image_folder, csv)."""

    name: str = "classification"
    monitor: str = "val/acc"
    monitor_mode: str = "max"
    test_checkpoint: str = "best"  # best | last
    label_smoothing: float = 0.0
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SegmentationTaskConfig:
    """``task`` for ``name: segmentation`` (organ_seg, volume_seg, organ_seg_synthetic)."""

    name: str = "segmentation"
    monitor: str = "val/dice"
    monitor_mode: str = "max"
    test_checkpoint: str = "best"
    class_names: Optional[List[str]] = None  # None: from the data folder
    loss: LossConfig = field(default_factory=LossConfig)
    train_decoder: bool = True
    decoder: str = "multilevel"  # timm ViTs: multilevel | light; Hiera: multilevel | sam2
    decoder_dim: int = 128
    decoder_levels: int = 4
    image_stem: bool = True
    encoder_features: str = "real"  # real | zeros (a control)
    eval_batch_size: int = 16
    nsd_tolerance: float = 1.0
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class InteractiveSegmentationTaskConfig(SegmentationTaskConfig):
    """``task`` for ``name: interactive_segmentation`` (SAM / SAM2 with box or point prompts)."""

    name: str = "interactive_segmentation"
    prompt: str = "box"  # box | point
    box_jitter: float = 0.1
    max_prompts_per_slice: Optional[int] = 4  # None: every organ of a slice
    loss: LossConfig = field(default_factory=lambda: LossConfig(0.5, 0.5))


#: The task schemas by ``task.name`` (a task of one's own may add its schema here).
TASK_SCHEMAS: dict[str, type] = {
    "classification": ClassificationTaskConfig,
    "segmentation": SegmentationTaskConfig,
    "interactive_segmentation": InteractiveSegmentationTaskConfig,
}

_store = ConfigStore.instance()
_store.store(group="schema/model", name="model", node=ModelConfig)
for _name, _schema in TASK_SCHEMAS.items():
    _store.store(group="schema/task", name=_name, node=_schema)


def _typed(section: Any, schema: type, where: str, source: str) -> DictConfig:
    """``section`` merged onto ``schema``'s defaults, or one sentence on what does not fit."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), section)  # type: ignore[return-value]
    except ConfigKeyError as error:
        key = str(getattr(error, "full_key", None) or getattr(error, "key", None) or str(error).split("'")[1])
        parent = _schema_at(schema, key.split(".")[:-1])
        known = ", ".join(item.name for item in fields(parent)) if parent is not None else "the keys of configs/"
        inner = ".".join([where, *key.split(".")[:-1]])
        raise ConfigError(f"{where}.{key} in {source} is not a setting of {inner}; use one of {known}.") from None
    except ValidationError as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
        reason = str(error.msg).strip().splitlines()[0]
        raise ConfigError(f"{where}.{key} in {source} has a value of the wrong type ({reason}); fix it.") from None


def _schema_at(schema: type, path: list[str]) -> type | None:
    """The dataclass at ``path`` inside ``schema`` (``["loss"]`` -> :class:`LossConfig`)."""
    for name in path:
        schema = get_type_hints(schema).get(name)  # type: ignore[assignment]
        if not is_dataclass(schema):
            return None
    return schema


def with_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...], source: str) -> DictConfig:
    """``key=value`` overrides applied to a read-back run config, then typed again, so a key
    that is not a setting or a wrong type is one sentence here too (not OmegaConf's error)."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    try:
        merged = OmegaConf.merge(plain, OmegaConf.from_dotlist(list(overrides)))
    except Exception as error:  # a malformed dotlist entry
        raise ConfigError(f"Cannot apply the overrides {list(overrides)} to {source} ({error}); write them as key=value.") from None
    assert isinstance(merged, DictConfig)
    return typed_run_config(merged, source)


def typed_run_config(cfg: DictConfig, source: str = "the run config") -> DictConfig:
    """``cfg`` with its ``model`` and ``task`` sections typed by the schemas above (a copy).

    Args:
        cfg: A composed or read-back run config.
        source: Where it came from, for messages.

    Raises:
        ConfigError: A key that is not a setting, or a value of the wrong type.
    """
    typed = cfg.copy()
    task = cfg.get("task")
    with open_dict(typed):
        if cfg.get("model") is not None:
            typed.model = _typed(cfg.model, ModelConfig, "model", source)
        if task is not None:
            schema = TASK_SCHEMAS.get(task.get("name"))
            if schema is not None:  # a task registered without a schema is left as it is
                typed.task = _typed(task, schema, "task", source)
    return typed
