import math

import pytest
import torch

from diffusers_msgm.sde import VESDE, VPSDE, SubVPSDE, broadcast_time, get_sde

SDES = [VPSDE(), SubVPSDE(), VESDE(), VPSDE(0.5, 10.0), VESDE(0.1, 5.0)]


def test_vp_closed_form():
    sde, x0 = VPSDE(0.1, 20.0), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t)
    coeff = torch.exp(-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, x0 * coeff)
    torch.testing.assert_close(std, (1 - coeff**2).sqrt())
    drift, diffusion = sde.sde(x0, t)
    beta = (0.1 + t * 19.9).view(-1, 1, 1, 1)
    torch.testing.assert_close(drift, -0.5 * beta * x0)
    torch.testing.assert_close(diffusion, beta.sqrt())


def test_subvp_and_ve_closed_forms():
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    x0 = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    sub = SubVPSDE()
    coeff = torch.exp(-0.25 * t**2 * 19.9 - 0.05 * t).view(-1, 1, 1, 1)
    mean, std = sub.marginal_prob(x0, t)
    torch.testing.assert_close(std, 1 - coeff**2)
    _, g = sub.sde(x0, t)
    discount = 1 - torch.exp(-2 * 0.1 * t - 19.9 * t**2).view(-1, 1, 1, 1)
    torch.testing.assert_close(g, ((0.1 + 19.9 * t).view(-1, 1, 1, 1) * discount).sqrt())
    ve = VESDE(0.01, 50.0)
    mean, std = ve.marginal_prob(x0, t)
    torch.testing.assert_close(mean, x0)
    torch.testing.assert_close(std, (0.01 * 5000.0**t).view(-1, 1, 1, 1))


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_marginals_solve_the_moment_odes(sde):
    """For a linear SDE dx = a(t) x dt + g dw with x_0 fixed: d alpha/dt = a alpha, d sigma^2/dt = 2 a sigma^2 + g^2."""
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64, requires_grad=True)
    alpha, sigma = sde.marginal_coefficients(t)
    alpha = alpha + 0 * t  # VE: alpha = 1 does not depend on t
    d_alpha = torch.autograd.grad(alpha.sum(), t, retain_graph=True)[0]
    d_var = torch.autograd.grad((sigma**2).sum(), t)[0]
    x = torch.ones(7, 1, dtype=torch.float64)
    drift, g = sde.sde(x, t.detach())
    a = drift.flatten()  # drift of x = 1 is a(t)
    torch.testing.assert_close(d_alpha, a * alpha.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_var, 2 * a * sigma.detach() ** 2 + g.flatten() ** 2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
def test_exact_discretisation_composes_marginals(sde):
    x0 = torch.ones(3, 1, dtype=torch.float64)
    t, s = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64), torch.tensor([0.6, 0.2, 0.0], dtype=torch.float64)
    f, G = sde.discretize(x0, t, s)
    a = 1 + f  # x_t = a x_s + G z with x_s = 1
    alpha_t, sigma_t = sde.marginal_coefficients(t.view(-1, 1))
    alpha_s, sigma_s = sde.marginal_coefficients(s.view(-1, 1))
    torch.testing.assert_close(a * alpha_s, alpha_t)
    if isinstance(sde, VPSDE):
        torch.testing.assert_close(a**2 * sigma_s**2 + G**2, sigma_t**2)
    else:
        torch.testing.assert_close(G**2, sigma_t**2 - sigma_s**2)


def test_euler_discretisation_is_first_order():
    sde, x = SubVPSDE(), torch.randn(4, 2, dtype=torch.float64)
    f, G = sde.discretize(x, 0.5, 0.5 - 1e-3)
    drift, g = sde.sde(x, 0.5)
    torch.testing.assert_close(f, drift * 1e-3)
    torch.testing.assert_close(G, g * math.sqrt(1e-3))


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_prior_sampling_and_logp(sde):
    z = sde.prior_sampling((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(z.std().item(), sde.prior_std(), rtol=0.03, atol=0)
    again = sde.prior_sampling((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(z, again)
    ref = torch.distributions.Normal(0.0, sde.prior_std()).log_prob(z[:5]).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z[:5]), ref)


def test_reverse_drift_forms():
    sde, x, s = VPSDE(), torch.randn(2, 3), torch.randn(2, 3)
    f, g = sde.sde(x, 0.3)
    rev, rev_g = sde.reverse_drift(x, 0.3, s)
    torch.testing.assert_close(rev, f - g**2 * s)
    torch.testing.assert_close(rev_g, g)
    ode, ode_g = sde.reverse_drift(x, 0.3, s, probability_flow=True)
    torch.testing.assert_close(ode, f - 0.5 * g**2 * s)
    assert torch.all(ode_g == 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="sde_type"):
        get_sde("cosine")
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(20.0, 0.1)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(-1.0, 5.0)
    with pytest.raises(ValueError, match="`t`"):
        broadcast_time(torch.ones(3), torch.ones(2, 4))
    assert get_sde("subvp", beta_max=5.0).beta_max == 5.0
