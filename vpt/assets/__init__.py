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
