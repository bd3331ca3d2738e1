"""Data: dataset registry, class names and templates, loaders, class subsets."""

from mmtard.data.augment import TrainAugment, step_generator
from mmtard.data.loaders import DataNotFoundError, RawImages, balanced_subset, to_model_input
from mmtard.data.registry import (
    DATASETS,
    DatasetSpec,
    ImageDataset,
    check_dataset_source,
    create_dataset,
    get_dataset_spec,
    list_datasets,
    parse_part,
    part_positions,
    register_dataset,
    resolve_classes,
)

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DatasetSpec",
    "ImageDataset",
    "RawImages",
    "TrainAugment",
    "balanced_subset",
    "check_dataset_source",
    "create_dataset",
    "get_dataset_spec",
    "list_datasets",
    "parse_part",
    "part_positions",
    "register_dataset",
    "resolve_classes",
    "step_generator",
    "to_model_input",
]
