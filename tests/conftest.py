"""Shared fixtures: tiny random-init models and small generated data, so the default
suite runs in minutes on two CPU cores."""

from __future__ import annotations

import os
from typing import Any

import pytest
import timm
import torch

# Never let a test wait on the network: hub look-ups fail at once instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _keep_process_locale():
    """ITK's DICOM code (GDCM) may switch the C locale to "C"; then every later subprocess
    in this pytest process decodes its output as ASCII. Put the locale back after each test."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


def make_tiny_vit(**overrides: Any) -> torch.nn.Module:
    """A 2-block, 48-wide ViT on 32x32 images (8x8 patches -> 16 patch tokens)."""
    kwargs: dict[str, Any] = dict(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5
    )
    kwargs.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)


@pytest.fixture
def tiny_vit():
    return make_tiny_vit
