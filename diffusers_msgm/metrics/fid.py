"""Frechet distance (FID) and kernel distance (KID) between two sets of feature vectors.

On small images there is no Inception network worth using, so :func:`classifier_fid_kid` takes the penultimate
features of the project's :class:`~diffusers_msgm.metrics.ImageClassifier` (``classifier.features``). The numbers
are therefore *classifier-feature* FID/KID: comparable between runs that use the same classifier and sample
counts, not with published Inception FIDs.

* FID (Heusel et al. 2017): ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` for the Gaussians fitted to
  the two feature sets. The matrix square root is ``scipy.linalg.sqrtm``; numerical error can give it a tiny
  imaginary part (or make it fail on singular products), so a small ``eps * I`` is added to both covariances when
  the result is not finite, and the **real part** is taken. Classifier features after a ReLU often have dead
  units, so the covariances are singular; scipy's ``LinAlgWarning`` ("Matrix is singular") is then silenced
  since the square root of the PSD-similar product is still well defined. FID is biased upward for small sample
  counts: compare values only at equal sample counts.
* KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimator of the squared MMD with the cubic
  polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets`` random subsets of ``subset_size``
  samples drawn from each set. Unbiased: it is ~0 (and may be slightly negative) for two samples of one
  distribution.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy import linalg

#: Fewer samples than this per set are refused: the covariance of 128-D features from fewer samples is singular
#: and the estimates are dominated by noise.
MIN_SAMPLES = 50


def _as_features(feats: Any, name: str) -> np.ndarray:
    array = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (num_samples, feature_dim), got shape {array.shape}")
    if array.shape[0] < MIN_SAMPLES:
        raise ValueError(
            f"`{name}` has {array.shape[0]} samples; FID/KID need at least {MIN_SAMPLES} (MIN_SAMPLES) per set"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` has non-finite values")
    return array


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """FID between Gaussians fitted to ``feats_a`` and ``feats_b`` (arrays / tensors ``(N, D)``, N >= MIN_SAMPLES).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` with unbiased covariances; the square root
    is ``scipy.linalg.sqrtm`` and its real part is used (see the module docstring; ``eps`` regularises both
    covariances when sqrtm does not return a finite result).
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _check_pair(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0) if value > -1e-6 else value


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: unbiased squared MMD with ``k(x, y) = (x.y / d + 1)^3``, as ``(mean, std)`` over ``subsets`` subsets.

    Each subset draws ``min(subset_size, N_a, N_b)`` samples without replacement from each set (numpy RNG seeded
    with ``seed``). The value can be slightly negative when the two distributions are equal.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _check_pair(a, b)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = [
        _poly_mmd2_unbiased(a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _classifier_features(classifier: Any, images: Any, batch_size: int = 256) -> np.ndarray:
    from .classifier import map_batches

    feats = map_batches(classifier, images, lambda clf, x: clf.features(x).double(), batch_size)
    return torch.cat(feats).numpy() if feats else np.empty((0, classifier.config.feature_dim))


def classifier_fid_kid(
    classifier: Any, images_a: Any, images_b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """FID and KID between two image sets on ``classifier.features`` (an :class:`ImageClassifier`).

    Images as for :func:`~diffusers_msgm.metrics.images_to_tensor` (tensors in [-1, 1]). At least
    :data:`MIN_SAMPLES` images per set. Returns ``{"fid", "kid", "kid_std", "n_a", "n_b"}``.
    """
    fa, fb = _classifier_features(classifier, images_a), _classifier_features(classifier, images_b)
    kid, kid_std = kernel_inception_distance(fa, fb, subsets=subsets, subset_size=subset_size, seed=seed)
    return {"fid": frechet_distance(fa, fb), "kid": kid, "kid_std": kid_std, "n_a": len(fa), "n_b": len(fb)}
