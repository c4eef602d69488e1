"""Inference-time moderation of a score: the MSGM geometry applied to the score, with no training.

A moderation is any callable ``moderation(score, sample, t) -> score`` (see ``ModeratedScoreScheduler``).
MSGM's two directions relative to a unit direction u (per sample, flattened):

* orthogonal: s' = s - lambda <s, u> u                (lambda = 1: no component along u is left)
* obtuse:     s' = s - (1 + lambda) relu(<s, u>) u    (lambda = 1: the positive component is reflected, so the
  angle between s' and u is >= 90 degrees and |s'| = |s|; scores already pointing away are untouched)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, Union

import torch

MODERATION_MODES = ("orthogonal", "obtuse")


class Moderation(Protocol):
    def __call__(self, score: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def _unit(direction: torch.Tensor, eps: float) -> torch.Tensor:
    flat = direction.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)).view_as(direction)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1).view(-1, *([1] * (a.ndim - 1)))


def orthogonal_projection(
    score: torch.Tensor, direction: torch.Tensor, strength: float = 1.0, eps: float = 1e-12
) -> torch.Tensor:
    """Remove ``strength`` times the component of ``score`` along ``direction`` (per sample)."""
    u = _unit(direction, eps)
    return score - strength * _inner(score, u) * u


def obtuse_projection(
    score: torch.Tensor, direction: torch.Tensor, strength: float = 1.0, eps: float = 1e-12
) -> torch.Tensor:
    """Reverse the positive component of ``score`` along ``direction``: s - (1 + strength) relu(<s, u>) u."""
    u = _unit(direction, eps)
    return score - (1.0 + strength) * _inner(score, u).clamp_min(0) * u


_PROJECTIONS = {"orthogonal": orthogonal_projection, "obtuse": obtuse_projection}


def project_score(score: torch.Tensor, direction: torch.Tensor, mode: str, strength: float = 1.0) -> torch.Tensor:
    """Apply the projection named ``mode`` (``"orthogonal"`` or ``"obtuse"``)."""
    if mode not in _PROJECTIONS:
        raise ValueError(f"`mode` must be one of {MODERATION_MODES}, got {mode!r}")
    return _PROJECTIONS[mode](score, direction, strength)


class DirectionModeration:
    """Moderate the score against a direction given as a tensor or as ``direction_fn(sample, t)``.

    Args:
        direction: a tensor broadcastable to the sample (e.g. ``x_forget - 0``), or a callable
            ``(sample, t) -> direction``, e.g. the direction from ``x_t`` toward an undesirable image's mean
            ``alpha_t x_forget - x_t``.
        mode (`str`): ``"orthogonal"`` or ``"obtuse"``.
        strength (`float`): lambda above, ``>= 0``.
    """

    def __init__(
        self,
        direction: Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
        mode: str = "orthogonal",
        strength: float = 1.0,
    ):
        if mode not in MODERATION_MODES:
            raise ValueError(f"`mode` must be one of {MODERATION_MODES}, got {mode!r}")
        if strength < 0:
            raise ValueError(f"`strength` must be >= 0, got {strength}")
        if not (callable(direction) or isinstance(direction, torch.Tensor)):
            raise ValueError("`direction` must be a tensor or a callable (sample, t) -> tensor")
        self.direction, self.mode, self.strength = direction, mode, float(strength)

    def __call__(self, score: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if callable(self.direction):
            direction = self.direction(sample, t)
        else:
            direction = self.direction.to(device=score.device, dtype=score.dtype).expand_as(score)
        return project_score(score, direction, self.mode, self.strength)

    def __repr__(self) -> str:
        return f"DirectionModeration(mode={self.mode!r}, strength={self.strength})"


def apply_moderation(
    moderation: Moderation | None, score: torch.Tensor, sample: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """``moderation(score, sample, t)`` with a shape check, or ``score`` when there is none."""
    if moderation is None:
        return score
    out = moderation(score, sample, t)
    if not isinstance(out, torch.Tensor) or out.shape != score.shape:
        raise ValueError(
            f"`moderation` must return a tensor shaped like the score {tuple(score.shape)}, got "
            f"{getattr(out, 'shape', type(out).__name__)}"
        )
    return out
