"""Data: datasets, Lightning data modules, splits and transforms."""

from vpt.data.classification import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ArrayDataset,
    ClassificationDataModule,
    CsvDataModule,
    ImageFolderDataModule,
    ImageListDataset,
    read_rgb,
)
from vpt.data.splits import group_split, normalize_fractions, stratified_split
from vpt.data.synthetic_shapes import SHAPE_NAMES, SyntheticShapesDataModule, generate_shapes
from vpt.data.transforms import build_transforms, reseed_worker_transform, to_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "SHAPE_NAMES",
    "ArrayDataset",
    "ClassificationDataModule",
    "CsvDataModule",
    "ImageFolderDataModule",
    "ImageListDataset",
    "SyntheticShapesDataModule",
    "build_transforms",
    "generate_shapes",
    "group_split",
    "normalize_fractions",
    "read_rgb",
    "reseed_worker_transform",
    "stratified_split",
    "to_size",
]
