"""Networks: the composition root that builds encoder + method + head for every task
(:mod:`vpt.models.build`) and the segmentation networks it assembles."""

from vpt.models.build import (
    build_classifier,
    build_classifier_encoder,
    build_interactive,
    build_interactive_sam,
    build_prompted_sam,
    build_sam_segmenter,
    build_segmenter,
    build_vit,
    build_vit_segmenter,
    sam_normalisation,
)
from vpt.models.switches import apply_model_switches, prompted_encoders
from vpt.models.segmenters import InteractiveSamSegmenter, SamSegmenter, VitSegmenter

__all__ = [
    "InteractiveSamSegmenter",
    "SamSegmenter",
    "apply_model_switches",
    "prompted_encoders",
    "VitSegmenter",
    "build_classifier",
    "build_classifier_encoder",
    "build_interactive",
    "build_interactive_sam",
    "build_prompted_sam",
    "build_sam_segmenter",
    "build_segmenter",
    "build_vit",
    "build_vit_segmenter",
    "sam_normalisation",
]
