"""Small image helpers shared by the CLI, the training scripts and the benchmarks."""

from __future__ import annotations

import os
import tempfile
from typing import Union

import numpy as np
from diffusers import DiffusionPipeline
from PIL import Image


def images_to_grid(images: Union[list, np.ndarray], nrow: int | None = None):
    """Tile PIL images (or NHWC arrays in [0, 1]) into one PIL image."""
    if isinstance(images, np.ndarray):
        images = DiffusionPipeline.numpy_to_pil(images)
    if not images:
        raise ValueError("`images` is empty")
    n = len(images)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    w, h = images[0].size
    grid = Image.new(images[0].mode, (nrow * w, ncol * h))
    for k, img in enumerate(images):
        grid.paste(img, ((k % nrow) * w, (k // nrow) * h))
    return grid


def save_image_atomic(image: Image.Image, path: Union[str, os.PathLike]) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same directory, then rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=os.path.splitext(path)[1] or ".png")
    os.close(fd)
    try:
        image.save(tmp, format=(os.path.splitext(path)[1][1:] or "png").upper().replace("JPG", "JPEG"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
