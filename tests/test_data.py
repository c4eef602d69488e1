"""Tests for diffusers_msgm.data: built-in loaders, forget/retain splits and transforms."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_msgm.data import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    ImageTransform,
    arrays_to_dataset,
    exclude_labels,
    load_digits_dataset,
    load_fashion_mnist_dataset,
    load_image_dataset,
    load_image_folder,
    make_transform_fn,
    read_idx,
    resolve_label_ids,
    split_forget_retain,
)

# ---------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (magic 0x0000 08 ndim, big-endian uint32 dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_fashion(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, dotted: bool = False):
    """Write tiny 4x5 Fashion-MNIST-style IDX files; returns the arrays written."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        sep = "." if dotted else "-"
        suffix = ".gz" if gz else ""
        _write(root / f"{prefix}-images{sep}idx3-ubyte{suffix}", _idx_bytes(images), gz)
        _write(root / f"{prefix}-labels{sep}idx1-ubyte{suffix}", _idx_bytes(labels), gz)
        written[prefix] = (images, labels)
    return written


@pytest.fixture(scope="module")
def digits_all() -> datasets.Dataset:
    return load_digits_dataset("all")


@pytest.fixture
def small_ds() -> datasets.Dataset:
    images = np.zeros((12, 2, 2), dtype=np.uint8)
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    return arrays_to_dataset(images, labels, ["Cat", "Dog", "Bird", "Fish"])


# ---------------------------------------------------------------- digits


def test_digits_shapes_labels_and_values(digits_all):
    assert len(digits_all) == 1797
    assert isinstance(digits_all.features["image"], datasets.Image)
    assert digits_all.features["label"].names == DIGITS_CLASSES
    image = digits_all[0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    pixels = np.stack([np.asarray(digits_all[i]["image"]) for i in range(50)])
    assert pixels.dtype == np.uint8 and pixels.max() == 255 and pixels.min() == 0
    from sklearn.datasets import load_digits

    ref = load_digits()
    np.testing.assert_array_equal(np.asarray(image), np.round(ref.images[0] * 255 / 16).astype(np.uint8))
    assert digits_all["label"][:20] == ref.target[:20].tolist()


def test_digits_split_sizes_disjoint_and_deterministic():
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # ceil(0.2 * 1797)
    assert set(train["label"]) == set(range(10)) and set(test["label"]) == set(range(10))
    again = load_digits_dataset("test")
    assert again["label"][:] == test["label"][:]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again["image"][:30], test["image"][:30]))
    other_seed = load_digits_dataset("test", seed=1)
    assert other_seed["label"][:] != test["label"][:]
    assert len(load_digits_dataset("test", test_fraction=0.5)) in (898, 899)


@pytest.mark.parametrize("kwargs", [{"split": "validation"}, {"test_fraction": 0.0}, {"test_fraction": 1.5}])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_digits_dataset(**kwargs)


# ---------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (True, True), (False, True)])
def test_fashion_mnist_synthetic_idx(tmp_path, gz, dotted):
    written = _fake_fashion(tmp_path, gz=gz, dotted=dotted)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_fashion_mnist_dataset(split, root=tmp_path)
        images, labels = written[prefix]
        assert len(ds) == len(images)
        assert ds.features["label"].names == FASHION_MNIST_CLASSES
        assert ds["label"][:] == labels.tolist()
        first = ds[3]["image"]
        assert first.mode == "L" and first.size == (5, 4)
        np.testing.assert_array_equal(np.asarray(first), images[3])


def test_read_idx_non_uint8_and_detects_gzip_by_content(tmp_path):
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    data = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes()
    (tmp_path / "ints.bin").write_bytes(gzip.compress(data))
    out = read_idx(tmp_path / "ints.bin")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))


def test_read_idx_bad_magic_and_truncation(tmp_path):
    good = _idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    (tmp_path / "bad").write_bytes(b"\x08\x03" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(good[:10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "header")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(ValueError, match="decompress"):
        read_idx(tmp_path / "broken.gz")


def test_fashion_mnist_bad_magic_raises(tmp_path):
    _fake_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\xff\xff\xff\xff" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="bad IDX magic"):
        load_fashion_mnist_dataset("train", root=tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    _fake_fashion(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="expected 20 labels"):
        load_fashion_mnist_dataset("train", root=tmp_path)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist_dataset("train", root=tmp_path / "nowhere")
    assert "--data_root" in str(info.value)
    _fake_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_fashion_mnist_dataset("train", root=tmp_path)) == 20
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        load_fashion_mnist_dataset("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist_dataset("valid", root=tmp_path)


def test_arrays_to_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        arrays_to_dataset(np.zeros((2, 3, 3), dtype=np.float32), [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        arrays_to_dataset(np.zeros((2, 3, 3), dtype=np.uint8), [0, 5], ["a", "b"])


# ---------------------------------------------------------------- forget / retain splits


def test_split_by_ids(digits_all):
    retain, forget = split_forget_retain(digits_all, forget_labels=[3, 7])
    labels = np.asarray(digits_all["label"][:])
    assert len(forget) == int(np.isin(labels, [3, 7]).sum())
    assert len(retain) + len(forget) == len(digits_all)
    assert set(forget["label"][:]) == {3, 7}
    assert not set(retain["label"][:]) & {3, 7}
    # order preserved and images follow their rows
    first_forget = int(np.flatnonzero(np.isin(labels, [3, 7]))[0])
    np.testing.assert_array_equal(np.asarray(forget[0]["image"]), np.asarray(digits_all[first_forget]["image"]))


def test_split_by_names_and_digit_strings(small_ds):
    retain, forget = split_forget_retain(small_ds, "label", ["dog", "BIRD"])
    assert forget["label"][:] == [1, 2] * 4 and retain["label"][:] == [0] * 4
    retain2, forget2 = split_forget_retain(small_ds, forget_labels=[" Cat "])
    assert set(forget2["label"][:]) == {0} and len(retain2) == 8
    _, forget3 = split_forget_retain(small_ds, forget_labels=["1", 1, "dog"])  # duplicates collapse
    assert len(forget3) == 4
    assert resolve_label_ids(small_ds, "label", ["Bird", "0", 1, np.int64(1)]) == [2, 0, 1]
    assert resolve_label_ids(small_ds, "label", "dog") == [1]


def test_split_on_split_result_and_exclude_labels(digits_all):
    retain, _ = split_forget_retain(digits_all, forget_labels=[0])
    retain2, forget2 = split_forget_retain(retain, forget_labels=["1"])
    assert set(forget2["label"][:]) == {1} and not set(retain2["label"][:]) & {0, 1}
    gold = exclude_labels(digits_all, "label", [0])
    assert gold["label"][:] == retain["label"][:]
    with pytest.raises(ValueError, match="retain set would be empty"):
        exclude_labels(digits_all, "label", list(range(10)))


def test_split_errors(small_ds):
    with pytest.raises(ValueError, match="label_column 'target'"):
        split_forget_retain(small_ds, "target", [0])
    with pytest.raises(ValueError, match="forget_labels must name at least one"):
        split_forget_retain(small_ds, "label", [])
    with pytest.raises(ValueError, match="forget_labels must name at least one"):
        split_forget_retain(small_ds, "label")
    with pytest.raises(ValueError, match=r"unknown class name 'horse'.*Cat.*Dog"):
        split_forget_retain(small_ds, "label", ["horse"])
    with pytest.raises(ValueError, match=r"3 \('Fish'\) occur in no row"):
        split_forget_retain(small_ds, "label", ["fish", 0])
    with pytest.raises(ValueError, match="out of range"):
        split_forget_retain(small_ds, "label", [12])
    with pytest.raises(ValueError, match="retain set would be empty"):
        split_forget_retain(small_ds, "label", [0, "dog", 2])
    with pytest.raises(ValueError, match="forget_labels entries must be ints or strings"):
        split_forget_retain(small_ds, "label", [1.5])
    with pytest.raises(ValueError, match="forget_labels contains a boolean"):
        split_forget_retain(small_ds, "label", [True])


def test_split_errors_plain_int_column():
    ds = datasets.Dataset.from_dict({"x": list(range(6)), "y": [5, 5, 6, 6, 7, 7]})
    retain, forget = split_forget_retain(ds, "y", [6])
    assert forget["x"][:] == [2, 3] and retain["x"][:] == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="not a ClassLabel"):
        split_forget_retain(ds, "y", ["six"])
    with pytest.raises(ValueError, match=r"forget_labels 9 occur in no row"):
        split_forget_retain(ds, "y", [9])
    empty = ds.select([])
    with pytest.raises(ValueError, match="occur in no row"):
        split_forget_retain(empty, "y", [5])


# ---------------------------------------------------------------- image folders and dispatch


def _write_pngs(root: Path, layout: dict[str, int], size=(8, 8)) -> None:
    rng = np.random.default_rng(1)
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            array = rng.integers(0, 256, size=size, dtype=np.uint8)
            Image.fromarray(array, mode="L").save(root / folder / f"img{i}.png")


def test_load_image_folder_class_subfolders(tmp_path):
    _write_pngs(tmp_path / "imgs", {"cat": 2, "dog": 3})
    ds = load_image_folder(tmp_path / "imgs", cache_dir=tmp_path / "cache")
    assert len(ds) == 5
    assert ds.features["label"].names == ["cat", "dog"]
    assert sorted(ds["label"][:]) == [0, 0, 1, 1, 1]
    assert ds[0]["image"].size == (8, 8)


def test_load_image_folder_flat_and_empty(tmp_path):
    _write_pngs(tmp_path, {"flat": 3})
    ds = load_image_folder(tmp_path / "flat", cache_dir=tmp_path / "cache")
    assert len(ds) == 3 and "label" not in ds.column_names
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(tmp_path / "missing")


def test_load_image_dataset_dispatch(tmp_path, monkeypatch):
    digits = load_image_dataset("digits", split="test")
    assert len(digits) == 360 and digits.features["label"].names == DIGITS_CLASSES
    _fake_fashion(tmp_path / "fm")
    fashion = load_image_dataset("fashion-mnist", split="test", data_root=tmp_path / "fm")
    assert len(fashion) == 10 and fashion.features["label"].names == FASHION_MNIST_CLASSES

    _write_pngs(tmp_path / "folder", {"a": 2, "b": 1})
    folder = load_image_dataset(str(tmp_path / "folder"), cache_dir=tmp_path / "cache")
    assert len(folder) == 3 and folder.features["label"].names == ["a", "b"]

    saved = digits.select(range(25))
    saved.save_to_disk(str(tmp_path / "saved"))
    # load_dataset must not be reached for a saved dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset called"))
    reloaded = load_image_dataset(tmp_path / "saved")
    assert len(reloaded) == 25 and reloaded["label"][:] == saved["label"][:]
    np.testing.assert_array_equal(np.asarray(reloaded[4]["image"]), np.asarray(saved[4]["image"]))

    datasets.DatasetDict({"train": saved, "test": saved.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_image_dataset(tmp_path / "dd", split="test")) == 5
    with pytest.raises(ValueError, match="available"):
        load_image_dataset(tmp_path / "dd", split="validation")


def test_load_image_dataset_hub_path_calls_load_dataset(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "hub")
    assert load_image_dataset("someone/some-dataset", split="test", cache_dir=tmp_path) == "hub"
    assert calls == [(("someone/some-dataset",), {"split": "test", "cache_dir": str(tmp_path)})]


# ---------------------------------------------------------------- transforms


def _gradient_image(width=8, height=8, mode="L") -> Image.Image:
    array = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    image = Image.fromarray(array, mode="L")
    return image.convert(mode)


def test_transform_shape_range_dtype():
    out = ImageTransform(8, channels=1)(_gradient_image())
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32
    assert out.min().item() == -1.0 and out.max().item() == 1.0
    raw = ImageTransform(8, channels=1, normalize=False)(_gradient_image())
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0
    torch.testing.assert_close(out, raw * 2 - 1)


def test_transform_resize_8_to_16_and_channels():
    up = ImageTransform(16, channels=1)(_gradient_image())
    assert up.shape == (1, 16, 16)
    row = up[0, 0]
    assert torch.all(row[1:] >= row[:-1])  # bilinear keeps the left-to-right gradient monotone
    rgb = ImageTransform(16, channels=3)(_gradient_image())
    assert rgb.shape == (3, 16, 16)
    torch.testing.assert_close(rgb[0], rgb[1])
    gray_from_rgb = ImageTransform(8, channels=1)(_gradient_image(mode="RGB"))
    assert gray_from_rgb.shape == (1, 8, 8)


def test_transform_non_square_center_and_random_crop():
    image = Image.fromarray(np.arange(12 * 6, dtype=np.uint8).reshape(6, 12), mode="L")
    center = ImageTransform(6, normalize=False)(image)
    expected = torch.from_numpy(np.arange(72, dtype=np.float32).reshape(6, 12)[:, 3:9] / 255.0)
    torch.testing.assert_close(center[0], expected)
    crops = [ImageTransform(6, random_crop=True, generator=s, normalize=False)(image) for s in range(10)]
    assert all(c.shape == (1, 6, 6) for c in crops)
    assert len({round(c[0, 0, 0].item() * 255) for c in crops}) > 1
    wide = ImageTransform(4)(Image.new("L", (20, 10)))
    assert wide.shape == (1, 4, 4)


def test_transform_flip_reproducible():
    image = _gradient_image()
    a = ImageTransform(8, random_flip=True, generator=123)
    b = ImageTransform(8, random_flip=True, generator=random.Random(123))
    outs_a, outs_b = [a(image) for _ in range(20)], [b(image) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    flipped = [bool(out[0, 0, 0] > out[0, 0, -1]) for out in outs_a]
    assert any(flipped) and not all(flipped)
    plain = ImageTransform(8)(image)
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs_a)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"resolution": 0}, "resolution"),
        ({"resolution": 8.0}, "resolution"),
        ({"resolution": True}, "resolution"),
        ({"resolution": 8, "channels": 2}, "channels"),
        ({"resolution": 8, "center_crop": True, "random_crop": True}, "random_crop"),
        ({"resolution": 8, "generator": "seed"}, "generator"),
    ],
)
def test_transform_validation(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        ImageTransform(**kwargs)


def test_make_transform_fn_with_set_transform(digits_all):
    ds = digits_all.select(range(6))
    ds.set_transform(make_transform_fn(ImageTransform(16, channels=3)))
    batch = ds[0:4]
    assert set(batch) == {"input", "label"}
    assert batch["input"].shape == (4, 3, 16, 16) and batch["input"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == digits_all["label"][:4]
    row = ds[5]
    assert row["input"].shape == (3, 16, 16) and int(row["label"]) == digits_all[5]["label"]
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    first = next(iter(loader))
    assert first["input"].shape == (3, 3, 16, 16)

    unlabeled = ds.remove_columns("label")
    unlabeled.set_transform(make_transform_fn(ImageTransform(8)))
    assert set(unlabeled[0:2]) == {"input"}
    fn = make_transform_fn(ImageTransform(8), image_column="img")
    with pytest.raises(KeyError, match="img"):
        fn({"image": [_gradient_image()]})
