"""The data modules a config may name, and the one function that builds them.

Configs name their data module the Hydra way (``task.data._target_``), but vpt never hands
that string to ``hydra.utils.instantiate``: configs also come back from run folders and
trained-weights files, and a crafted ``_target_`` there (``logging.FileHandler``,
``os.system``) would run on loading. Only the names registered here are built; the rest of
the node is passed as keyword arguments.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import lightning as L

from vpt.errors import ConfigError

__all__ = ["register_datamodule", "available_datamodules", "build_datamodule"]

# name -> "module:Class"; the full dotted paths are the ``_target_`` values of the shipped
# configs (and of every run folder written so far), the short names read better in new ones.
_DATA_MODULES: dict[str, str] = {
    "image_folder": "vpt.data.classification:ImageFolderDataModule",
    "csv": "vpt.data.classification:CsvDataModule",
    "shapes": "vpt.data.synthetic_shapes:SyntheticShapesDataModule",
    "volumes": "vpt.data.medical.datamodule:VolumeSegmentationDataModule",
}
_ALIASES: dict[str, str] = {
    "vpt.data.ImageFolderDataModule": "image_folder",
    "vpt.data.classification.ImageFolderDataModule": "image_folder",
    "vpt.data.CsvDataModule": "csv",
    "vpt.data.classification.CsvDataModule": "csv",
    "vpt.data.SyntheticShapesDataModule": "shapes",
    "vpt.data.synthetic_shapes.SyntheticShapesDataModule": "shapes",
    "vpt.data.medical.VolumeSegmentationDataModule": "volumes",
    "vpt.data.medical.datamodule.VolumeSegmentationDataModule": "volumes",
}
_REGISTERED_CLASSES: dict[str, type] = {}


def register_datamodule(name: str, cls: type) -> None:
    """Make ``task.data._target_: <name>`` build ``cls`` (call it from your own Python code).

    Args:
        name: The name configs use.
        cls: A ``LightningDataModule`` subclass.
    """
    if name in _DATA_MODULES or name in _REGISTERED_CLASSES or name in _ALIASES:
        raise ValueError(f"data module {name!r} is registered twice")
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise TypeError(f"{cls!r} is not a LightningDataModule subclass")
    _REGISTERED_CLASSES[name] = cls


def available_datamodules() -> list[str]:
    return sorted([*_DATA_MODULES, *_REGISTERED_CLASSES])


def _resolve(name: str) -> type:
    name = _ALIASES.get(name, name)
    if name in _REGISTERED_CLASSES:
        return _REGISTERED_CLASSES[name]
    if name not in _DATA_MODULES:
        raise ConfigError(
            f"task.data._target_={name!r} is not a vpt data module; vpt builds only its registered data modules "
            f"{available_datamodules()} (register your own with vpt.data.registry.register_datamodule)."
        )
    module_name, class_name = _DATA_MODULES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_datamodule(config: Mapping[str, Any], **extra: Any) -> L.LightningDataModule:
    """Build the data module a ``task.data`` node names.

    Args:
        config: Plain mapping with ``_target_`` (a registered name or the dotted path of a
            vpt data module) and the data module's keyword arguments.
        **extra: Keyword arguments the task adds (image size, normalisation, classes).

    Raises:
        ConfigError: the name is not registered, or the options do not fit the class.
    """
    options = dict(config)
    name = options.pop("_target_", None) or options.pop("name", None)
    if not name:
        raise ConfigError("task.data names no data module (task.data._target_); pick a task config from configs/task/.")
    for key in [k for k in options if k.startswith("_") and k.endswith("_")]:
        options.pop(key)  # Hydra's own keys (_convert_, _recursive_, _partial_) mean nothing here
    for key, value in options.items():
        if isinstance(value, Mapping) and "_target_" in value:
            raise ConfigError(f"task.data.{key} holds a _target_; vpt builds no objects named in configs, give plain values.")
    cls = _resolve(str(name))
    try:
        return cls(**options, **extra)
    except TypeError as error:
        if "unexpected keyword argument" in str(error) or "missing" in str(error):
            raise ConfigError(f"task.data does not fit {cls.__name__}: {error}; check the task.data.* keys.") from None
        raise
