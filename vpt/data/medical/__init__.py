"""Medical image segmentation data: volume I/O, CT windowing, data set layouts, a CT phantom
and the slice-wise segmentation data module."""

from vpt.data.medical.datamodule import (
    SliceDataset,
    VolumeDataset,
    VolumeSegmentationDataModule,
    check_label_values,
)
from vpt.data.medical.io import (
    VOLUME_SUFFIXES,
    read_h5_volume,
    read_mask_2d,
    read_npz_slice,
    read_volume,
    read_volume_shape,
    volume_suffix,
    write_volume,
)
from vpt.data.medical.layouts import (
    LAYOUTS,
    SYNAPSE_CLASS_NAMES,
    Case,
    CaseArrays,
    CaseIndex,
    class_names_from_dataset_json,
    detect_layout,
    find_cases,
    load_case,
)
from vpt.data.medical.phantom import (
    DEFAULT_PHANTOM_SHAPE,
    DEFAULT_PHANTOM_SPACING,
    PHANTOM_CLASS_NAMES,
    PHANTOM_MARKER,
    generate_phantom,
    write_phantom_dataset,
)
from vpt.data.medical.transforms import build_segmentation_transforms, to_model_input
from vpt.data.medical.windowing import ABDOMEN_WINDOW, scale_to_unit, window_ct

__all__ = [
    "ABDOMEN_WINDOW",
    "DEFAULT_PHANTOM_SHAPE",
    "DEFAULT_PHANTOM_SPACING",
    "LAYOUTS",
    "PHANTOM_CLASS_NAMES",
    "PHANTOM_MARKER",
    "SYNAPSE_CLASS_NAMES",
    "VOLUME_SUFFIXES",
    "Case",
    "CaseArrays",
    "CaseIndex",
    "SliceDataset",
    "VolumeDataset",
    "VolumeSegmentationDataModule",
    "build_segmentation_transforms",
    "check_label_values",
    "class_names_from_dataset_json",
    "detect_layout",
    "find_cases",
    "generate_phantom",
    "load_case",
    "read_h5_volume",
    "read_mask_2d",
    "read_npz_slice",
    "read_volume",
    "read_volume_shape",
    "scale_to_unit",
    "to_model_input",
    "volume_suffix",
    "window_ct",
    "write_phantom_dataset",
    "write_volume",
]
