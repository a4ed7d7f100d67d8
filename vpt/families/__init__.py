"""Encoder families behind one seam (:class:`EncoderFamily`): timm ViTs, segment-anything's
ViT and SAM2's Hiera. A new family is one file here that registers itself, plus its model
configs; nothing else in vpt tests which family an encoder belongs to."""

from vpt.families.base import (
    EncoderFamily,
    FeatureLevel,
    available_families,
    family_named,
    family_of,
    is_wrapped,
    register_family,
    wrapper_types,
)

# Each module registers its family on import.
from vpt.families import timm_vit as _timm_vit  # noqa: E402,F401  isort: skip
from vpt.families import sam as _sam  # noqa: E402,F401  isort: skip
from vpt.families import hiera as _hiera  # noqa: E402,F401  isort: skip

__all__ = ["EncoderFamily", "FeatureLevel", "available_families", "family_named", "family_of", "is_wrapped", "register_family", "wrapper_types"]
