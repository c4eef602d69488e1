"""Memorization in text-conditional diffusion models: detection and token-level explanation (Wen et al., ICLR 2024).

"Detecting, Explaining, and Mitigating Memorization in Diffusion Models". With classifier-free guidance a
text-conditional UNet predicts eps(x_t, e_p) for the prompt embedding e_p and eps(x_t, e_empty) for the empty
prompt. Memorized prompts pull hard toward one training image, so the *text-conditional noise magnitude*

    d_t = || eps(x_t, e_p) - eps(x_t, e_empty) ||_2        (norm over all latent/pixel dimensions)

is large along their generations. The detection score is d_t averaged over the sampling steps and over
``num_generations`` seeds (paper: DDIM, 50 steps, guidance 7.5, n = 4), or the first-step value d_T only
(one UNet call per seed, before any denoising). The token-level explanation is the norm of grad d_T with respect to
each position of the conditional embedding e_p (the text-encoder output), BOS skipped.

Works with any (``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``[, ``vae``]) set: a diffusers
``StableDiffusionPipeline`` (latent space) or a pixel-space ``UNet2DConditionModel`` with a ``CLIPTextModel``
(e.g. :mod:`diffusers_msgm.audit.tiny_text`). Mitigation lives in :mod:`.text_conditional_mitigation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class TextConditionalComponents:
    """The parts of a text-to-image diffusion model the audit needs (``vae`` only to decode latents to images).

    ``unet`` must take ``encoder_hidden_states`` (a config with ``cross_attention_dim``: ``UNet2DConditionModel``)
    and predict epsilon or v, per ``scheduler.config.prediction_type``.
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    vae: torch.nn.Module | None = None

    def __post_init__(self):
        config = getattr(self.unet, "config", None)
        cross_dim = getattr(config, "cross_attention_dim", None) if config is not None else None
        if cross_dim is None:
            hint = ""
            if type(self.unet).__name__ == "ScoreModel":
                hint = (" For a conditional ScoreModel pass `score_model.unet` with a DDIMScheduler matching its VP "
                        "SDE (see `diffusers_msgm.training.builders.ddpm_scheduler_for`).")
            raise TypeError(
                "`unet` must be text-conditional (a UNet2DConditionModel: config.cross_attention_dim set, forward "
                f"takes encoder_hidden_states), got {type(self.unet).__name__}.{hint}"
            )
        hidden = getattr(getattr(self.text_encoder, "config", None), "hidden_size", None)
        if isinstance(cross_dim, int) and hidden is not None and hidden != cross_dim:
            raise ValueError(f"`text_encoder` hidden_size {hidden} != unet cross_attention_dim {cross_dim}")
        if not isinstance(getattr(self.tokenizer, "model_max_length", None), int):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer with model_max_length, got "
                            f"{type(self.tokenizer).__name__}")
        if not (hasattr(self.scheduler, "set_timesteps") and hasattr(self.scheduler, "step")):
            raise TypeError(f"`scheduler` must be a diffusers scheduler, got {type(self.scheduler).__name__}")
        kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")
        if kind == "v_prediction" and getattr(self.scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise ValueError("v_prediction is supported with DDPM/DDIM-type schedulers (init_noise_sigma 1) only")

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> TextConditionalComponents:
        """Take ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` (and ``vae`` if any) from a pipeline."""
        missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if getattr(pipeline, n, None) is None]
        if missing:
            raise TypeError(f"`pipeline` ({type(pipeline).__name__}) lacks the text-conditional parts {missing}")
        return cls(pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler,
                   getattr(pipeline, "vae", None))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` the UNet denoises (latents for a latent-diffusion pipeline)."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)


ComponentsLike = Union[TextConditionalComponents, Any]


def as_components(model: ComponentsLike) -> TextConditionalComponents:
    """``model`` itself if it is a :class:`TextConditionalComponents`, else its parts taken from a pipeline."""
    if isinstance(model, TextConditionalComponents):
        return model
    return TextConditionalComponents.from_pipeline(model)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Input ids ``(P, model_max_length)``, padded; a prompt longer than the tokenizer allows is refused (never cut)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise TypeError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompts` must contain only strings")
    max_length = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]
    too_long = [(p, n) for p, n in zip(prompts, lengths) if n > max_length]
    if too_long:
        prompt, n = too_long[0]
        raise ValueError(f"prompt {prompt!r} has {n} tokens (BOS/EOS included), more than the tokenizer's "
                         f"model_max_length {max_length}; shorten it (it is not truncated silently)")
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=False,
                     return_tensors="pt").input_ids


def encode_prompts(model: ComponentsLike, prompts: Sequence[str]) -> torch.Tensor:
    """Conditional embeddings ``(P, L, D)``: the text encoder's last hidden state (as StableDiffusionPipeline)."""
    parts = as_components(model)
    ids = tokenize_prompts(parts.tokenizer, prompts).to(parts.device)
    with torch.no_grad():
        return parts.text_encoder(ids)[0].to(parts.dtype)


def empty_prompt_embeds(model: ComponentsLike) -> torch.Tensor:
    """``(1, L, D)`` embedding of the empty prompt, the unconditional branch of classifier-free guidance."""
    return encode_prompts(model, [""])


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


def check_threshold(threshold: Any) -> float:
    """A threshold on d must be a finite number > 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0 \
            or threshold == float("inf"):
        raise ValueError(f"`threshold` must be a finite number > 0, got {threshold!r}")
    return float(threshold)


def initial_latents(model: ComponentsLike, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Starting noise ``(batch, C, H, W)`` scaled by the scheduler's ``init_noise_sigma`` (drawn on the CPU)."""
    parts = as_components(model)
    noise = torch.randn((batch_size, *parts.latent_shape), generator=generator)
    return (noise * parts.scheduler.init_noise_sigma).to(parts.device, parts.dtype)


def predict_noise(parts: TextConditionalComponents, latents: torch.Tensor, t: torch.Tensor,
                  embeds: torch.Tensor) -> torch.Tensor:
    """eps(x_t, e): the UNet output, converted from v to epsilon for v-prediction schedulers."""
    x = parts.scheduler.scale_model_input(latents, t)
    out = parts.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
    out = out[:, : latents.shape[1]]
    if parts.scheduler.config.prediction_type == "v_prediction":
        abar = parts.scheduler.alphas_cumprod.to(out.device)[int(t)].to(out.dtype)
        out = abar.sqrt() * out + (1 - abar).sqrt() * latents  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
    return out


def text_noise_magnitude(eps_text: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """d = ||eps(x_t, e_p) - eps(x_t, e_empty)||_2 per sample, shape ``(batch,)``."""
    if eps_text.shape != eps_uncond.shape:
        raise ValueError(f"shapes differ: {tuple(eps_text.shape)} vs {tuple(eps_uncond.shape)}")
    return (eps_text - eps_uncond).flatten(1).norm(dim=1)


def _expand(embeds: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if embeds.ndim != 3 or embeds.shape[0] not in (1, batch):
        raise ValueError(f"`{name}` must have shape (1 or {batch}, seq_len, dim), got {tuple(embeds.shape)}")
    return embeds.expand(batch, -1, -1)


def first_timestep(parts: TextConditionalComponents, num_inference_steps: int) -> torch.Tensor:
    parts.scheduler.set_timesteps(_check_positive_int("num_inference_steps", num_inference_steps),
                                  device=parts.device)
    return parts.scheduler.timesteps[0]


@torch.no_grad()
def guided_denoising(
    model: ComponentsLike,
    prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt_embeds: torch.Tensor | None = None,
    max_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free-guided sampling that records d_t: ``(final latents, d of shape (batch, steps))``.

    eps_guided = eps_u + w (eps_c - eps_u) at every step (w = ``guidance_scale``), then ``scheduler.step``.
    ``max_steps`` stops early (1: only the first-step magnitude, the latents are then partly denoised).
    """
    parts = as_components(model)
    batch = latents.shape[0]
    text = _expand(prompt_embeds.to(parts.device, parts.dtype), batch, "prompt_embeds")
    uncond = negative_prompt_embeds if negative_prompt_embeds is not None else empty_prompt_embeds(parts)
    uncond = _expand(uncond.to(parts.device, parts.dtype), batch, "negative_prompt_embeds")
    parts.scheduler.set_timesteps(_check_positive_int("num_inference_steps", num_inference_steps),
                                  device=parts.device)
    timesteps = parts.scheduler.timesteps
    if max_steps is not None:
        timesteps = timesteps[: _check_positive_int("max_steps", max_steps)]
    magnitudes = []
    for t in timesteps:
        eps = predict_noise(parts, torch.cat([latents, latents]), t, torch.cat([uncond, text]))
        eps_uncond, eps_text = eps.chunk(2)
        magnitudes.append(text_noise_magnitude(eps_text, eps_uncond))
        guided = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        if parts.scheduler.config.prediction_type == "v_prediction":  # the scheduler steps with v
            abar = parts.scheduler.alphas_cumprod.to(latents.device)[int(t)].to(latents.dtype)
            guided = (guided - (1 - abar).sqrt() * latents) / abar.sqrt().clamp_min(1e-8)
        latents = parts.scheduler.step(guided, t, latents, return_dict=False)[0]
    return latents, torch.stack(magnitudes, dim=1)


@dataclass
class TextMemorizationScores:
    """Detection output for P prompts.

    Attributes:
        magnitudes: d_t, shape ``(P, num_generations, steps)`` (steps = 1 for ``first_step_only``).
        score: mean of d_t over steps and generations, ``(P,)`` -- higher means more likely memorized.
        first_step_score: mean over generations of the first-step d_T, ``(P,)``.
    """

    magnitudes: torch.Tensor
    score: torch.Tensor
    first_step_score: torch.Tensor


def detect_text_memorization(
    model: ComponentsLike,
    prompts: Sequence[str],
    num_inference_steps: int = 50,
    num_generations: int = 4,
    guidance_scale: float = 7.5,
    first_step_only: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> TextMemorizationScores:
    """Wen et al.'s detection score of each prompt (see the module docstring).

    Noise for all ``P * num_generations`` runs is drawn up front from ``generator`` (prompt-major), so the result
    does not depend on ``batch_size`` (runs per UNet batch; each run costs two UNet evaluations per step).
    """
    parts = as_components(model)
    _check_positive_int("num_generations", num_generations)
    _check_positive_int("batch_size", batch_size)
    embeds = encode_prompts(parts, prompts)
    uncond = empty_prompt_embeds(parts)
    latents = initial_latents(parts, len(prompts) * num_generations, generator)
    embeds = embeds.repeat_interleave(num_generations, dim=0)
    chunks = []
    for start in range(0, latents.shape[0], batch_size):
        stop = start + batch_size
        _, d = guided_denoising(parts, embeds[start:stop], latents[start:stop], num_inference_steps, guidance_scale,
                                uncond, max_steps=1 if first_step_only else None)
        chunks.append(d)
    magnitudes = torch.cat(chunks).view(len(prompts), num_generations, -1).float().cpu()
    return TextMemorizationScores(magnitudes, magnitudes.mean(dim=(1, 2)), magnitudes[:, :, 0].mean(dim=1))


@dataclass
class TokenSignificance:
    """Per-token explanation of one prompt's first-step magnitude.

    Attributes:
        tokens: the prompt's tokens (BOS, EOS and padding excluded).
        grad_norms: ||grad of d_T w.r.t. the conditional embedding at that token's position||_2, ``(len(tokens),)``.
        relative: ``grad_norms`` normalised to sum to 1 (all zeros when every gradient is zero).
        magnitude: the first-step d_T (mean over generations) that was differentiated.
    """

    tokens: list[str]
    grad_norms: torch.Tensor
    relative: torch.Tensor
    magnitude: float


def first_step_magnitude(parts: TextConditionalComponents, prompt_embeds: torch.Tensor, latents: torch.Tensor,
                         t: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of d_T at timestep ``t``, differentiable in ``prompt_embeds``."""
    eps_text = predict_noise(parts, latents, t, _expand(prompt_embeds, latents.shape[0], "prompt_embeds"))
    return text_noise_magnitude(eps_text, eps_uncond).mean()


def uncond_noise(parts: TextConditionalComponents, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return predict_noise(parts, latents, t, _expand(empty_prompt_embeds(parts), latents.shape[0], "uncond"))


def token_significance(
    model: ComponentsLike,
    prompt: str,
    num_generations: int = 4,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
) -> TokenSignificance:
    """Which prompt tokens drive memorization: gradient norms of the first-step d_T per token position.

    The gradient is taken w.r.t. the conditional embeddings (text-encoder outputs), as in Wen et al.; BOS (position
    0), EOS and padding are left out. Tokens the UNet cannot see get exactly zero.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}")
    parts = as_components(model)
    ids = tokenize_prompts(parts.tokenizer, [prompt])[0]
    n_words = len(parts.tokenizer(prompt, truncation=False)["input_ids"]) - 2  # without BOS and EOS
    if n_words < 1:
        raise ValueError("`prompt` has no tokens to explain")
    tokens = parts.tokenizer.convert_ids_to_tokens(ids[1 : 1 + n_words].tolist())
    embeds = encode_prompts(parts, [prompt]).detach().requires_grad_(True)
    t = first_timestep(parts, num_inference_steps)
    latents = initial_latents(parts, _check_positive_int("num_generations", num_generations), generator)
    d = first_step_magnitude(parts, embeds, latents, t, uncond_noise(parts, latents, t))
    (grad,) = torch.autograd.grad(d, embeds)
    norms = grad[0, 1 : 1 + n_words].float().norm(dim=-1).cpu()
    total = norms.sum()
    relative = norms / total if total > 0 else torch.zeros_like(norms)
    return TokenSignificance(tokens, norms, relative, float(d.detach()))
