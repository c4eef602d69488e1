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
from diffusers import DDPMScheduler
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


@dataclass
class NoisyBatch:
    """A perturbed batch: model input ``x_t`` at ``time`` (continuous t or DDPM timestep), the noise and sigma_t."""

    x0: torch.Tensor
    x_t: torch.Tensor
    time: torch.Tensor
    noise: torch.Tensor
    std: torch.Tensor | None = None


def _dsm_per_sample(score, batch: NoisyBatch, sde: SDE, reduce_mean: bool, likelihood_weighting: bool):
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(batch.x0), batch.time)[1] ** 2
        return _reduce((score + batch.noise / batch.std) ** 2, reduce_mean) * g2.flatten()
    return _reduce((score * batch.std + batch.noise) ** 2, reduce_mean)


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
    batch = NoisyBatch(x0, *perturb(x0, sde, t, noise, eps, generator))
    score = score_model(batch.x_t, batch.time, **cond).score
    return _dsm_per_sample(score, batch, sde, reduce_mean, likelihood_weighting).mean()


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


def ddpm_noisy_batch(
    x0: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NoisyBatch:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at integer ``timesteps`` (uniform when not given)."""
    n = noise_scheduler.config.num_train_timesteps
    if timesteps is None:
        gen_device = generator.device if isinstance(generator, torch.Generator) else x0.device
        timesteps = torch.randint(0, n, (x0.shape[0],), generator=generator, device=gen_device).to(x0.device)
    if noise is None:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return NoisyBatch(x0, noise_scheduler.add_noise(x0, noise, timesteps), timesteps, noise)


def ddpm_terms(
    out: torch.Tensor, batch: NoisyBatch, noise_scheduler: DDPMScheduler
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``||out - target||^2`` (target eps or v) and the UNet's epsilon estimate eps_hat."""
    out = out[:, : batch.x0.shape[1]]
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target, eps_hat = batch.noise, out
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(batch.x0, batch.noise, batch.time)
        abar = noise_scheduler.alphas_cumprod.to(out.device)[batch.time].view(-1, 1, 1, 1).to(out.dtype)
        eps_hat = abar.sqrt() * out + (1 - abar).sqrt() * batch.x_t
    else:
        raise ValueError(f"noise_scheduler `prediction_type` must be 'epsilon' or 'v_prediction', got {kind!r}")
    return F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1), eps_hat


def ddpm_prediction_loss(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_eps: bool = False,
    **cond: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Discrete DDPM loss ||out - target||^2 (target eps or v, per the scheduler's ``prediction_type``).

    With ``return_eps=True`` also returns ``(eps_hat, noise)`` where eps_hat is the UNet's epsilon estimate.
    """
    batch = ddpm_noisy_batch(x0, noise_scheduler, timesteps, noise, generator)
    per_sample, eps_hat = ddpm_terms(unet(batch.x_t, batch.time, **cond).sample, batch, noise_scheduler)
    return (per_sample.mean(), eps_hat, batch.noise) if return_eps else per_sample.mean()


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
        fuse_batches (`bool`): evaluate retain and forget batches in one forward pass of the concatenated batch
            (same values as two passes for per-sample normalisations such as GroupNorm; faster).
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
        fuse_batches: bool = True,
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
        self.fuse_batches = fuse_batches

    # the four pieces a subclass may change -------------------------------------------------------------
    def noisy(self, model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator | None) -> NoisyBatch:
        """Perturb ``x0`` along the SDE: x_t = alpha_t x0 + sigma_t z at t ~ U(eps, T)."""
        return NoisyBatch(x0, *perturb(x0, self.sde or model.sde, eps=self.eps, generator=generator))

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        """The model output the terms are computed from (here the score s(x_t, t))."""
        return model(x_t, time, **cond).score

    def retain_term(self, model: torch.nn.Module, out: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """Denoising score matching on the retained batch, averaged."""
        sde = self.sde or model.sde
        return _dsm_per_sample(out, batch, sde, self.reduce_mean, self.likelihood_weighting).mean()

    def forget_term(self, model: torch.nn.Module, out: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """The MSGM term on the undesirable batch with eps_hat = -sigma_t s, averaged."""
        return forget_term(-batch.std * out, batch.noise, self.variant, self.reduce_mean).mean()

    # ---------------------------------------------------------------------------------------------------
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
        for name, x in (("x_retain", x_retain), ("x_forget", x_forget)):
            if x is not None and x.shape[0] == 0:
                raise ValueError(f"`{name}` is an empty batch (shape {tuple(x.shape)})")
        w = self.forget_weight
        retain_batch = self.noisy(model, x_retain, generator)
        if x_forget is None or step % self.forget_every != 0:
            retain = self.retain_term(model, self.predict(model, retain_batch.x_t, retain_batch.time,
                                                          retain_cond or {}), retain_batch)
            return MSGMLossOutput((1 - w) * retain, retain.detach(), torch.zeros_like(retain.detach()), False)
        forget_batch = self.noisy(model, x_forget, generator)
        if self.fuse_batches and not retain_cond and not forget_cond:
            out = self.predict(model, torch.cat([retain_batch.x_t, forget_batch.x_t]),
                               torch.cat([retain_batch.time, forget_batch.time]), {})
            out_retain, out_forget = out.split([x_retain.shape[0], x_forget.shape[0]])
        else:
            out_retain = self.predict(model, retain_batch.x_t, retain_batch.time, retain_cond or {})
            out_forget = self.predict(model, forget_batch.x_t, forget_batch.time, forget_cond or {})
        retain = self.retain_term(model, out_retain, retain_batch)
        forget = self.forget_term(model, out_forget, forget_batch)
        return MSGMLossOutput((1 - w) * retain + w * forget, retain.detach(), forget.detach(), True)


class DDPMMSGMLoss(MSGMLoss):
    """MSGM on a discrete DDPM UNet trained with a diffusers ``DDPMScheduler``, in epsilon space.

    Retained data: the usual ``||out - target||^2``; undesirable data: ``forget_term(eps_hat, eps, variant)``.
    """

    def __init__(self, noise_scheduler: DDPMScheduler, variant: str = "orthogonal", forget_weight: float = 0.01, forget_every: int = 1,
                 reduce_mean: bool = True, fuse_batches: bool = True):
        super().__init__(None, variant, forget_weight, forget_every, reduce_mean=reduce_mean, fuse_batches=fuse_batches)
        self.noise_scheduler = noise_scheduler

    def noisy(self, model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator | None) -> NoisyBatch:
        """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at uniform integer timesteps."""
        return ddpm_noisy_batch(x0, self.noise_scheduler, generator=generator)

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        """The UNet output (epsilon or v)."""
        return model(x_t, time, **cond).sample

    def retain_term(self, model: torch.nn.Module, out: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """The DDPM loss ``||out - target||^2`` on the retained batch, averaged."""
        return ddpm_terms(out, batch, self.noise_scheduler)[0].mean()

    def forget_term(self, model: torch.nn.Module, out: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """The MSGM term on the UNet's epsilon estimate for the undesirable batch, averaged."""
        eps_hat = ddpm_terms(out, batch, self.noise_scheduler)[1]
        return forget_term(eps_hat, batch.noise, self.variant, self.reduce_mean).mean()
