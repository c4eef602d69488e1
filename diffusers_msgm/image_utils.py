"""Small image helpers shared by the CLI, the training scripts and the benchmarks."""

from __future__ import annotations

import os
import tempfile
from typing import Union

import numpy as np
from diffusers import DiffusionPipeline
from PIL import Image


def images_to_grid(images: Union[list, np.ndarray], nrow: int | None = None, scale: int = 1, padding: int = 0,
                   background: int = 128) -> Image.Image:
    """Tile PIL images (or NHWC arrays in [0, 1]) into one PIL image.

    Each image is enlarged ``scale`` times (nearest neighbour, so pixels stay visible) and separated by
    ``padding`` pixels of grey ``background``.
    """
    if isinstance(images, np.ndarray):
        images = DiffusionPipeline.numpy_to_pil(images)
    if not images:
        raise ValueError("`images` is empty")
    if scale < 1 or padding < 0:
        raise ValueError(f"`scale` must be >= 1 and `padding` >= 0, got {scale}, {padding}")
    n = len(images)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    color = background if images[0].mode == "L" else (background,) * len(images[0].mode)
    grid = Image.new(images[0].mode, (nrow * w + (nrow + 1) * padding, ncol * h + (ncol + 1) * padding), color)
    for k, img in enumerate(images):
        if scale > 1:
            img = img.resize((w, h), resample=Image.NEAREST)
        grid.paste(img, (padding + (k % nrow) * (w + padding), padding + (k // nrow) * (h + padding)))
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
