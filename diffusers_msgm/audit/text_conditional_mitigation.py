"""Mitigating memorization in text-conditional diffusion models (Wen et al., ICLR 2024, section 4).

* Inference time (:func:`mitigate_prompt_embeds`): before sampling, optimise the prompt embedding e_p to lower the
  first-step magnitude d_T(e_p) = ||eps(x_T, e_p) - eps(x_T, e_empty)||_2 (mean over the given starting latents)
  with AdamW (paper: lr 0.05, at most 10 iterations, stop as soon as d_T <= threshold, SD threshold 3), then sample
  from the same latents with the optimised embedding (:func:`generate_from_embeds`, or a pipeline's
  ``prompt_embeds=``).
* Training time (:func:`wen_filtered_loss`, :func:`text_conditional_ddpm_loss`): at every step compute the
  per-sample d at the sampled (x_t, t) and drop the samples with d >= threshold from the denoising loss
  (paper: threshold 2 on SD latents).

d is an L2 norm over all C*H*W latent (or pixel) dimensions, so thresholds do not transfer between resolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import ddpm_noisy_batch, ddpm_terms
from .text_conditional import (
    ComponentsLike,
    as_components,
    check_threshold,
    encode_prompts,
    first_step_magnitude,
    first_timestep,
    guided_denoising,
    text_noise_magnitude,
    uncond_noise,
)


@dataclass
class PromptMitigationOutput:
    """Result of :func:`mitigate_prompt_embeds`.

    Attributes:
        prompt_embeds: the optimised embedding ``(1, L, D)`` (detached), to sample with.
        magnitudes: d_T before each optimiser step and after the last one (``num_iterations + 1`` values).
        num_iterations: optimiser steps taken (<= ``max_iterations``).
        converged: whether the final d_T is <= ``threshold``.
    """

    prompt_embeds: torch.Tensor
    magnitudes: list[float]
    num_iterations: int
    converged: bool


def mitigate_prompt_embeds(
    model: ComponentsLike,
    latents: torch.Tensor,
    threshold: float,
    prompt: str | None = None,
    prompt_embeds: torch.Tensor | None = None,
    learning_rate: float = 0.05,
    max_iterations: int = 10,
    num_inference_steps: int = 50,
) -> PromptMitigationOutput:
    """Optimise the prompt embedding at the first sampling step until d_T <= ``threshold`` (inference mitigation).

    Args:
        model: a :class:`TextConditionalComponents` or a pipeline exposing unet/text_encoder/tokenizer/scheduler.
        latents: the starting noise ``(B, C, H, W)`` the generation will use (e.g. from ``initial_latents``);
            d_T is averaged over it.
        threshold: target magnitude (> 0).
        prompt / prompt_embeds: exactly one of them.
        learning_rate, max_iterations: AdamW settings (paper: 0.05, 10).
        num_inference_steps: the sampling schedule whose first timestep is used.
    """
    threshold = check_threshold(threshold)
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"`max_iterations` must be an int >= 0, got {max_iterations!r}")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate!r}")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of `prompt` and `prompt_embeds`")
    parts = as_components(model)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != parts.latent_shape:
        raise ValueError(f"`latents` must have shape (batch, {', '.join(map(str, parts.latent_shape))}), got "
                         f"{tuple(latents.shape)}")
    start = encode_prompts(parts, [prompt]) if prompt is not None else prompt_embeds
    if start.ndim != 3 or start.shape[0] != 1:
        raise ValueError(f"`prompt_embeds` must have shape (1, seq_len, dim), got {tuple(start.shape)}")
    embeds = start.detach().clone().to(parts.device, parts.dtype).requires_grad_(True)
    latents = latents.to(parts.device, parts.dtype)
    t = first_timestep(parts, num_inference_steps)
    eps_uncond = uncond_noise(parts, latents, t)
    optimizer = torch.optim.AdamW([embeds], lr=learning_rate)
    magnitudes: list[float] = []
    for step in range(max_iterations + 1):
        d = first_step_magnitude(parts, embeds, latents, t, eps_uncond)
        magnitudes.append(float(d.detach()))
        if magnitudes[-1] <= threshold or step == max_iterations:
            break
        (embeds.grad,) = torch.autograd.grad(d, embeds)  # leaves the UNet's .grad untouched
        optimizer.step()
    return PromptMitigationOutput(embeds.detach(), magnitudes, len(magnitudes) - 1, magnitudes[-1] <= threshold)


@torch.no_grad()
def generate_from_embeds(
    model: ComponentsLike,
    prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free-guided samples ``(B, C', H', W')`` in the model's data range (decoded by the VAE if any)."""
    parts = as_components(model)
    out, _ = guided_denoising(parts, prompt_embeds, latents.to(parts.device, parts.dtype), num_inference_steps,
                              guidance_scale, negative_prompt_embeds)
    if parts.vae is not None:
        out = parts.vae.decode(out / parts.vae.config.scaling_factor, return_dict=False)[0]
    return out


@dataclass
class FilteredLossOutput:
    """Attributes: ``loss`` (mean over kept samples; 0 with a graph when none is kept), ``per_sample_loss``,
    ``magnitude`` (per-sample d, None without a threshold) and ``keep`` (bool mask of the samples in the loss)."""

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    magnitude: torch.Tensor | None
    keep: torch.Tensor


def per_sample_text_magnitude(eps_text: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample d = ||eps(x_t, c) - eps(x_t, empty)||_2 of a training batch (no gradient)."""
    return text_noise_magnitude(eps_text.detach(), eps_uncond.detach())


def wen_filtered_loss(per_sample_loss: torch.Tensor, magnitude: torch.Tensor, threshold: float) -> FilteredLossOutput:
    """Wen et al.'s training-time mitigation: the mean loss over the samples with d < ``threshold``."""
    threshold = check_threshold(threshold)
    if per_sample_loss.ndim != 1 or magnitude.shape != per_sample_loss.shape:
        raise ValueError(f"`per_sample_loss` and `magnitude` must both have shape (batch,), got "
                         f"{tuple(per_sample_loss.shape)} and {tuple(magnitude.shape)}")
    keep = magnitude.detach() < threshold
    weights = keep.to(per_sample_loss.dtype)
    loss = (per_sample_loss * weights).sum() / weights.sum().clamp_min(1.0)
    return FilteredLossOutput(loss, per_sample_loss, magnitude, keep)


def text_conditional_ddpm_loss(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    noise_scheduler,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> FilteredLossOutput:
    """DDPM loss of a text-conditional UNet, optionally with the per-sample memorization filter.

    ``prompt_embeds`` ``(B, L, D)`` are the captions' embeddings (rows replaced by the empty prompt for caption
    dropout, which then have d = 0 and are always kept). Without ``threshold`` this is the plain mean loss; with it,
    one extra no-grad UNet pass on ``uncond_embeds`` gives d per sample and :func:`wen_filtered_loss` is applied.
    """
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != x0.shape[0]:
        raise ValueError(f"`prompt_embeds` must have shape ({x0.shape[0]}, seq_len, dim), got "
                         f"{tuple(prompt_embeds.shape)}")
    if uncond_embeds.ndim != 3 or uncond_embeds.shape[0] != 1 or uncond_embeds.shape[1:] != prompt_embeds.shape[1:]:
        raise ValueError(f"`uncond_embeds` must have shape (1, {prompt_embeds.shape[1]}, {prompt_embeds.shape[2]}), "
                         f"got {tuple(uncond_embeds.shape)}")
    batch = ddpm_noisy_batch(x0, noise_scheduler, generator=generator)
    out = unet(batch.x_t, batch.time, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    per_sample, eps_text = ddpm_terms(out, batch, noise_scheduler)
    if threshold is None:
        return FilteredLossOutput(per_sample.mean(), per_sample, None, torch.ones_like(per_sample, dtype=torch.bool))
    with torch.no_grad():
        uncond = uncond_embeds.expand(x0.shape[0], -1, -1)
        _, eps_uncond = ddpm_terms(unet(batch.x_t, batch.time, encoder_hidden_states=uncond, return_dict=False)[0],
                                   batch, noise_scheduler)
    return wen_filtered_loss(per_sample, per_sample_text_magnitude(eps_text, eps_uncond), threshold)
