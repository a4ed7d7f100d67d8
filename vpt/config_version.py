"""Run configs carry a version; older ones are migrated here, explicitly, when they are read back.

A run folder's ``config.yaml`` (and the copy in its trained weights or checkpoints) is read
back by ``vpt-evaluate``, ``vpt-predict`` and ``vpt-export``. When a key's meaning or default
changes, the change is written down here as a step from one ``config_version`` to the next,
instead of a hidden ``cfg.get(key, old_default)`` in the code that builds the model:

- version 1 (no ``config_version`` key): runs made before ``task.decoder`` existed. Their
  timm-ViT segmentation networks used the light patch-token decoder, so a segmentation config
  without ``task.decoder`` gets ``task.decoder: light``.
- version 2: ``config_version: 2`` in ``configs/train.yaml``; ``task.decoder`` always present
  for segmentation (the task configs' default: ``multilevel``).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from vpt.errors import ConfigError

__all__ = ["CONFIG_VERSION", "migrate_run_config"]

#: The version ``configs/train.yaml`` writes; :func:`migrate_run_config` brings older ones here.
CONFIG_VERSION = 2

_logger = logging.getLogger(__name__)


def migrate_run_config(cfg: DictConfig, source: str) -> DictConfig:
    """``cfg`` brought to :data:`CONFIG_VERSION` (a copy; ``cfg`` is not changed).

    Args:
        cfg: A run config as it was saved.
        source: The file it came from, for messages.

    Raises:
        ConfigError: A version newer than this vpt knows, or not a whole number.
    """
    version = cfg.get("config_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{source} has config_version={version!r}, which is not a version; restore the run's config.yaml.")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{source} was written by a newer vpt (config_version {version}; this one reads up to {CONFIG_VERSION}); update vpt."
        )
    migrated = OmegaConf.create(OmegaConf.to_container(cfg))
    assert isinstance(migrated, DictConfig)
    with open_dict(migrated):
        if version < 2:
            task = migrated.get("task")
            if task is not None and task.get("name") == "segmentation" and "decoder" not in task:
                task.decoder = "light"
                _logger.info("%s is a run config from before task.decoder existed: its segmentation network used task.decoder=light.", source)
        migrated.config_version = CONFIG_VERSION
    # The migrated config read as today's schema: keys it leaves out get today's defaults.
    from vpt.config_schema import typed_run_config

    return typed_run_config(migrated, source)
