r"""Rank training images by how memorised they look to a score model (p-Laplace flux, Brokman et al., SSVM 2025).

For a training image x at a small diffusion time t (x_t = alpha_t x + sigma_t z), the noisy samples of x lie near
the sphere S(c, r) with

    c = alpha_t x,        r = radius_scale * sigma_t * sqrt(d)        (d = number of pixels x channels),

the typical distance |sigma_t z| of x_t from c (their code: y = c + r sqrt(d) u with r = sqrt(1 - abar_t)). If the
model memorised x, p_t has a mode at c and the learned score on that sphere points straight back to c:
the p = 1 flux is -1 (every cosine with the outward normal is -1). A model that generalises sends the score toward
the data manifold rather than toward the single point c, so the flux is closer to 0. The memorisation score is

    memorization_score(x) = -flux_p(c, r)      (higher = more memorised; p = 1: in [-1, 1], 1 for a perfect mode).
"""

from __future__ import annotations

import math

import torch

from ..sde import SDE
from .p_laplace import ScoreLike, check_points, p_laplace_flux, resolve_score_fn


def memorization_scores(
    score_model: ScoreLike,
    images: torch.Tensor,
    t: float = 0.01,
    radius_scale: float = 1.0,
    p: float = 1.0,
    n_directions: int = 128,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    sde: SDE | None = None,
) -> torch.Tensor:
    r"""Memorisation score ``-flux_p(alpha_t x, radius_scale * sigma_t * sqrt(d))`` of each image (module docstring).

    Args:
        score_model: a ``ScoreModel`` (its ``sde`` gives alpha_t, sigma_t) or a callable ``score_fn(x, t)``
            together with ``sde``.
        images (`torch.Tensor` of shape `(n, *sample_shape)`): training images in model space (e.g. [-1, 1]).
        t (`float`): diffusion time in (0, T]; small (their setting: 10 / 1000 steps).
        radius_scale (`float`): sphere radius in units of the noise norm sigma_t * sqrt(d), > 0.
        p (`float`): p-Laplace exponent >= 1 (1: mean cosine; 2: mean normal score component).
        n_directions (`int`): directions on the sphere per image.
        generator (`torch.Generator`, *optional*): source of the directions.
        batch_size (`int`): at most this many score evaluations per model call.
        sde (`SDE`, *optional*): the forward SDE; required when ``score_model`` is a plain callable.

    Returns:
        `torch.Tensor` of shape `(n,)`: higher means more memorised.
    """
    _, expected_shape = resolve_score_fn(score_model)
    check_points(images, expected_shape)
    if sde is None:
        sde = getattr(score_model, "sde", None)
    if not isinstance(sde, SDE):
        raise TypeError("`sde` must be an SDE when `score_model` is not a ScoreModel (it gives alpha_t and sigma_t)")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= sde.T:
        raise ValueError(f"`t` must be a float in (0, {sde.T}], got {t!r}")
    if isinstance(radius_scale, bool) or not isinstance(radius_scale, (int, float)) or not (
        math.isfinite(radius_scale) and radius_scale > 0
    ):
        raise ValueError(f"`radius_scale` must be a finite float > 0, got {radius_scale!r}")
    alpha, sigma = (float(c) for c in sde.marginal_coefficients(torch.tensor(float(t), dtype=torch.float64)))
    radius = radius_scale * sigma * math.sqrt(images[0].numel())
    flux = p_laplace_flux(score_model, alpha * images, float(t), radius, p=p, n_directions=n_directions,
                          generator=generator, batch_size=batch_size)
    return -flux
