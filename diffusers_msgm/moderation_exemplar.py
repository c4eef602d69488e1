"""Inference-time moderations built from data: forgotten exemplars, or a noise-aware classifier.

Both are ``moderation(score, sample, t) -> score`` hooks for [`ModeratedScoreScheduler`] and the MSGM pipelines.

* :class:`ExemplarModeration` -- the direction toward the forgotten set is the score of its Gaussian-smoothed
  empirical distribution p_t^f(x) = (1/N) sum_i N(x; alpha_t x0_i, sigma_t^2 I), in closed form

      w_i(x_t) = softmax_i(-||x_t - alpha_t x0_i||^2 / (2 sigma_t^2)),
      s_forget(x_t, t) = sum_i w_i (alpha_t x0_i - x_t) / sigma_t^2,

  and the model score is projected against it with MSGM's orthogonal / obtuse rule (``project_score``).
* :class:`ClassifierModeration` -- negative classifier guidance (Dhariwal & Nichol 2021, eq. 2 with the sign
  flipped): s' = s - scale * grad_x log p(y in forget | x_t, t), or the retain form
  s' = s + scale * grad_x log p(y not in forget | x_t, t), with a classifier trained on noisy samples
  (:class:`NoiseAwareClassifier`, :func:`train_noise_aware_classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .moderation import MODERATION_MODES, project_score
from .pipelines.pipeline_utils import ImageInput, images_to_tensor, to_model_space
from .sde import SDE, broadcast_time


def _resolve_sde(sde: Any) -> SDE:
    """An :class:`SDE`, or the ``.sde`` of a score model / scheduler."""
    if isinstance(sde, SDE):
        return sde
    if isinstance(getattr(sde, "sde", None), SDE):
        return sde.sde
    raise ValueError(f"`sde` must be an SDE (or a ScoreModel / scheduler with an `.sde`), got {type(sde).__name__}")


def images_to_model_space(images: ImageInput, centered_data: bool = True, name: str = "forget_images") -> torch.Tensor:
    """A tensor ``(N, *sample_shape)`` is taken as model space already; PIL images / NHWC numpy in [0, 1] are
    converted to NCHW and, with ``centered_data``, to [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim < 2:
            raise ValueError(f"`{name}` as a tensor must be (N, *sample_shape), got shape {tuple(images.shape)}")
        images = images.detach() if images.is_floating_point() else images.detach().float()
    else:
        images = to_model_space(images_to_tensor(images, name=name), centered_data)
    if images.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: at least one exemplar is needed")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"`{name}` has non-finite values")
    return images


class ExemplarModeration:
    r"""Moderate the score against the direction toward a set of forgotten exemplars (closed form above).

    Args:
        forget_images: the forgotten set: a tensor ``(N, C, H, W)`` (any ``(N, *sample_shape)``) **in model
            space**, or PIL images / an ``(N, H, W, C)`` numpy array in [0, 1] (converted with ``centered_data``).
        sde: the model's forward SDE (or a score model / scheduler with an ``.sde``), for alpha_t and sigma_t.
        mode (`str`): ``"orthogonal"`` (remove the component along s_forget) or ``"obtuse"`` (reverse its positive
            part), see ``diffusers_msgm.moderation``.
        strength (`float`): lambda of the projection, >= 0.
        temperature (`float`): the softmax logits are divided by it: 1 is the exact smoothed-empirical score,
            larger values average the exemplars more (-> direction toward their mean), smaller ones pick the nearest.
        centered_data (`bool`): data space of the score model (its ``config.centered_data``), for PIL / numpy input.

    Distances use ||x - a e||^2 = |x|^2 - 2 a <x, e> + a^2 |e|^2 (one ``(B, D) x (D, N)`` matmul, the |x|^2 term
    drops out of the softmax), computed in float64 (float32 on MPS) since sigma_t^2 is ~1e-4 near t = 0.

    Caveat: at ``strength=1`` nothing pulls samples back along s_forget. In 2-D (tests) the moderated samples leave
    the retained mode too, as with ``DirectionModeration``; use ``ClassifierModeration(objective="retain")`` there.
    """

    def __init__(
        self,
        forget_images: ImageInput,
        sde: Any,
        mode: str = "orthogonal",
        strength: float = 1.0,
        temperature: float = 1.0,
        centered_data: bool = True,
    ):
        if mode not in MODERATION_MODES:
            raise ValueError(f"`mode` must be one of {MODERATION_MODES}, got {mode!r}")
        if strength < 0:
            raise ValueError(f"`strength` must be >= 0, got {strength}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}")
        self.sde = _resolve_sde(sde)
        self.exemplars = images_to_model_space(forget_images, centered_data)
        self.mode, self.strength, self.temperature = mode, float(strength), float(temperature)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _flat_exemplars(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            flat = self.exemplars.flatten(1).to(device=device, dtype=dtype)
            self._cache[key] = (flat, flat.pow(2).sum(1))
        return self._cache[key]

    def forget_score(self, sample: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
        """s_forget(x_t, t) = sum_i w_i (alpha_t x0_i - x_t) / sigma_t^2 (with the tempered weights)."""
        if tuple(sample.shape[1:]) != tuple(self.exemplars.shape[1:]):
            raise ValueError(
                f"`forget_images` have per-image shape {tuple(self.exemplars.shape[1:])} (channels, resolution) but "
                f"the sample has {tuple(sample.shape[1:])}: give exemplars at the model's channels and resolution"
            )
        dtype = torch.float32 if sample.device.type == "mps" else torch.float64
        exemplars, sq_norms = self._flat_exemplars(sample.device, dtype)
        x = sample.flatten(1).to(dtype)
        t_flat = broadcast_time(t, sample).flatten().to(dtype)
        alpha, sigma = (c.unsqueeze(1) for c in self.sde.marginal_coefficients(t_flat))  # (B, 1)
        var = sigma**2
        logits = (2 * alpha * (x @ exemplars.T) - alpha**2 * sq_norms) / (2 * var * self.temperature)  # (B, N)
        weights = torch.softmax(logits, dim=1)
        score = (alpha * (weights @ exemplars) - x) / var
        return score.view_as(sample).to(sample.dtype)

    def __call__(self, score: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return project_score(score, self.forget_score(sample, t), self.mode, self.strength)

    def __repr__(self) -> str:
        return (f"ExemplarModeration(num_exemplars={self.exemplars.shape[0]}, mode={self.mode!r}, "
                f"strength={self.strength}, temperature={self.temperature})")


CLASSIFIER_OBJECTIVES = ("forget", "retain")


class ClassifierModeration:
    r"""Negative guidance by a noise-aware classifier: s' = s - scale * grad_x log p(y in forget | x_t, t).

    p(y in forget | x_t, t) = sum_{k in forget_labels} softmax(classifier(x_t, t))_k. The classifier (an
    ``nn.Module`` in eval mode, or any differentiable callable) is called as ``classifier(x_t, t)`` with ``t`` of
    shape ``(batch,)`` and returns logits ``(batch, num_classes)`` (or an output with ``.logits``).

    With ``objective="forget"`` (the default, the formula above) the guided marginals are p_t(x) / p(forget | x)^scale:
    log p(forget | x) keeps decreasing linearly away from the forgotten class, so retained modes are also pushed
    away (2-D mixture with modes at -2 and +2: the kept mode moves to about -6 at scale 1). ``objective="retain"``
    uses s' = s + scale * grad_x log(1 - p(forget | x_t, t)) instead: with an exact classifier and scale 1 it
    samples p(x | y not in forget), leaving the retained modes where they are.

    Args:
        classifier: the noise-aware classifier, e.g. a trained :class:`NoiseAwareClassifier`.
        forget_labels: the class indices to steer away from.
        scale (`float`): guidance scale, >= 0.
        objective (`str`): ``"forget"`` or ``"retain"``, see above.
    """

    def __init__(
        self,
        classifier: Callable[..., Any],
        forget_labels: Union[int, Sequence[int]],
        scale: float = 1.0,
        objective: str = "forget",
    ):
        if objective not in CLASSIFIER_OBJECTIVES:
            raise ValueError(f"`objective` must be one of {CLASSIFIER_OBJECTIVES}, got {objective!r}")
        self.objective = objective
        if not callable(classifier):
            raise ValueError(f"`classifier` must be callable as classifier(x_t, t), got {type(classifier).__name__}")
        labels = [forget_labels] if isinstance(forget_labels, int) else [int(k) for k in forget_labels]
        if not labels or min(labels) < 0:
            raise ValueError(f"`forget_labels` must be a non-empty list of class indices >= 0, got {forget_labels!r}")
        if scale < 0:
            raise ValueError(f"`scale` must be >= 0, got {scale}")
        self.classifier, self.forget_labels, self.scale = classifier, sorted(set(labels)), float(scale)

    def log_prob_forget(
        self, sample: torch.Tensor, t: Union[float, torch.Tensor], complement: bool = False
    ) -> torch.Tensor:
        """log p(y in forget | x_t, t) (``complement``: log p(y not in forget | ...)), shape ``(batch,)``;
        differentiable in ``sample``."""
        x, t_flat = sample, broadcast_time(t, sample).flatten()
        param = next(self.classifier.parameters(), None) if isinstance(self.classifier, nn.Module) else None
        if param is not None:
            x, t_flat = x.to(param.device, param.dtype), t_flat.to(param.device, param.dtype)
        out = self.classifier(x, t_flat)
        logits = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != sample.shape[0]:
            raise ValueError(
                f"`classifier` must return logits of shape (batch={sample.shape[0]}, num_classes), got "
                f"{getattr(logits, 'shape', type(logits).__name__)}"
            )
        if max(self.forget_labels) >= logits.shape[1]:
            raise ValueError(f"`forget_labels` {self.forget_labels} out of range for {logits.shape[1]} classes")
        labels = self.forget_labels
        if complement:
            labels = [k for k in range(logits.shape[1]) if k not in set(self.forget_labels)]
            if not labels:
                raise ValueError("`objective='retain'` needs at least one class outside `forget_labels`")
        return torch.logsumexp(logits[:, labels], dim=1) - torch.logsumexp(logits, dim=1)

    def __call__(self, score: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        retain = self.objective == "retain"
        with torch.enable_grad():
            x = sample.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob_forget(x, t, complement=retain).sum(), x)
        grad = grad.to(score.dtype)
        return score + self.scale * grad if retain else score - self.scale * grad

    def __repr__(self) -> str:
        return (f"ClassifierModeration(forget_labels={self.forget_labels}, scale={self.scale}, "
                f"objective={self.objective!r})")


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    """A tiny CNN p(y | x_t, t): conv stages (stride 2 after the first) with GroupNorm, a per-channel time bias
    from a sinusoidal embedding of ``1000 t`` and SiLU, global average pooling and a linear head.

    ``forward(sample, t) -> logits``: ``sample`` ``(B, in_channels, H, W)`` in model space (any H, W), ``t`` a
    float or ``(B,)`` in (0, T].
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden_channels: Sequence[int] = (32, 64),
        time_embed_dim: int = 64,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or time_embed_dim < 2 or time_embed_dim % 2:
            raise ValueError(f"need in_channels >= 1, num_classes >= 2, an even time_embed_dim >= 2; got "
                             f"{in_channels}, {num_classes}, {time_embed_dim}")
        if not hidden_channels or any(w < 1 or w % norm_num_groups for w in hidden_channels):
            raise ValueError(f"`hidden_channels` {list(hidden_channels)} must be positive multiples of "
                             f"`norm_num_groups`={norm_num_groups}")
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU())
        self.convs, self.norms, self.time_proj = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        channels = in_channels
        for k, width in enumerate(hidden_channels):
            self.convs.append(nn.Conv2d(channels, width, 3, stride=1 if k == 0 else 2, padding=1))
            self.norms.append(nn.GroupNorm(norm_num_groups, width))
            self.time_proj.append(nn.Linear(time_embed_dim, width))
            channels = width
        self.head = nn.Linear(channels, num_classes)

    def forward(self, sample: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"`sample` must be (batch, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
        t = broadcast_time(t, sample).flatten()
        emb = get_timestep_embedding(t * 1000, self.config.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = self.time_mlp(emb.to(sample.dtype))
        h = sample
        for conv, norm, proj in zip(self.convs, self.norms, self.time_proj):
            h = F.silu(norm(conv(h)) + proj(emb)[:, :, None, None])
        return self.head(h.mean(dim=(2, 3)))


def train_noise_aware_classifier(
    images: ImageInput,
    labels: Union[torch.Tensor, Sequence[int]],
    sde: Any,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    num_classes: int | None = None,
    centered_data: bool = True,
    classifier: NoiseAwareClassifier | None = None,
    **classifier_kwargs: Any,
) -> NoiseAwareClassifier:
    """Train a :class:`NoiseAwareClassifier` by cross-entropy on marginal samples x_t = alpha_t x_0 + sigma_t z
    with t ~ U(sampling_eps, T) (the kernel of eq. 29 / 33 of Song et al. 2021). Returns it in eval mode.

    ``images`` as for :class:`ExemplarModeration` (tensors in model space); ``labels`` one int per image;
    ``num_classes`` defaults to ``max(labels) + 1`` (at least 2). ``classifier`` continues training an existing
    one; otherwise ``classifier_kwargs`` configure a new one. Fully determined by ``seed`` on CPU.
    """
    sde = _resolve_sde(sde)
    x0 = images_to_model_space(images, centered_data, name="images")
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.shape[0] != x0.shape[0]:
        raise ValueError(f"`labels` has {y.shape[0]} entries but `images` has {x0.shape[0]}")
    num_classes = max(int(y.max()) + 1, 2) if num_classes is None else int(num_classes)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1 or not lr > 0:
        raise ValueError(f"need an int `steps` >= 1, an int `batch_size` >= 1 and `lr` > 0; got {steps}, {batch_size}, {lr}")
    if classifier is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = NoiseAwareClassifier(in_channels=x0.shape[1], num_classes=num_classes, **classifier_kwargs)
    device, eps = classifier.device, sde.sampling_eps
    x0, y = x0.to(device, classifier.dtype), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr)
    classifier.train()
    for _ in range(steps):
        idx = torch.randint(0, x0.shape[0], (min(batch_size, x0.shape[0]),), generator=gen)
        t = (eps + (sde.T - eps) * torch.rand(idx.shape[0], generator=gen)).to(device, x0.dtype)
        noise = torch.randn(idx.shape[0], *x0.shape[1:], generator=gen).to(device, x0.dtype)
        mean, std = sde.marginal_prob(x0[idx], t)
        loss = F.cross_entropy(classifier(mean + std * noise, t), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return classifier.eval()
