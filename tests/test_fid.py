import numpy as np
import pytest

from diffusers_msgm.metrics import MIN_SAMPLES, frechet_distance, kernel_inception_distance


def test_fid_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(x, x)) < 1e-6


def test_fid_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    n, d = 200_000, 4
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 0.5, -1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 2.0, 1.5])  # diagonal variances
    a = mu1 + rng.normal(size=(n, d)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(n, d)) * np.sqrt(s2)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_kid_identical_vs_shifted():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=500)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.01
    assert shifted > 0.05 and shifted > 10 * abs(same)


def test_min_samples_refused():
    x = np.zeros((MIN_SAMPLES - 1, 4))
    y = np.random.default_rng(3).normal(size=(100, 4))
    with pytest.raises(ValueError, match="at least"):
        frechet_distance(x, y)
    with pytest.raises(ValueError, match="at least"):
        kernel_inception_distance(y, x)
