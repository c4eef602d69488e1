"""Offline image datasets (sklearn digits, Debian's Fashion-MNIST) and the generic loader.

Every loader returns a :class:`datasets.Dataset` with an ``image`` column (``datasets.Image()``)
and, where labels are known, a ``label`` column (``datasets.ClassLabel``), which is the layout of
the corresponding Hugging Face Hub datasets, so training code treats them all the same way.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image as PILImage

DIGITS_CLASSES: list[str] = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
BUILTIN_DATASETS: tuple[str, ...] = ("digits", "fashion_mnist")

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ "IDX file format").
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_PREFIX = {"train": "train", "test": "t10k"}


def arrays_to_dataset(
    images: np.ndarray, labels: np.ndarray | Sequence[int], class_names: Sequence[str]
) -> datasets.Dataset:
    """Build an ``image``/``label`` Dataset from a ``(N, H, W)`` uint8 array of grayscale images.

    Each image is stored as binary PGM bytes (a header plus the raw pixels, no compression), which
    PIL decodes to mode ``"L"``; this avoids a per-image PNG encode and loads 60k images in < 1 s.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a (N, H, W) uint8 array, got shape {images.shape} dtype {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)}), got [{labels.min()}, {labels.max()}]")
    height, width = images.shape[1:]
    header = f"P5\n{width} {height}\n255\n".encode("ascii")
    encoded = [header + image.tobytes() for image in np.ascontiguousarray(images)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    return datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features)


def load_digits_dataset(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> datasets.Dataset:
    """sklearn's 1797 8x8 handwritten digits as grayscale images scaled from 0..16 to 0..255.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``; the split is stratified by class and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
        )
        index = np.sort(train_idx if split == "train" else test_idx)
        images, labels = images[index], labels[index]
    return arrays_to_dataset(images, labels, DIGITS_CLASSES)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (raw or gzipped, detected from its content) into a native-endian numpy array."""
    path = Path(path)
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
            raw = handle.read()
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        raise ValueError(f"{path}: cannot decompress IDX file ({err})") from err
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; is this an IDX file?")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {offset})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        kind = "truncated" if len(raw) - offset < expected else "has trailing data"
        raise ValueError(f"{path}: IDX data {kind}: {len(raw) - offset} bytes for dims {dims}, expected {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    """First existing IDX file for e.g. prefix ``t10k`` and kind ``images`` (``idx3``) under ``root``."""
    idx = "idx3" if kind == "images" else "idx1"
    for stem in (f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"):
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
    return None


def load_fashion_mnist_dataset(split: str = "train", root: str | os.PathLike | None = None) -> datasets.Dataset:
    """Fashion-MNIST (60000 train / 10000 test 28x28 images) from local IDX files.

    ``root`` defaults to :data:`DEFAULT_FASHION_MNIST_ROOT` (Debian package ``dataset-fashion-mnist``);
    files named ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
    ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` are recognised.
    """
    if split not in _FASHION_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root_path = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT).expanduser()
    prefix = _FASHION_PREFIX[split]
    image_file = _find_idx_file(root_path, prefix, "images") if root_path.is_dir() else None
    label_file = _find_idx_file(root_path, prefix, "labels") if root_path.is_dir() else None
    if image_file is None or label_file is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} IDX files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
            f"not found in {root_path}. Install them with `apt-get install dataset-fashion-mnist` "
            f"(they go to {DEFAULT_FASHION_MNIST_ROOT}), or pass root=/--data_root pointing at a folder holding them."
        )
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected (N, H, W) uint8 images, got shape {images.shape} {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_file}: expected {len(images)} labels, got shape {labels.shape}")
    return arrays_to_dataset(images, labels, FASHION_MNIST_CLASSES)


def _list_images(path: Path) -> list[Path]:
    extensions = {ext.lower() for ext in PILImage.registered_extensions()}
    return [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions]


def load_image_folder(
    path: str | os.PathLike, split: str = "train", cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """A flat or class-subfolder directory of images, via the ``imagefolder`` builder.

    Class subfolders become a ``label`` ClassLabel column (sorted names); a flat folder has only ``image``.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path {str(path)!r} is not a directory")
    if not _list_images(path):
        raise ValueError(f"path {str(path)!r} contains no image files")
    return datasets.load_dataset(
        "imagefolder", data_dir=str(path), split=split, cache_dir=None if cache_dir is None else str(cache_dir)
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def load_image_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Load ``name_or_path`` as a Dataset, trying in order:

    1. a built-in name (``"digits"``, ``"fashion_mnist"``; ``data_root`` is the Fashion-MNIST folder);
    2. a local directory saved with ``save_to_disk`` (``load_from_disk``), else an image folder;
    3. a Hugging Face Hub dataset (``datasets.load_dataset(name, split=split, cache_dir=cache_dir)``).
    """
    name = str(name_or_path)
    builtin = name.lower().replace("-", "_")
    if builtin == "digits":
        return load_digits_dataset(split=split)
    if builtin == "fashion_mnist":
        return load_fashion_mnist_dataset(split=split, root=data_root)
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            try:
                loaded = datasets.load_from_disk(str(path))
            except IndexError as err:  # datasets cannot reload a saved dataset that has no rows
                raise ValueError(f"saved dataset {name!r} has no rows") from err
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"split {split!r} not in saved dataset {name!r}; available: {sorted(loaded)}")
                loaded = loaded[split]
            return _non_empty(loaded, name, split)
        return load_image_folder(path, split=split, cache_dir=cache_dir)
    loaded = datasets.load_dataset(name, split=split, cache_dir=None if cache_dir is None else str(cache_dir))
    return _non_empty(loaded, name, split)


def _non_empty(dataset: datasets.Dataset, name: str, split: str) -> datasets.Dataset:
    if len(dataset) == 0:
        raise ValueError(f"dataset {name!r} (split {split!r}) has no rows")
    return dataset
