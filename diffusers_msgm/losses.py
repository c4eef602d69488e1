"""Denoising score matching and the MSGM undesirable-data terms.

Perturbation (Song et al. 2021, eq. 7): t ~ U(eps, T), z ~ N(0, I), x_t = alpha_t x_0 + sigma_t z. The conditional
score of x_t given x_0 is -z / sigma_t: it points from x_t toward x_0. With eps_hat = -sigma_t s(x_t, t):

* DSM on retained data:           || sigma_t s + z ||^2 = || eps_hat - z ||^2
* ``orthogonal`` (official 'square'):  mean((sigma_t s * z)^2) = mean((eps_hat * z)^2) -- element-wise; its
  minimiser eps_hat = 0 removes the pull toward the undesirable x_0.
* ``orthogonal_cosine``:          cos(s, z)^2 -- the inner-product form: no component along z.
* ``obtuse``:                     relu(cos(s, -z)) = relu(cos(eps_hat, z)) -- penalises any alignment of the score
  with the direction toward the undesirable x_0, so the minimiser points away from it (angle >= 90 degrees).
* ``obtuse_official`` (official 'norm'): mean(sigma_t s * z) = -mean(eps_hat * z). Minimising it pushes s toward
  -z/sigma_t, i.e. TOWARD the undesirable data, and is unbounded below: the sign is suspect (docs/loss_sign.md);
  kept for reproduction only.

MSGM objective: ``(1 - w) L_retain + w L_forget`` with the forget term computed every ``forget_every`` steps
(official code: w = 0.01, every 4th step; on other steps the loss is ``(1 - w) L_retain``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .sde import SDE

FORGET_VARIANTS = ("orthogonal", "orthogonal_cosine", "obtuse", "obtuse_official")


def _reduce(x: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    flat = x.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def forget_term(eps_hat: torch.Tensor, noise: torch.Tensor, variant: str, reduce_mean: bool = True) -> torch.Tensor:
    """Per-sample MSGM undesirable-data term in epsilon form (see the module docstring)."""
    if variant == "orthogonal":
        return _reduce((eps_hat * noise) ** 2, reduce_mean)
    if variant == "orthogonal_cosine":
        return _cosine(eps_hat, noise) ** 2
    if variant == "obtuse":
        return F.relu(_cosine(eps_hat, noise))
    if variant == "obtuse_official":
        return -_reduce(eps_hat * noise, reduce_mean)
    raise ValueError(f"`variant` must be one of {FORGET_VARIANTS}, got {variant!r}")


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    gen_device = generator.device if isinstance(generator, torch.Generator) else device
    return (torch.rand(n, generator=generator, device=gen_device) * (high - low) + low).to(device)


def perturb(
    x0: torch.Tensor,
    sde: SDE,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or take) ``t`` and ``z``; return ``(x_t, t, z, sigma_t)`` with sigma_t shaped ``(batch, 1, 1, 1)``."""
    if t is None:
        t = _uniform(x0.shape[0], eps, sde.T, generator, x0.device)
    if noise is None:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"`noise` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(noise.shape)}")
    mean, std = sde.marginal_prob(x0, t)
    return mean + std * noise, t, noise, std


def denoising_score_matching_loss(
    score_model: torch.nn.Module,
    x0: torch.Tensor,
    sde: SDE | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1e-5,
    reduce_mean: bool = True,
    likelihood_weighting: bool = False,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> torch.Tensor:
    """E_t E_z ||sigma_t s(x_t, t) + z||^2, or with likelihood weighting g(t)^2 ||s + z / sigma_t||^2 (eq. 7)."""
    sde = sde or score_model.sde
    x_t, t, noise, std = perturb(x0, sde, t, noise, eps, generator)
    score = score_model(x_t, t, **cond).score
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        losses = _reduce((score + noise / std) ** 2, reduce_mean) * g2.flatten()
    else:
        losses = _reduce((score * std + noise) ** 2, reduce_mean)
    return losses.mean()


def msgm_forget_loss(
    score_model: torch.nn.Module,
    x_forget: torch.Tensor,
    variant: str,
    sde: SDE | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1e-5,
    reduce_mean: bool = True,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> torch.Tensor:
    """The MSGM term on undesirable samples, averaged over the batch (eps_hat = -sigma_t s)."""
    sde = sde or score_model.sde
    x_t, t, noise, std = perturb(x_forget, sde, t, noise, eps, generator)
    eps_hat = -std * score_model(x_t, t, **cond).score
    return forget_term(eps_hat, noise, variant, reduce_mean).mean()


def ddpm_prediction_loss(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise_scheduler,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_eps: bool = False,
    **cond: Any,
):
    """Discrete DDPM loss ||out - target||^2 (target eps or v, per the scheduler's ``prediction_type``).

    With ``return_eps=True`` also returns ``(eps_hat, noise)`` where eps_hat is the UNet's epsilon estimate.
    """
    n = noise_scheduler.config.num_train_timesteps
    if timesteps is None:
        gen_device = generator.device if isinstance(generator, torch.Generator) else x0.device
        timesteps = torch.randint(0, n, (x0.shape[0],), generator=generator, device=gen_device).to(x0.device)
    if noise is None:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    out = unet(x_t, timesteps, **cond).sample
    out = out[:, : x0.shape[1]]
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target, eps_hat = noise, out
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
        abar = noise_scheduler.alphas_cumprod.to(x0.device)[timesteps].view(-1, 1, 1, 1).to(x0.dtype)
        eps_hat = abar.sqrt() * out + (1 - abar).sqrt() * x_t
    else:
        raise ValueError(f"noise_scheduler `prediction_type` must be 'epsilon' or 'v_prediction', got {kind!r}")
    loss = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1).mean()
    return (loss, eps_hat, noise) if return_eps else loss


@dataclass
class MSGMLossOutput:
    """``loss`` to back-propagate, its two parts, and whether the forget term ran on this step."""

    loss: torch.Tensor
    retain_loss: torch.Tensor
    forget_loss: torch.Tensor
    forget_computed: bool


class MSGMLoss:
    """``(1 - forget_weight) L_retain + forget_weight L_forget`` on continuous-time score models.

    Args:
        sde: the forward SDE (``score_model.sde`` when None).
        variant (`str`): one of ``FORGET_VARIANTS``.
        forget_weight (`float`): w in [0, 1] (official: 0.01).
        forget_every (`int`): compute the forget term on steps with ``step % forget_every == 0`` (official: 4).
        eps, reduce_mean, likelihood_weighting: as in ``denoising_score_matching_loss`` (the weighting applies to
            the retain term; the forget terms are unweighted).
    """

    def __init__(
        self,
        sde: SDE | None = None,
        variant: str = "orthogonal",
        forget_weight: float = 0.01,
        forget_every: int = 1,
        eps: float = 1e-5,
        reduce_mean: bool = True,
        likelihood_weighting: bool = False,
    ):
        if variant not in FORGET_VARIANTS:
            raise ValueError(f"`variant` must be one of {FORGET_VARIANTS}, got {variant!r}")
        if not 0.0 <= forget_weight <= 1.0:
            raise ValueError(f"`forget_weight` must lie in [0, 1], got {forget_weight}")
        if not isinstance(forget_every, int) or forget_every < 1:
            raise ValueError(f"`forget_every` must be an int >= 1, got {forget_every!r}")
        self.sde, self.variant = sde, variant
        self.forget_weight, self.forget_every = float(forget_weight), forget_every
        self.eps, self.reduce_mean, self.likelihood_weighting = eps, reduce_mean, likelihood_weighting

    def retain_loss(self, model, x: torch.Tensor, generator=None, **cond) -> torch.Tensor:
        return denoising_score_matching_loss(
            model, x, self.sde, eps=self.eps, reduce_mean=self.reduce_mean,
            likelihood_weighting=self.likelihood_weighting, generator=generator, **cond,
        )

    def forget_loss(self, model, x: torch.Tensor, generator=None, **cond) -> torch.Tensor:
        return msgm_forget_loss(
            model, x, self.variant, self.sde, eps=self.eps, reduce_mean=self.reduce_mean, generator=generator, **cond
        )

    def __call__(
        self,
        model,
        x_retain: torch.Tensor,
        x_forget: torch.Tensor | None,
        step: int = 0,
        generator: torch.Generator | None = None,
        retain_cond: dict | None = None,
        forget_cond: dict | None = None,
    ) -> MSGMLossOutput:
        retain = self.retain_loss(model, x_retain, generator, **(retain_cond or {}))
        w = self.forget_weight
        if x_forget is not None and step % self.forget_every == 0:
            forget = self.forget_loss(model, x_forget, generator, **(forget_cond or {}))
            return MSGMLossOutput((1 - w) * retain + w * forget, retain.detach(), forget.detach(), True)
        return MSGMLossOutput((1 - w) * retain, retain.detach(), torch.zeros_like(retain.detach()), False)


class DDPMMSGMLoss(MSGMLoss):
    """MSGM on a discrete DDPM UNet trained with a diffusers ``DDPMScheduler``, in epsilon space.

    Retained data: the usual ``||out - target||^2``; undesirable data: ``forget_term(eps_hat, eps, variant)``.
    """

    def __init__(self, noise_scheduler, variant: str = "orthogonal", forget_weight: float = 0.01, forget_every: int = 1,
                 reduce_mean: bool = True):
        super().__init__(None, variant, forget_weight, forget_every, reduce_mean=reduce_mean)
        self.noise_scheduler = noise_scheduler

    def retain_loss(self, model, x, generator=None, **cond):
        return ddpm_prediction_loss(model, x, self.noise_scheduler, generator=generator, **cond)

    def forget_loss(self, model, x, generator=None, **cond):
        _, eps_hat, noise = ddpm_prediction_loss(
            model, x, self.noise_scheduler, generator=generator, return_eps=True, **cond
        )
        return forget_term(eps_hat, noise, self.variant, self.reduce_mean).mean()
