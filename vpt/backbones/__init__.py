"""Backbones: timm ViTs and SAM models built with safely loaded, reported weights."""

from vpt.backbones.checkpoint import SUPPORTED_SUFFIXES, LoadReport, load_weights, read_state_dict
from vpt.backbones.sam import SAM_BUILDERS, build_sam, load_sam_checkpoint
from vpt.backbones.timm_vit import create_vit, load_vit_checkpoint, vit_data_config

__all__ = [
    "SUPPORTED_SUFFIXES",
    "LoadReport",
    "SAM_BUILDERS",
    "build_sam",
    "load_sam_checkpoint",
    "create_vit",
    "load_vit_checkpoint",
    "load_weights",
    "read_state_dict",
    "vit_data_config",
]
