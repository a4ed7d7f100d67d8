"""Small files that ship with vpt (the quickstart's micro backbone)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from vpt.errors import ConfigError

__all__ = ["asset_path", "register_resolvers"]

ASSETS = Path(__file__).resolve().parent


def asset_path(name: str) -> str:
    """Absolute path of a packaged asset; configs write it as ``${vpt_asset:NAME}``."""
    path = ASSETS / name
    if not path.is_file():
        raise ConfigError(f"vpt has no packaged asset {name!r}; reinstall vpt or pass model.checkpoint=PATH.")
    return str(path)


def register_resolvers() -> None:
    """Register the ``vpt_asset`` config resolver (idempotent)."""
    if not OmegaConf.has_resolver("vpt_asset"):
        OmegaConf.register_new_resolver("vpt_asset", asset_path)
    if not OmegaConf.has_resolver("vpt_required"):
        OmegaConf.register_new_resolver("vpt_required", required_value)


def required_value(key: str, example: str = "...") -> None:
    """The ``vpt_required`` resolver: a value the user must give, whatever a parent config says.

    ``???`` cannot mark a key required in a config that extends another: OmegaConf keeps the
    parent's value when merging ``???`` over it (``task=volume_seg`` would silently read
    ``organ_seg``'s Synapse folder). ``key: ${vpt_required:task.data.root,/path/to/Dataset}``
    overrides the parent and, unless the command line sets the key, stops the run naming it.

    Raises:
        ConfigError: always (the resolver only runs when nobody set the key).
    """
    raise ConfigError(f"{key} must be given; add {key}={example} to the command line.")
