"""Dataset layer: offline built-in datasets, forget/retain splits and image transforms."""

from .builtin import (
    BUILTIN_DATASETS,
    DEFAULT_FASHION_MNIST_ROOT,
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    arrays_to_dataset,
    load_digits_dataset,
    load_fashion_mnist_dataset,
    load_image_dataset,
    load_image_folder,
    read_idx,
)
from .splits import exclude_labels, resolve_label_ids, split_forget_retain
from .transforms import IN_MEMORY_LIMIT_BYTES, ImageTransform, make_transform_fn

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IN_MEMORY_LIMIT_BYTES",
    "ImageTransform",
    "arrays_to_dataset",
    "exclude_labels",
    "load_digits_dataset",
    "load_fashion_mnist_dataset",
    "load_image_dataset",
    "load_image_folder",
    "make_transform_fn",
    "read_idx",
    "resolve_label_ids",
    "split_forget_retain",
]
