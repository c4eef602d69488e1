"""Forward SDEs of Song et al. 2021 ("Score-Based Generative Modeling through SDEs").

Each SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` exposes

* ``sde(x, t) -> (drift, diffusion)``           -- f(x, t) and g(t)  (eq. 5)
* ``marginal_prob(x0, t) -> (mean, std)``        -- the Gaussian kernel p_0t(x_t | x_0) (eqs. 29, 33)
* ``prior_sampling(shape)`` / ``prior_logp(z)``  -- the prior p_T
* ``discretize(x, t, t_next) -> (f, G)``         -- one step of the forward Markov chain, used by the
  reverse-diffusion predictor (eq. 45)
* ``reverse_drift(x, t, score, probability_flow)`` -- f - g^2 s (reverse SDE, eq. 6) or
  f - g^2 s / 2 (probability-flow ODE, eq. 13)

``t`` is a float tensor of shape ``(batch,)`` (a 0-d tensor or a float is broadcast).
"""

from __future__ import annotations

import abc
import math
from typing import Union

import torch
from diffusers.utils.torch_utils import randn_tensor

TimeLike = Union[float, torch.Tensor]

SDE_TYPES = ("vp", "subvp", "ve")


def broadcast_time(t: TimeLike, x: torch.Tensor) -> torch.Tensor:
    """Turn ``t`` (float, 0-d or ``(batch,)``) into a ``(batch, 1, ..., 1)`` tensor matching ``x``."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"`t` must be a float or a tensor of shape (batch,)=({x.shape[0]},), got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class SDE(abc.ABC):
    """Base class: subclasses define the marginal coefficients and the SDE coefficients."""

    T: float = 1.0
    #: smallest time used by samplers and training (score_sde's ``sampling_eps``).
    sampling_eps: float = 1e-3

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (broadcastable to x)."""

    @abc.abstractmethod
    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` with ``x_t = alpha_t x_0 + sigma_t z``; ``t`` any shape."""

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior p_T = N(0, prior_std^2 I)."""

    def marginal_prob(self, x0: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of p_0t(x_t | x_0); std is broadcast as ``(batch, 1, ..., 1)``."""
        alpha, sigma = self.marginal_coefficients(broadcast_time(t, x0))
        return alpha * x0, sigma

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: Union[torch.Generator, list[torch.Generator]] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw x_T ~ N(0, prior_std^2 I)."""
        return self.prior_std() * randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) summed over all but the batch dimension."""
        n = z[0].numel()
        var = self.prior_std() ** 2
        return -0.5 * n * math.log(2 * math.pi * var) - z.flatten(1).pow(2).sum(1) / (2 * var)

    def discretize(self, x: torch.Tensor, t: TimeLike, t_next: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step ``x_t = x_{t_next} + f + G z`` (Euler-Maruyama unless overridden)."""
        t_b, dt = broadcast_time(t, x), broadcast_time(t, x) - broadcast_time(t_next, x)
        drift, diffusion = self.sde(x, t_b.flatten())
        return drift * dt, diffusion * dt.sqrt()

    def reverse_drift(
        self, x: torch.Tensor, t: TimeLike, score: torch.Tensor, probability_flow: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift and diffusion of the reverse-time SDE (eq. 6) or of the probability-flow ODE (eq. 13)."""
        drift, diffusion = self.sde(x, t)
        g2 = diffusion**2
        if probability_flow:
            return drift - 0.5 * g2 * score, torch.zeros_like(diffusion)
        return drift - g2 * score, diffusion

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{type(self).__name__}({params})"

    @property
    @abc.abstractmethod
    def config(self) -> dict[str, float]:
        """Constructor arguments, as stored in model configs."""


class VPSDE(SDE):
    """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta linear (DDPM's continuum)."""

    sampling_eps = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"`beta_min` and `beta_max` must satisfy 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    @property
    def config(self) -> dict[str, float]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self.beta(broadcast_time(t, x))
        return -0.5 * beta * x, beta.sqrt()

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_mean_coeff(t)
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def prior_std(self) -> float:
        return 1.0

    def discretize(self, x: torch.Tensor, t: TimeLike, t_next: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact VP transition: x_t = a x_s + sqrt(1 - a^2) z with a = alpha_t / alpha_s."""
        log_a = self.log_mean_coeff(broadcast_time(t, x)) - self.log_mean_coeff(broadcast_time(t_next, x))
        a = log_a.exp()
        return (a - 1) * x, (-torch.expm1(2 * log_a)).clamp_min(0).sqrt()


class SubVPSDE(VPSDE):
    """Sub-VP SDE: VP drift, diffusion sqrt(beta(t) (1 - exp(-2 int_0^t beta))) (eq. 34)."""

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        t_b = broadcast_time(t, x)
        beta = self.beta(t_b)
        discount = -torch.expm1(4 * self.log_mean_coeff(t_b))  # 1 - exp(-2 int_0^t beta) = 1 - alpha_t^4
        return -0.5 * beta * x, (beta * discount).sqrt()

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_mean_coeff(t)
        return log_alpha.exp(), -torch.expm1(2 * log_alpha)

    def discretize(self, x: torch.Tensor, t: TimeLike, t_next: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        return SDE.discretize(self, x, t, t_next)


class VESDE(SDE):
    """Variance-exploding SDE: dx = sqrt(d sigma^2(t) / dt) dw, sigma(t) = sigma_min (sigma_max / sigma_min)^t."""

    sampling_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"`sigma_min` and `sigma_max` must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    @property
    def config(self) -> dict[str, float]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma(broadcast_time(t, x))
        diffusion = sigma * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return torch.zeros_like(x), diffusion

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), self.sigma(t)

    def prior_std(self) -> float:
        return self.sigma_max

    def discretize(self, x: torch.Tensor, t: TimeLike, t_next: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact VE transition: variance sigma(t)^2 - sigma(t_next)^2 (sigma(0) = sigma_min)."""
        var = self.sigma(broadcast_time(t, x)) ** 2 - self.sigma(broadcast_time(t_next, x)) ** 2
        return torch.zeros_like(x), var.clamp_min(0).sqrt()


def get_sde(sde_type: str, **params: float) -> SDE:
    """Build an SDE from its name (``"vp"``, ``"subvp"``, ``"ve"``) and the parameters that apply to it."""
    if sde_type == "vp":
        return VPSDE(params.get("beta_min", 0.1), params.get("beta_max", 20.0))
    if sde_type == "subvp":
        return SubVPSDE(params.get("beta_min", 0.1), params.get("beta_max", 20.0))
    if sde_type == "ve":
        return VESDE(params.get("sigma_min", 0.01), params.get("sigma_max", 50.0))
    raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {sde_type!r}")
