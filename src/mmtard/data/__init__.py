"""Data: dataset registry, class names and templates, loaders, class subsets."""

from mmtard.data.loaders import RawImages, balanced_subset, to_model_input
from mmtard.data.registry import (
    DATASETS,
    DatasetSpec,
    ImageDataset,
    create_dataset,
    get_dataset_spec,
    list_datasets,
    register_dataset,
    resolve_classes,
)

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "ImageDataset",
    "RawImages",
    "balanced_subset",
    "create_dataset",
    "get_dataset_spec",
    "list_datasets",
    "register_dataset",
    "resolve_classes",
    "to_model_input",
]
