"""Tests for diffusers_msgm.metrics: the UGR classifier, predict() input forms and the UGR itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_msgm.data import DIGITS_CLASSES, ImageTransform, load_digits_dataset
from diffusers_msgm.metrics import (
    ImageClassifier,
    images_to_tensor,
    predict,
    random_shift,
    train_classifier,
    undesirable_generation_rate,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset("train"), load_digits_dataset("test")


@pytest.fixture(scope="module")
def trained(digits):
    train, test = digits
    return train_classifier(train, test, resolution=8, epochs=6, seed=0)


@pytest.fixture(scope="module")
def test_arrays(digits):
    """The digits test split as uint8 (N, 8, 8) images and int labels."""
    _, test = digits
    arrays = np.stack([np.asarray(image) for image in test["image"]])
    return arrays, np.asarray(test["label"])


# ---------------------------------------------------------------- training


def test_train_classifier_reaches_accuracy(trained):
    classifier, metrics = trained
    # 6 epochs measured 0.975 (seed 0); 10 epochs ~0.98, 30 epochs ~0.989.
    assert metrics["test_accuracy"] >= 0.9
    assert metrics["train_seconds"] > 0 and metrics["num_train"] == 1437 and metrics["num_eval"] == 360
    assert not classifier.training
    assert classifier.config.class_names == DIGITS_CLASSES
    assert (classifier.config.in_channels, classifier.config.num_classes, classifier.config.resolution) == (1, 10, 8)


def test_train_classifier_is_deterministic(digits):
    train, _ = digits
    subset = train.select(range(300))
    state = torch.get_rng_state()
    a, metrics_a = train_classifier(subset, resolution=8, epochs=1, batch_size=64, seed=3, hidden_channels=(8, 16))
    b, metrics_b = train_classifier(subset, resolution=8, epochs=1, batch_size=64, seed=3, hidden_channels=(8, 16))
    c, _ = train_classifier(subset, resolution=8, epochs=1, batch_size=64, seed=4, hidden_channels=(8, 16))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left untouched"
    assert metrics_a["test_accuracy"] is None and metrics_a["final_loss"] == metrics_b["final_loss"]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_train_classifier_rejects_bad_input(digits):
    train, _ = digits
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(train, epochs=0)
    with pytest.raises(ValueError, match="nope"):
        train_classifier(train, resolution=8, label_column="nope")
    with pytest.raises(ValueError, match="at least 2 rows"):
        train_classifier(train.select([0]), resolution=8)


def test_random_shift_moves_by_at_most_one_pixel():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    for image, out in zip(x, shifted):
        padded = F.pad(image[None], (1, 1, 1, 1), mode="replicate")[0]
        assert any(torch.equal(out, padded[:, dy : dy + 6, dx : dx + 6]) for dy in range(3) for dx in range(3))
    assert torch.equal(random_shift(x, 0), x)


# ---------------------------------------------------------------- model


def test_save_load_round_trip(trained, tmp_path, test_arrays):
    classifier, _ = trained
    classifier.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ImageClassifier.from_pretrained(tmp_path).eval()
    assert loaded.config.class_names == classifier.config.class_names
    assert tuple(loaded.config.hidden_channels) == tuple(classifier.config.hidden_channels)
    x = images_to_tensor(test_arrays[0][:64])
    with torch.no_grad():
        assert torch.equal(loaded(x), classifier(x))
        assert torch.equal(loaded.features(x), classifier.features(x))


def test_features_shape(trained):
    classifier, _ = trained
    with torch.no_grad():
        features = classifier.features(torch.zeros(3, 1, 8, 8))
    assert features.shape == (3, classifier.config.feature_dim) == (3, 128)


def test_input_shape_mismatch_is_explained(trained):
    classifier, _ = trained
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\).*resolution=8.*\(2, 1, 16, 16\)"):
        classifier(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="in_channels=1"):
        classifier(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="class_names"):
        ImageClassifier(num_classes=3, class_names=["a", "b"])


def test_predict_same_labels_for_tensor_pil_numpy(trained, digits, test_arrays):
    classifier, metrics = trained
    _, test = digits
    arrays, labels = test_arrays
    as_numpy = (arrays.astype(np.float32) / 255.0)[..., None]  # NHWC in [0, 1], like output_type="np"
    transform = ImageTransform(8, 1)
    as_tensor = torch.stack([transform(image) for image in test["image"]])
    from_pil = predict(classifier, test["image"], batch_size=50)
    from_numpy = predict(classifier, as_numpy, batch_size=64)
    from_tensor = predict(classifier, as_tensor)
    assert from_pil.dtype == torch.long and from_pil.shape == (len(labels),)
    assert torch.equal(from_pil, from_numpy) and torch.equal(from_pil, from_tensor)
    assert torch.equal(predict(classifier, arrays), from_pil)  # NHW uint8 is accepted too
    assert (from_pil.numpy() == labels).mean() == pytest.approx(metrics["test_accuracy"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict(classifier, as_numpy * 2 - 1)
    with pytest.raises(TypeError, match="PIL"):
        predict(classifier, "not images")


# ---------------------------------------------------------------- UGR


def _coded_images(codes: list[int]) -> torch.Tensor:
    """Images whose top-left pixel holds an integer code read back by the fake classifiers below."""
    x = torch.zeros(len(codes), 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(codes, dtype=torch.float32)
    return x


def test_ugr_from_logits_exact():
    images = _coded_images([0, 1, 1, 2, 3])

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0, 0, 0].long(), 4).float() * 5.0 - 1.0

    result = undesirable_generation_rate(logits_fn, images, forget_labels=[1], batch_size=2)
    assert result == {"ugr": 0.4, "class_histogram": [1, 2, 1, 1], "n": 5}
    result = undesirable_generation_rate(logits_fn, images, forget_labels=[1, 3, 1])
    assert result["ugr"] == pytest.approx(0.6)
    assert undesirable_generation_rate(logits_fn, images, forget_labels=2)["ugr"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"out of range.*4 classes"):
        undesirable_generation_rate(logits_fn, images, forget_labels=[4])


def test_ugr_from_label_callable():
    images = _coded_images([0, 0, 3, 5, 5, 5])

    def label_fn(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0].long()

    result = undesirable_generation_rate(label_fn, images, forget_labels=[5])
    assert result == {"ugr": 0.5, "class_histogram": [2, 0, 0, 1, 0, 3], "n": 6}
    result = undesirable_generation_rate(label_fn, images, forget_labels=[0, 7])
    assert result["ugr"] == pytest.approx(2 / 6) and len(result["class_histogram"]) == 8
    result = undesirable_generation_rate(label_fn, images, forget_labels=[1], num_classes=10)
    assert result["ugr"] == 0.0 and len(result["class_histogram"]) == 10
    with pytest.raises(ValueError, match="out of range"):
        undesirable_generation_rate(label_fn, images, forget_labels=[10], num_classes=10)
    with pytest.raises(ValueError, match="non-negative"):
        undesirable_generation_rate(label_fn, images, forget_labels=[-1])


def test_ugr_with_trained_classifier(trained, digits):
    classifier, _ = trained
    _, test = digits
    labels = predict(classifier, test["image"])
    expected = float((labels == 3).float().mean())
    by_id = undesirable_generation_rate(classifier, test["image"], forget_labels=[3])
    by_name = undesirable_generation_rate(classifier, test["image"], forget_labels="3")
    assert by_id == by_name
    assert by_id["ugr"] == pytest.approx(expected) and by_id["n"] == len(test)
    assert by_id["class_histogram"] == torch.bincount(labels, minlength=10).tolist()
    assert 0.05 < by_id["ugr"] < 0.15  # ~36 of the 360 test digits are 3s
    with pytest.raises(ValueError, match=r"out of range.*10 classes"):
        undesirable_generation_rate(classifier, test["image"], forget_labels=[10])
    with pytest.raises(ValueError, match="unknown class"):
        undesirable_generation_rate(classifier, test["image"], forget_labels=["cat"])


def test_ugr_errors():
    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 3)

    with pytest.raises(ValueError, match="empty"):
        undesirable_generation_rate(logits_fn, torch.empty(0, 1, 4, 4), forget_labels=[0])
    with pytest.raises(ValueError, match="empty"):
        undesirable_generation_rate(logits_fn, [], forget_labels=[0])
    with pytest.raises(ValueError, match="at least one"):
        undesirable_generation_rate(logits_fn, torch.zeros(2, 1, 4, 4), forget_labels=[])
    with pytest.raises(ValueError, match="2-D logits"):
        undesirable_generation_rate(lambda x: torch.zeros(len(x)), torch.zeros(2, 1, 4, 4), forget_labels=[0])
    with pytest.raises(ValueError, match="3 predictions for a batch of 2"):
        undesirable_generation_rate(lambda x: torch.zeros(3, 3), torch.zeros(2, 1, 4, 4), forget_labels=[0])
    with pytest.raises(TypeError, match="callable"):
        undesirable_generation_rate(42, torch.zeros(2, 1, 4, 4), forget_labels=[0])
