"""p-Laplace flux, Hutchinson Laplacian and memorisation scores against closed forms (Gaussian, Gaussian mixture)."""

import math

import pytest
import torch
from helpers import analytic_score_model

from diffusers_msgm.audit import hutchinson_laplacian, memorization_scores, p_laplace_flux, sphere_directions
from diffusers_msgm.sde import VPSDE

VAR = 0.1  # component covariance 0.1 I
SIDE = 5.0  # equilateral triangle of side 5
MEANS = torch.tensor([[0.0, 0.0], [SIDE, 0.0], [SIDE / 2, SIDE * math.sqrt(3) / 2]], dtype=torch.float64)
CENTROID = MEANS.mean(0, keepdim=True)
MIDPOINTS = (MEANS + MEANS.roll(1, 0)) / 2


def gmm_score(x, t):
    """Analytic score of the equal-weight mixture of N(mu_k, 0.1 I) (t is ignored)."""
    diff = x.unsqueeze(1) - MEANS
    weights = torch.softmax(-(diff**2).sum(-1) / (2 * VAR), dim=1)
    return -(weights.unsqueeze(-1) * diff).sum(1) / VAR


def gaussian_score(mu, var):
    return lambda x, t: -(x - mu) / var


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ Gaussian mixture (the paper's 2-D check)
@pytest.mark.parametrize("p", [1, 2])
def test_gmm_flux_negative_at_means_positive_at_midpoints_and_centroid(p):
    points = torch.cat([MEANS, MIDPOINTS, CENTROID])
    flux = p_laplace_flux(gmm_score, points, 0.5, radius=1.0, p=p, n_directions=64, generator=gen())
    at_means, at_mid, at_centroid = flux[:3], flux[3:6], flux[6]
    # at a mean the own component dominates on the sphere: s(y) = -(y - mu) / 0.1, so cos = -1 and s.u = -r / 0.1
    torch.testing.assert_close(at_means, torch.full((3,), -1.0 if p == 1 else -1.0 / VAR, dtype=torch.float64))
    assert bool((at_mid > 0).all()) and at_centroid > 0
    assert at_means.max() < at_mid.min()


def test_gmm_small_ball_p2_flux_and_hutchinson_match_exact_laplacian():
    points = torch.cat([MEANS, CENTROID])
    exact = torch.stack([torch.autograd.functional.jacobian(lambda z: gmm_score(z[None], None)[0], x).trace()
                         for x in points])
    # closed form: sum_k w_k (-d / var) + sum_k w_k |s_k|^2 - |s|^2; at the centroid s = 0, |s_k| = (5 / sqrt 3) / 0.1
    torch.testing.assert_close(exact[3], torch.tensor(-20.0 + (SIDE / math.sqrt(3) / VAR) ** 2, dtype=torch.float64))
    radius = 0.005
    ball = p_laplace_flux(gmm_score, points, 0.5, radius, p=2, n_directions=4000, generator=gen()) * 2 / radius
    torch.testing.assert_close(ball, exact, rtol=0.01, atol=1e-6)
    hutch = hutchinson_laplacian(gmm_score, torch.cat([points, MIDPOINTS]), 0.5, n_probes=2000, generator=gen(1))
    mid_exact = torch.stack([torch.autograd.functional.jacobian(lambda z: gmm_score(z[None], None)[0], x).trace()
                             for x in MIDPOINTS])
    torch.testing.assert_close(hutch, torch.cat([exact, mid_exact]), rtol=0.06, atol=1e-6)


# ------------------------------------------------------------------ single Gaussian N(mu, s^2 I): closed forms
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_gaussian_flux_at_mean_closed_form(p):
    mu, var, radius, d = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.0]), 0.4, 0.7, 5
    flux = p_laplace_flux(gaussian_score(mu, var), mu[None], 0.1, radius, p=p, n_directions=16, generator=gen())
    # s(mu + r u) = -r u / var: |s|^(p-2) s.u = -(r / var)^(p-1) for every direction
    torch.testing.assert_close(flux, torch.tensor([-((radius / var) ** (p - 1))]))
    if p == 2.0:  # (d / r) * flux = ball average of the Laplacian = -d / var
        torch.testing.assert_close(flux * d / radius, torch.tensor([-d / var]))


def test_gaussian_p2_flux_off_centre_and_hutchinson():
    mu, var, radius, d, n = torch.zeros(3, dtype=torch.float64), 0.5, 0.3, 3, 20000
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.5, -0.5, 2.0]], dtype=torch.float64)
    flux = p_laplace_flux(gaussian_score(mu, var), centres, 0.1, radius, p=2, n_directions=n, generator=gen())
    # s(c + r u).u = -(c.u) / var - r / var; E[u] = 0, Var(c.u) = |c|^2 / d: mean -r / var within 5 std errors
    tol = 5 * centres.norm(dim=1) / math.sqrt(d) / var / math.sqrt(n)
    assert bool(((flux + radius / var).abs() < tol).all())
    lap = hutchinson_laplacian(gaussian_score(mu, var), centres, 0.1, n_probes=3, generator=gen())
    torch.testing.assert_close(lap, torch.full((2,), -d / var, dtype=torch.float64))  # Rademacher: exact


def test_score_model_path_and_memorization_sign():
    model = analytic_score_model(sde_type="vp", prediction_type="epsilon", mu=0.5, s0=0.3, sample_size=4)
    t, d = 0.05, 16
    alpha, sigma = (float(c) for c in model.sde.marginal_coefficients(torch.tensor(t)))
    var = alpha**2 * 0.3**2 + sigma**2
    mode = torch.full((1, 1, 4, 4), 0.5)
    lap = hutchinson_laplacian(model, alpha * mode, t, n_probes=4, generator=gen())
    torch.testing.assert_close(lap, torch.tensor([-d / var]), rtol=1e-4, atol=1e-4)
    others = torch.randn(5, 1, 4, 4, generator=gen(3))
    scores = memorization_scores(model, torch.cat([mode, others]), t=t, p=1, n_directions=32, generator=gen())
    torch.testing.assert_close(scores[0], torch.tensor(1.0), rtol=1e-5, atol=1e-5)  # a perfect mode: cosine -1
    assert bool((scores[1:] < scores[0]).all())
    radius = sigma * math.sqrt(d)
    s2 = memorization_scores(model, mode, t=t, p=2, n_directions=8, generator=gen())
    torch.testing.assert_close(s2, torch.tensor([radius / var]), rtol=1e-4, atol=1e-4)
    same = memorization_scores(lambda x, tt: model(x, tt).score, torch.cat([mode, others]), t=t,
                               p=1, n_directions=32, generator=gen(), sde=model.sde)
    torch.testing.assert_close(same, scores)


def test_reproducible_and_independent_of_batch_size():
    points = torch.cat([MEANS, MIDPOINTS])
    a = p_laplace_flux(gmm_score, points, 0.5, 1.0, p=1, n_directions=10, generator=gen(), batch_size=7)
    b = p_laplace_flux(gmm_score, points, 0.5, 1.0, p=1, n_directions=10, generator=gen(), batch_size=1000)
    torch.testing.assert_close(a, b)
    h1 = hutchinson_laplacian(gmm_score, points, 0.5, n_probes=5, generator=gen(), batch_size=3)
    h2 = hutchinson_laplacian(gmm_score, points, 0.5, n_probes=5, generator=gen(), batch_size=100)
    torch.testing.assert_close(h1, h2)
    u = sphere_directions(2, 50, (3, 2), generator=gen())
    torch.testing.assert_close(u.flatten(2).norm(dim=2), torch.ones(2, 50))


# ------------------------------------------------------------------ bad input
def test_bad_inputs():
    pts = MEANS
    with pytest.raises(ValueError, match="radius"):
        p_laplace_flux(gmm_score, pts, 0.5, radius=0.0)
    with pytest.raises(ValueError, match="radius"):
        p_laplace_flux(gmm_score, pts, 0.5, radius=torch.tensor([1.0, -1.0, 1.0]))
    for bad_p in (0.5, float("nan"), "2"):
        with pytest.raises(ValueError, match="`p`"):
            p_laplace_flux(gmm_score, pts, 0.5, radius=1.0, p=bad_p)
    with pytest.raises(ValueError, match="n_directions"):
        p_laplace_flux(gmm_score, pts, 0.5, radius=1.0, n_directions=0)
    with pytest.raises(ValueError, match="n_probes"):
        hutchinson_laplacian(gmm_score, pts, 0.5, n_probes=0)
    with pytest.raises(ValueError, match="points"):
        p_laplace_flux(gmm_score, MEANS[0], 0.5, radius=1.0)
    with pytest.raises(TypeError, match="score_model"):
        p_laplace_flux("not a model", pts, 0.5, radius=1.0)
    model = analytic_score_model(sample_size=4)
    with pytest.raises(ValueError, match=r"points.*\(n_points, 1, 4, 4\)"):
        p_laplace_flux(model, torch.zeros(2, 1, 8, 8), 0.5, radius=1.0)
    with pytest.raises(ValueError, match="points"):
        memorization_scores(model, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="`t`"):
        memorization_scores(model, torch.zeros(2, 1, 4, 4), t=0.0)
    with pytest.raises(ValueError, match="radius_scale"):
        memorization_scores(model, torch.zeros(2, 1, 4, 4), radius_scale=-1.0)
    with pytest.raises(TypeError, match="sde"):
        memorization_scores(gmm_score, pts)
    with pytest.raises(ValueError, match="`t`"):
        memorization_scores(gmm_score, pts, t=2.0, sde=VPSDE())
