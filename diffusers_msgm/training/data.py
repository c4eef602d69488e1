"""Retain / forget data for the training scripts: datasets -> tensors, deterministic and resumable order.

Reproducibility contract: the retain order is a permutation seeded by ``(seed, epoch)`` and the forget batch of
micro-step ``k`` is drawn from a generator seeded by ``(seed, k, process)``, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets
import torch

from ..data import (
    IN_MEMORY_LIMIT_BYTES,
    ImageTransform,
    exclude_labels,
    load_image_dataset,
    load_image_folder,
    resolve_label_ids,
    split_forget_retain,
)

logger = logging.getLogger(__name__)



class ImageTensorDataset(torch.utils.data.Dataset):
    """Images decoded and transformed once, kept as one ``(N, C, H, W)`` float tensor in [-1, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class LazyImageDataset(torch.utils.data.Dataset):
    """Decode + transform on access (for datasets too large to keep in memory)."""

    def __init__(self, dataset: datasets.Dataset, transform: ImageTransform, image_column: str):
        self.dataset, self.transform, self.image_column = dataset, transform, image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.dataset[int(index)][self.image_column])


def to_tensor(dataset: datasets.Dataset, transform: ImageTransform, image_column: str) -> torch.Tensor:
    """Decode and transform every image of ``dataset`` into one tensor."""
    chunks = []
    for batch in dataset.select_columns([image_column]).iter(batch_size=1024):
        chunks.append(torch.stack([transform(img) for img in batch[image_column]]))
    return torch.cat(chunks) if chunks else torch.empty(0)


def as_torch_dataset(dataset: datasets.Dataset, transform: ImageTransform, image_column: str) -> torch.utils.data.Dataset:
    nbytes = len(dataset) * transform.channels * transform.resolution**2 * 4
    if nbytes <= IN_MEMORY_LIMIT_BYTES:
        return ImageTensorDataset(to_tensor(dataset, transform, image_column))
    logger.info("dataset of %.1f GiB decoded lazily", nbytes / 1024**3)
    return LazyImageDataset(dataset, transform, image_column)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``; call ``set_epoch`` before each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def step_generator(seed: int, micro_step: int, process_index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by the run seed, the micro-step, the process and a stream id."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + micro_step) * 997 + process_index) * 31 + stream)


def forget_batch(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` undesirable images (without replacement when there are enough)."""
    n = images.shape[0]
    if n >= batch_size:
        idx = torch.randperm(n, generator=generator)[:batch_size]
    else:
        idx = torch.randint(0, n, (batch_size,), generator=generator)
    return images[idx]


@dataclass
class TrainingData:
    """What the training loop consumes."""

    retain: torch.utils.data.Dataset
    forget: torch.Tensor | None
    concept: str = ""  # human-readable description of what is forgotten / excluded
    forget_label_ids: list[int] = field(default_factory=list)


def _check_image_column(dataset: datasets.Dataset, column: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(f"--image_column {column!r} is not a column of the dataset (columns: {dataset.column_names})")


def _class_names(dataset: datasets.Dataset, label_column: str, ids: list[int]) -> list[str]:
    feature = dataset.features.get(label_column)
    names = getattr(feature, "names", None)
    return [names[i] if names else str(i) for i in ids]


def build_training_data(
    args: argparse.Namespace,
    transform: ImageTransform,
    forget_labels: list | None = None,
    exclude: list | None = None,
) -> TrainingData:
    """Load the data named by ``args`` and split it.

    ``forget_labels`` (``unlearn.py``) splits retain / forget by ``--label_column``; ``exclude`` (``train_score.py
    --exclude_classes``) drops classes; ``args.forget_dir`` / ``args.retain_dir`` give the two sets as folders.
    """
    if getattr(args, "forget_dir", None):
        for flag in ("forget_dir", "retain_dir"):
            if not os.path.isdir(getattr(args, flag)):
                raise ValueError(f"--{flag} {getattr(args, flag)!r} is not a directory")
        retain_ds, forget_ds = load_image_folder(args.retain_dir), load_image_folder(args.forget_dir)
        _check_image_column(retain_ds, args.image_column)
        _check_image_column(forget_ds, args.image_column)
        return TrainingData(
            retain=as_torch_dataset(retain_ds, transform, args.image_column),
            forget=to_tensor(forget_ds, transform, args.image_column),
            concept=f"images in {os.path.basename(os.path.normpath(args.forget_dir))}/",
        )
    dataset = load_image_dataset(args.dataset_name, split=args.train_split, data_root=args.data_root,
                                 cache_dir=args.cache_dir)
    _check_image_column(dataset, args.image_column)
    if forget_labels:
        retain_ds, forget_ds = split_forget_retain(dataset, args.label_column, forget_labels)
        ids = resolve_label_ids(dataset, args.label_column, forget_labels, arg_name="forget_labels")
        names = _class_names(dataset, args.label_column, ids)
        return TrainingData(
            retain=as_torch_dataset(retain_ds, transform, args.image_column),
            forget=to_tensor(forget_ds, transform, args.image_column),
            concept=f"{args.dataset_name} classes {', '.join(names)} (label ids {ids})",
            forget_label_ids=ids,
        )
    concept = ""
    ids: list[int] = []
    if exclude:
        ids = resolve_label_ids(dataset, args.label_column, exclude, arg_name="exclude_classes")
        concept = f"{args.dataset_name} classes {', '.join(_class_names(dataset, args.label_column, ids))} excluded"
        dataset = exclude_labels(dataset, args.label_column, exclude)
    return TrainingData(as_torch_dataset(dataset, transform, args.image_column), None, concept, ids)
