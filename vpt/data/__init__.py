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
from vpt.data.loading import available_cpus, default_num_workers, make_loader, resolve_num_workers, warn_once
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
    "available_cpus",
    "build_transforms",
    "default_num_workers",
    "generate_shapes",
    "group_split",
    "make_loader",
    "normalize_fractions",
    "read_rgb",
    "reseed_worker_transform",
    "resolve_num_workers",
    "stratified_split",
    "to_size",
    "warn_once",
]
