"""Likelihood of images under a score model by the probability-flow ODE (Song et al. 2021, Sec. 4.3 / App. D.2).

The probability-flow ODE  dx/dt = v(x, t) = f(x, t) - 1/2 g(t)^2 s_theta(x, t)  maps data x(eps) to the prior x(T)
and, by the instantaneous change of variables,

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div_x v(x(t), t) dt.

The divergence is the Hutchinson estimate  z^T (dv/dx) z  (one vector-Jacobian product, z fixed along the path,
Rademacher or Gaussian), or the exact trace (one VJP per dimension; for tests and tiny images). Bits/dim of
8-bit images use uniform dequantisation: x01 = (k + u) / K for the K-level value k and u ~ U[0, 1), mapped to the
model space y = 2 x01 - 1 (centered data), so that

    bpd = -(log p(y) + D log 2) / (D ln 2) + log2(K),

an upper bound on the discrete negative log-likelihood in bits per dimension.
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch

from .classifier import ImagesLike, images_to_tensor

SOLVERS = ("rk45", "heun", "euler")
ESTIMATORS = ("rademacher", "gaussian", "exact")


def _velocity(score_model: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Probability-flow drift f(x, t) - 1/2 g(t)^2 s(x, t) of the model's SDE."""
    drift, diffusion = score_model.sde.sde(x, t)
    score = score_model(x, t, return_dict=False)[0]
    return drift - 0.5 * (diffusion**2).view(-1, *([1] * (x.ndim - 1))) * score


def _velocity_and_divergence(score_model: Any, x: torch.Tensor, t: float, probes: torch.Tensor | None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """v(x, t) and its divergence per sample (Hutchinson with ``probes``, else exact)."""
    tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = _velocity(score_model, xg, tt)
        if probes is not None:
            (vjp,) = torch.autograd.grad(v, xg, grad_outputs=probes)
            div = (vjp * probes).flatten(1).sum(1)
        else:
            flat = v.flatten(1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=i + 1 < flat.shape[1])
                div = div + g.flatten(1)[:, i]
    return v.detach(), div.detach()


@torch.no_grad()
def log_likelihood(
    score_model: Any,
    sample: torch.Tensor,
    *,
    solver: str = "rk45",
    num_steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    estimator: str = "rademacher",
    generator: torch.Generator | None = None,
) -> dict[str, Union[torch.Tensor, int]]:
    """log p(sample) in nats per image, in the model's space, by integrating the probability-flow ODE.

    ``score_model``: a :class:`~diffusers_msgm.ScoreModel` (anything with ``.sde`` and ``__call__(x, t,
    return_dict=False)`` returning the score). ``solver``: ``"rk45"`` (scipy's adaptive Runge-Kutta on the whole
    batch with ``rtol``/``atol``, as in score_sde), or the fixed-step ``"heun"``/``"euler"`` with ``num_steps``
    uniform steps on [eps, T]. ``estimator``: Hutchinson ``"rademacher"``/``"gaussian"`` probes drawn once from
    ``generator``, or ``"exact"``. Returns ``{"logp", "prior_logp", "delta_logp", "nfe"}``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sde = score_model.sde
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, {sde.T}), got {eps}")
    if sample.ndim != 4 or sample.shape[0] == 0:
        raise ValueError(f"sample must be a non-empty (batch, channels, height, width) tensor, got {tuple(sample.shape)}")
    if not torch.isfinite(sample).all():
        raise ValueError("sample contains NaN or Inf")
    x0 = sample.detach()
    probes = None
    if estimator == "rademacher":
        probes = torch.randint(0, 2, x0.shape, generator=generator).to(x0) * 2 - 1
    elif estimator == "gaussian":
        probes = torch.randn(x0.shape, generator=generator).to(x0)
    shape, n = x0.shape, x0.shape[0]
    nfe = 0

    def rhs(t: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal nfe
        nfe += 1
        return _velocity_and_divergence(score_model, x, t, probes)

    if solver == "rk45":
        from scipy.integrate import solve_ivp

        def fun(t: float, state: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(state[: -n].astype(np.float32)).reshape(shape).to(x0)
            v, div = rhs(t, x)
            return np.concatenate([v.flatten().cpu().double().numpy(), div.cpu().double().numpy()])

        init = np.concatenate([x0.flatten().cpu().double().numpy(), np.zeros(n)])
        result = solve_ivp(fun, (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
        if not result.success:
            raise RuntimeError(f"the probability-flow ODE solver failed: {result.message}")
        final = result.y[:, -1]
        xT = torch.from_numpy(final[: -n]).reshape(shape).to(x0)
        delta = torch.from_numpy(final[-n:]).to(x0)
    else:
        times = torch.linspace(eps, sde.T, num_steps + 1, dtype=torch.float64).tolist()
        x, delta = x0.clone(), torch.zeros(n, dtype=x0.dtype, device=x0.device)
        for t, t_next in zip(times[:-1], times[1:]):
            h = t_next - t
            v, div = rhs(t, x)
            if solver == "euler":
                x, delta = x + h * v, delta + h * div
            else:
                v2, div2 = rhs(t_next, x + h * v)
                x, delta = x + 0.5 * h * (v + v2), delta + 0.5 * h * (div + div2)
        xT = x
    prior = sde.prior_logp(xT)
    return {"logp": prior + delta, "prior_logp": prior, "delta_logp": delta, "nfe": nfe}


def dequantize(images: torch.Tensor, num_bins: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """[-1, 1] images -> K-level values k = round(x01 (K - 1)) -> (k + u) / K with u ~ U[0, 1) -> back to [-1, 1]."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    levels = torch.round((images.clamp(-1, 1) + 1) / 2 * (num_bins - 1))
    u = torch.rand(images.shape, generator=generator).to(images)
    return 2 * (levels + u) / num_bins - 1


def bits_per_dim(
    score_model: Any,
    images: ImagesLike,
    *,
    num_bins: int = 256,
    batch_size: int = 128,
    seed: int = 0,
    **ode_kwargs: Any,
) -> dict[str, Any]:
    """Bits/dim of ``images`` (a [-1, 1] tensor, NHWC [0, 1] array or PIL list) under ``score_model``.

    Each image is quantised to ``num_bins`` levels and uniformly dequantised (noise and Hutchinson probes from
    ``seed``), then :func:`log_likelihood` runs with ``ode_kwargs``. Returns ``{"bpd": mean, "bpd_std",
    "per_image": list[float], "nfe": mean function evaluations per batch, "n"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    channels, height, width = score_model.sample_shape
    x = images_to_tensor(images)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError("images is empty: the bits/dim of no images is undefined")
    if tuple(x.shape[1:]) != (channels, height, width):
        raise ValueError(
            f"images have shape {tuple(x.shape[1:])} (C, H, W) but the score model expects "
            f"{(channels, height, width)}; resize them first"
        )
    param = next(score_model.parameters())
    generator = torch.Generator().manual_seed(seed)
    dims = channels * height * width
    per_image, nfes = [], []
    for start in range(0, len(x), batch_size):
        batch = dequantize(x[start : start + batch_size], num_bins, generator).to(param.device, param.dtype)
        out = log_likelihood(score_model, batch, generator=generator, **ode_kwargs)
        logp01 = out["logp"].double().cpu() + dims * math.log(2.0)  # density of x01 = (y + 1) / 2
        per_image.append(-logp01 / (dims * math.log(2.0)) + math.log2(num_bins))
        nfes.append(out["nfe"])
    bpd = torch.cat(per_image)
    return {"bpd": float(bpd.mean()), "bpd_std": float(bpd.std()) if len(bpd) > 1 else 0.0,
            "per_image": bpd.tolist(), "nfe": float(np.mean(nfes)), "n": len(bpd)}
