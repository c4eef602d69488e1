"""A small CNN classifier for generated images: the judge of the undesirable-generation rate (UGR)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Union

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from ..data import IN_MEMORY_LIMIT_BYTES, ImageTransform, make_transform_fn

logger = logging.getLogger(__name__)

ImagesLike = Union[torch.Tensor, np.ndarray, Sequence[Image.Image]]
#: ``epochs=None`` trains for about this many optimizer steps, within [AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS] epochs
#: (sklearn digits: 30 epochs, Fashion-MNIST: 5 epochs at batch size 128).
AUTO_TARGET_STEPS, AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 2000, 5, 30


class ImageClassifier(ModelMixin, ConfigMixin):
    """Conv(-MaxPool)-BN-ReLU stages (2x max-pooling while the map is >= 8 px), adaptive average pooling to a
    ``pool_size`` x ``pool_size`` grid (1 = global average pooling), a ``feature_dim`` linear + ReLU layer
    (:meth:`features`, e.g. for FID/KID on classifier features) and a linear head (:meth:`forward`).

    Inputs are ``(B, in_channels, resolution, resolution)`` images in [-1, 1], like the diffusion models'.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        resolution: int = 28,
        class_names: list[str] | None = None,
        hidden_channels: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
        dropout: float = 0.1,
        pool_size: int = 3,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or resolution < 1 or feature_dim < 1:
            raise ValueError(
                f"need in_channels >= 1, num_classes >= 2, resolution >= 1, feature_dim >= 1; got {in_channels}, "
                f"{num_classes}, {resolution}, {feature_dim}"
            )
        if len(hidden_channels) == 0 or min(hidden_channels) < 1:
            raise ValueError(f"hidden_channels must be a non-empty list of positive ints, got {hidden_channels!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {num_classes}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        channels, size = in_channels, resolution
        for width in hidden_channels:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
            if size >= 8:  # pooling before BN + ReLU does the same work on a 4x smaller map
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(channels * pool_size**2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        c, r = self.config.in_channels, self.config.resolution
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(
                f"ImageClassifier expects images of shape (B, {c}, {r}, {r}) (in_channels={c}, resolution={r}), "
                f"got {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` (after ReLU, before dropout and the head)."""
        self._check_input(x)
        h = F.adaptive_avg_pool2d(self.body(x), self.config.pool_size).flatten(1)
        return F.relu(self.embed(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.drop(self.features(x)))


def images_to_tensor(images: ImagesLike, resolution: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Bring images to a float ``(B, C, H, W)`` tensor in [-1, 1].

    Tensors are taken as already in [-1, 1]; NHWC (or NHW) numpy arrays as in [0, 1] (uint8: 0..255);
    PIL images go through :class:`ImageTransform` (resized/cropped to ``resolution`` when given).
    """
    if isinstance(images, torch.Tensor):
        x = images
    elif isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4:
            raise ValueError(f"numpy images must be NHWC (or NHW), got shape {images.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif array.size and (float(array.min()) < -1e-3 or float(array.max()) > 1.0 + 1e-3):
            raise ValueError(
                f"numpy images must lie in [0, 1] (diffusers' output_type='np'), got [{array.min()}, {array.max()}]"
            )
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    elif isinstance(images, Sequence) and all(isinstance(im, Image.Image) for im in images):
        if len(images) == 0:
            return torch.empty(0, channels or 1, resolution or 1, resolution or 1)
        if channels is None:
            channels = 1 if images[0].mode in ("L", "1", "I", "F") else 3
        if resolution is None:
            resolution = min(images[0].size)
        transform = ImageTransform(resolution, channels)
        x = torch.stack([transform(im) for im in images])
    else:
        raise TypeError(
            "images must be a (B, C, H, W) tensor in [-1, 1], an NHWC numpy array in [0, 1] or a list of PIL images, "
            f"got {type(images).__name__}"
        )
    if x.ndim != 4:
        raise ValueError(f"images must be a 4-D batch (B, C, H, W), got shape {tuple(x.shape)}")
    return x.float() if not torch.is_floating_point(x) else x


@torch.no_grad()
def map_batches(classifier: ImageClassifier, images: ImagesLike, fn, batch_size: int = 256) -> list[torch.Tensor]:
    """``fn(classifier, batch)`` over ``images`` in eval mode (training mode restored), results on CPU."""
    x = images_to_tensor(images, classifier.config.resolution, classifier.config.in_channels)
    was_training = classifier.training
    classifier.eval()
    try:
        return [fn(classifier, x[i : i + batch_size].to(classifier.device, classifier.dtype)).cpu()
                for i in range(0, len(x), batch_size)]
    finally:
        classifier.train(was_training)


def predict(classifier: ImageClassifier, images: ImagesLike, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels ``(B,)`` (int64, on CPU) for images in any form accepted by :func:`images_to_tensor`."""
    labels = map_batches(classifier, images, lambda clf, x: clf(x).argmax(dim=1), batch_size)
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)


def random_shift(x: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` px in x and y (replicate-padding, then a per-sample crop)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows,
        cols,
    ]


class _TensorSource:
    """Images of a dataset as [-1, 1] tensors, materialised once when they fit in memory."""

    def __init__(
        self, dataset: datasets.Dataset, resolution: int, channels: int, image_column: str, label_column: str
    ):
        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise ValueError(f"column {column!r} not in dataset columns {dataset.column_names}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        fn = make_transform_fn(
            ImageTransform(resolution, channels), image_column=image_column, label_column=label_column
        )
        self.dataset = dataset.select_columns([image_column, label_column]).with_transform(fn)
        self.labels = torch.as_tensor(
            np.asarray(dataset.select_columns([label_column]).with_format("numpy")[:][label_column]), dtype=torch.long
        )
        self.images: torch.Tensor | None = None
        if len(dataset) * channels * resolution**2 * 4 <= IN_MEMORY_LIMIT_BYTES:
            self.images = torch.cat([self.dataset[i : i + 2048]["input"] for i in range(0, len(dataset), 2048)])

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            return self.images[index], self.labels[index]
        return self.dataset[index.tolist()]["input"], self.labels[index]


def _class_names(dataset: datasets.Dataset, label_column: str, labels: torch.Tensor) -> list[str]:
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(int(labels.max()) + 1)]


@torch.no_grad()
def _accuracy(classifier: ImageClassifier, source: _TensorSource, batch_size: int, device: torch.device) -> float:
    classifier.eval()
    correct = 0
    for start in range(0, len(source), batch_size):
        x, y = source.batch(torch.arange(start, min(start + batch_size, len(source))))
        correct += int((classifier(x.to(device)).argmax(dim=1).cpu() == y).sum())
    return correct / len(source)


def train_classifier(
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None = None,
    resolution: int | None = None,
    channels: int = 1,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    label_column: str = "label",
    image_column: str = "image",
    augment: bool = True,
    hidden_channels: Sequence[int] = (32, 64, 128),
    feature_dim: int = 128,
    dropout: float = 0.1,
    pool_size: int = 3,
    device: str | torch.device = "cpu",
) -> tuple[ImageClassifier, dict[str, Any]]:
    """Train an :class:`ImageClassifier` with Adam (cosine-decayed ``lr``) and cross-entropy.

    ``resolution`` defaults to the shorter side of the first training image; ``epochs=None`` picks about
    ``AUTO_TARGET_STEPS`` optimizer steps (5 to 30 epochs). Augmentation (``augment``)
    shifts each image by up to 1 px. Runs are repeatable under ``seed`` (the global RNG state is restored).
    Returns ``(classifier in eval mode, {"test_accuracy", "train_accuracy", "final_loss", "train_seconds", ...})``:
    ``test_accuracy`` is ``None`` without ``eval_dataset``; ``train_accuracy``/``final_loss`` are running values
    over the last epoch (augmented, dropout on); ``train_seconds`` covers tensor conversion and training.
    """
    if (epochs is not None and epochs < 1) or batch_size < 2 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 2, lr > 0; got {epochs}, {batch_size}, {lr}")
    if image_column not in train_dataset.column_names:
        raise ValueError(f"image_column {image_column!r} not in dataset columns {train_dataset.column_names}")
    if len(train_dataset) < 2:
        raise ValueError(f"train_dataset needs at least 2 rows, got {len(train_dataset)}")
    if resolution is None:
        resolution = min(train_dataset[0][image_column].size)
    device = torch.device(device)
    start = time.perf_counter()
    train = _TensorSource(train_dataset, resolution, channels, image_column, label_column)
    test = None
    if eval_dataset is not None:
        test = _TensorSource(eval_dataset, resolution, channels, image_column, label_column)
    names = _class_names(train_dataset, label_column, train.labels)
    if len(names) < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {names}")
    load_seconds = time.perf_counter() - start
    steps_per_epoch = max(1, len(train) // batch_size)
    if epochs is None:
        epochs = min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, math.ceil(AUTO_TARGET_STEPS / steps_per_epoch)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        classifier = ImageClassifier(
            in_channels=channels,
            num_classes=len(names),
            resolution=resolution,
            class_names=names,
            hidden_channels=tuple(hidden_channels),
            feature_dim=feature_dim,
            dropout=dropout,
            pool_size=pool_size,
        ).to(device)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / (epochs * steps_per_epoch), 1.0)))
        )
        classifier.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size if step < steps_per_epoch - 1 else None]
                x, y = train.batch(index)
                if augment:
                    x = random_shift(x, 1, generator)
                y = y.to(device)
                logits = classifier(x.to(device))
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(y)
                correct += int((logits.detach().argmax(dim=1) == y).sum())
                seen += len(y)
            logger.info(
                "classifier epoch %d/%d: loss %.4f, acc %.4f", epoch + 1, epochs, loss_sum / seen, correct / seen
            )
    train_seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "test_accuracy": _accuracy(classifier, test, 512, device) if test is not None else None,
        "train_accuracy": correct / seen,
        "final_loss": loss_sum / seen,
        "train_seconds": train_seconds,
        "load_seconds": load_seconds,
        "num_train": len(train),
        "num_eval": len(test) if test is not None else 0,
        "epochs": epochs,
        "resolution": resolution,
    }
    classifier.eval()
    return classifier, metrics
