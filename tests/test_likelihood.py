"""Probability-flow likelihood and bits/dim against the closed form of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import analytic_score_model, tiny_unet

from diffusers_msgm import ScoreModel
from diffusers_msgm.metrics.likelihood import bits_per_dim, dequantize, log_likelihood

MU, S0 = 0.5, 0.3


def exact_logp(model, x, eps):
    """log N(x; alpha(eps) mu, (alpha^2 s0^2 + sigma^2) I): the density the ODE transports from x(eps)."""
    alpha, sigma = model.sde.marginal_coefficients(torch.tensor(eps))
    var = alpha**2 * S0**2 + sigma**2
    d = x[0].numel()
    return -0.5 * d * torch.log(2 * math.pi * var) - ((x - alpha * MU) ** 2).flatten(1).sum(1) / (2 * var)


@pytest.mark.parametrize("sde_type", ["vp", "subvp", "ve"])
def test_rk45_matches_closed_form(sde_type):
    model = analytic_score_model(sde_type, mu=MU, s0=S0)
    gen = torch.Generator().manual_seed(0)
    x = MU + S0 * torch.randn(3, 1, 4, 4, generator=gen)
    eps = 1e-3
    out = log_likelihood(model, x, solver="rk45", eps=eps, estimator="exact")
    ref = exact_logp(model, x, eps)
    # the VE prior N(0, sigma_max^2) is only approximately p_T (mean alpha mu = mu is not 0): tolerance relative
    torch.testing.assert_close(out["logp"], ref.to(out["logp"].dtype), rtol=2e-3, atol=2e-2)
    assert out["nfe"] > 10


def test_fixed_step_heun_and_hutchinson():
    model = analytic_score_model("vp", mu=MU, s0=S0)
    x = MU + S0 * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = exact_logp(model, x, 1e-3)
    heun = log_likelihood(model, x, solver="heun", num_steps=200, eps=1e-3, estimator="rademacher",
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(heun["logp"], ref, rtol=5e-3, atol=5e-2)
    assert heun["nfe"] == 400
    # Gaussian probes: unbiased, noisy per sample; over many copies of one image the mean is close
    xs = x[:1].repeat(64, 1, 1, 1)
    gauss = log_likelihood(model, xs, solver="heun", num_steps=100, eps=1e-3, estimator="gaussian",
                           generator=torch.Generator().manual_seed(0))["logp"]
    stderr = float(gauss.std()) / len(gauss) ** 0.5
    assert float(gauss.std()) > 0.1  # the probes do vary
    assert abs(float(gauss.mean() - ref[0])) < 4 * stderr + 0.05


def test_bits_per_dim_of_learned_model_and_dequantisation():
    torch.manual_seed(0)
    model = ScoreModel.from_unet(tiny_unet(4), sde_type="vp")
    images = torch.rand(5, 1, 4, 4) * 2 - 1
    out = bits_per_dim(model, images, solver="euler", num_steps=4, batch_size=2, seed=0)
    assert out["n"] == 5 and len(out["per_image"]) == 5 and math.isfinite(out["bpd"])
    again = bits_per_dim(model, images, solver="euler", num_steps=4, batch_size=2, seed=0)
    assert again["per_image"] == out["per_image"]  # seeded
    # dequantisation keeps each value inside its bin
    deq = dequantize(images, 256, torch.Generator().manual_seed(0))
    levels = torch.round((images + 1) / 2 * 255)
    assert torch.all((deq + 1) / 2 * 256 >= levels) and torch.all((deq + 1) / 2 * 256 < levels + 1)


def test_bits_per_dim_closed_form_offset():
    """bpd = -(log p(y) + D log 2) / (D ln 2) + 8 for 256 bins, with p the model-space density."""
    model = analytic_score_model("vp", mu=MU, s0=S0)
    images = (MU + S0 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    out = bits_per_dim(model, images, solver="rk45", estimator="exact", eps=1e-3, seed=5)
    deq = dequantize(images, 256, torch.Generator().manual_seed(5))
    ref = exact_logp(model, deq, 1e-3)
    expected = -(ref + 16 * math.log(2)) / (16 * math.log(2)) + 8
    assert out["per_image"] == pytest.approx(expected.tolist(), rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="dopri"), "solver must be one of"),
        (dict(estimator="skilling"), "estimator must be one of"),
        (dict(num_steps=0), "num_steps must be >= 1"),
        (dict(eps=0.0), "eps must lie in"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = analytic_score_model("vp")
    with pytest.raises(ValueError, match=match):
        log_likelihood(model, torch.zeros(1, 1, 4, 4), **kwargs)


def test_bad_images():
    model = analytic_score_model("vp")
    with pytest.raises(ValueError, match="NaN or Inf"):
        log_likelihood(model, torch.full((1, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="expects"):
        bits_per_dim(model, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        bits_per_dim(model, torch.zeros(0, 1, 4, 4))
