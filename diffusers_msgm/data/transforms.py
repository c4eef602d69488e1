"""Image preprocessing with PIL + numpy (no torchvision), as in diffusers' unconditional training example."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

#: datasets smaller than this (as float32 tensors) are decoded once and kept in memory.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


class ImageTransform:
    """PIL image -> float tensor ``(channels, resolution, resolution)``.

    Steps: convert to ``"L"`` (channels=1) or ``"RGB"`` (channels=3); resize the shorter side to
    ``resolution`` (bilinear); crop to a square, at the center unless ``random_crop``; flip
    horizontally with p=0.5 if ``random_flip``; scale to [0, 1], then to [-1, 1] if ``normalize``.
    ``center_crop`` is accepted for parity with the diffusers example: the crop is centered anyway
    unless ``random_crop=True``. Random choices come from ``generator`` (a ``random.Random`` or an
    int seed), so a transform built with the same seed repeats the same flips and crops.
    """

    def __init__(
        self,
        resolution: int,
        channels: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
        normalize: bool = True,
        random_crop: bool = False,
        generator: random.Random | int | None = None,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if center_crop and random_crop:
            raise ValueError("center_crop and random_crop cannot both be True")
        if generator is not None and not isinstance(generator, (random.Random, int)):
            raise ValueError(f"generator must be a random.Random, an int seed or None, got {type(generator).__name__}")
        self.resolution = int(resolution)
        self.channels = channels
        self.center_crop = center_crop
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.normalize = normalize
        self.generator = generator if isinstance(generator, random.Random) else random.Random(generator)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, channels={self.channels}, "
            f"center_crop={self.center_crop}, random_crop={self.random_crop}, "
            f"random_flip={self.random_flip}, normalize={self.normalize})"
        )

    def resize(self, image: Image.Image) -> Image.Image:
        """Bilinear resize so that the shorter side equals ``resolution`` (aspect ratio kept)."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short == self.resolution:
            return image
        new_long = max(self.resolution, int(round(self.resolution * long / short)))
        size = (self.resolution, new_long) if width <= height else (new_long, self.resolution)
        return image.resize(size, resample=Image.Resampling.BILINEAR)

    def crop(self, image: Image.Image) -> Image.Image:
        """Square ``resolution`` crop: centered, or at a random offset if ``random_crop``."""
        width, height = image.size
        size = self.resolution
        if self.random_crop:
            left, top = self.generator.randint(0, width - size), self.generator.randint(0, height - size)
        else:
            left, top = (width - size) // 2, (height - size) // 2
        if (left, top, width, height) == (0, 0, size, size):
            return image
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or numpy array, got {type(image).__name__}")
        image = self.crop(self.resize(image.convert("L" if self.channels == 1 else "RGB")))
        if self.random_flip and self.generator.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor * 2.0 - 1.0 if self.normalize else tensor


def make_transform_fn(
    transform: Callable[[Image.Image], torch.Tensor],
    image_column: str = "image",
    label_column: str | None = "label",
) -> Callable[[dict[str, list[Any]]], dict[str, torch.Tensor]]:
    """A batch function for ``dataset.set_transform``: ``{"input": (B, C, H, W) tensor, "label": (B,) tensor}``.

    ``"label"`` is present only if the batch has ``label_column``.
    """

    def transform_batch(batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        if image_column not in batch:
            raise KeyError(f"image_column {image_column!r} not in batch columns {sorted(batch)}")
        output = {"input": torch.stack([transform(image) for image in batch[image_column]])}
        if label_column is not None and label_column in batch:
            output["label"] = torch.as_tensor(np.asarray(batch[label_column]), dtype=torch.long)
        return output

    return transform_batch
