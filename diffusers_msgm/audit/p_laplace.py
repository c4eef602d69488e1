r"""The p-Laplacian of log p_t from a learned score, by the divergence theorem (Brokman et al., SSVM 2025).

For f = log p_t with grad f = s(x, t) (the score), the p-Laplacian is

    Delta_p f = div(|grad f|^(p-2) grad f)                    (p = 2: the Laplacian, div s).

Its integral over the ball B(c, r) equals the outward flux through the sphere S(c, r) (divergence theorem). With
directions u_j uniform on the unit sphere (u_j = z_j / |z_j|, z_j ~ N(0, I)) and y_j = c + r u_j,

    flux_p(c, r) = (1/n) sum_j |s(y_j)|^(p-2) s(y_j) . u_j  ~  (1/|S(c, r)|) \oint_S |s|^(p-2) s . n dA
                 = (r / d) * (mean of Delta_p f over the ball B(c, r))          (d = number of coordinates).

p = 1 gives the mean cosine between the score and the outward normal (in [-1, 1]); p = 2 the mean normal component
of the score. At a mode of p_t, e.g. a memorised training sample, the score points inward and the flux is negative.

``hutchinson_laplacian`` estimates the pointwise Laplacian div s(x) = tr(J_s(x)) = E_v[v^T J_s v] with Rademacher
probes v (Hutchinson 1989), one vector-Jacobian product per probe, for comparison with (d / r) * flux_2.

Score arguments: a :class:`~diffusers_msgm.ScoreModel` (its ``forward(x, t).score``; points must then have shape
``(n, *score_model.sample_shape)``) or any callable ``score_fn(x, t) -> score`` taking ``x`` of shape
``(batch, *event_shape)`` and ``t`` of shape ``(batch,)`` and returning a tensor shaped like ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..models.score_model import ScoreModel

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ScoreLike = Union[ScoreModel, ScoreFn]
TimeLike = Union[float, torch.Tensor]
RadiusLike = Union[float, torch.Tensor]

#: smallest supported exponent: Delta_p with p < 1 is not a (degenerate) elliptic operator.
MIN_P = 1.0


def resolve_score_fn(score_model: ScoreLike) -> tuple[ScoreFn, tuple[int, ...] | None]:
    """``(score_fn, expected event shape or None)`` for a ScoreModel or a plain ``score_fn(x, t)`` callable."""
    if isinstance(score_model, ScoreModel):
        return (lambda x, t: score_model(x, t).score), tuple(score_model.sample_shape)
    if callable(score_model):
        return score_model, None
    raise TypeError(
        f"`score_model` must be a ScoreModel or a callable score_fn(x, t) -> score, got {type(score_model).__name__}"
    )


def check_points(points: torch.Tensor, expected_shape: tuple[int, ...] | None) -> None:
    """``points`` must be a floating tensor ``(n, *event_shape)`` with n >= 1 (and the model's event shape)."""
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError(f"`points` must be a floating-point torch.Tensor, got {type(points).__name__}")
    if points.ndim < 2 or points.shape[0] < 1:
        raise ValueError(f"`points` must have shape (n_points, *event_shape) with n_points >= 1, got {tuple(points.shape)}")
    if expected_shape is not None and tuple(points.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"`points` must have shape (n_points, {', '.join(map(str, expected_shape))}) to match the score model's "
            f"sample shape, got {tuple(points.shape)}"
        )


def _per_point(value: Union[float, torch.Tensor], name: str, points: torch.Tensor, positive: bool) -> torch.Tensor:
    """A float or 0-d / ``(n_points,)`` tensor as a ``(n_points,)`` tensor on ``points``' device."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"`{name}` must be a float or a tensor of shape (n_points,), got {type(value).__name__}")
    n = points.shape[0]
    value = torch.as_tensor(value, device=points.device, dtype=points.dtype)
    if value.ndim == 0:
        value = value.expand(n)
    if value.shape != (n,):
        raise ValueError(f"`{name}` must be a float or a tensor of shape ({n},), got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()) or (positive and bool((value <= 0).any())):
        raise ValueError(f"`{name}` must be finite{' and > 0' if positive else ''}, got {value.tolist()[:8]}")
    return value


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < MIN_P:
        raise ValueError(f"`p` must be a finite number >= {MIN_P} (e.g. 1 or 2), got {p!r}")
    return float(p)


def sphere_directions(
    n_points: int,
    n_directions: int,
    event_shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Directions uniform on the unit sphere of R^d, d = prod(event_shape): ``(n_points, n_directions, *event_shape)``."""
    z = randn_tensor((n_points, n_directions, *event_shape), generator=generator, device=device, dtype=dtype)
    norm = z.flatten(2).norm(dim=2).clamp_min(torch.finfo(dtype).tiny)
    return z / norm.view(n_points, n_directions, *([1] * len(event_shape)))


def rademacher(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Independent +-1 entries with probability 1/2 each (drawn on the generator's device)."""
    draw = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return torch.where(draw < 0.5, -1.0, 1.0).to(device=device, dtype=dtype)


def _batched_scores(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([score_fn(x[i : i + batch_size], t[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def p_laplace_flux(
    score_model: ScoreLike,
    points: torch.Tensor,
    t: TimeLike,
    radius: RadiusLike,
    p: float = 1.0,
    n_directions: int = 64,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    r"""Monte-Carlo outward flux of |s|^(p-2) s through the sphere S(c, r) around each point c (module docstring).

    Args:
        score_model: a ``ScoreModel`` or a callable ``score_fn(x, t) -> score`` (see the module docstring).
        points (`torch.Tensor` of shape `(n_points, *event_shape)`): the centres c.
        t (`float` or `torch.Tensor` of shape `(n_points,)`): diffusion time passed to the score.
        radius (`float` or `torch.Tensor` of shape `(n_points,)`): sphere radius r > 0 (in the units of ``points``).
        p (`float`): exponent p >= 1 (1: mean cosine with the outward normal; 2: mean normal component).
        n_directions (`int`): number of directions u_j per point, >= 1.
        generator (`torch.Generator`, *optional*): source of the directions.
        batch_size (`int`): at most this many score evaluations per call (all directions of a point are batched).

    Returns:
        `torch.Tensor` of shape `(n_points,)`: mean_j |s(y_j)|^(p-2) s(y_j) . u_j, y_j = c + r u_j. Negative at modes;
        ``(d / r) * flux`` is the ball average of Delta_p log p_t (d = prod(event_shape)).
    """
    score_fn, expected_shape = resolve_score_fn(score_model)
    check_points(points, expected_shape)
    p = _check_p(p)
    _check_count(n_directions, "n_directions")
    _check_count(batch_size, "batch_size")
    t_vec = _per_point(t, "t", points, positive=False)
    r_vec = _per_point(radius, "radius", points, positive=True)
    event_shape, n_dims = tuple(points.shape[1:]), points[0].numel()
    chunk = max(1, batch_size // n_directions)
    fluxes = []
    with torch.no_grad():
        for start in range(0, points.shape[0], chunk):
            c, r, tc = points[start : start + chunk], r_vec[start : start + chunk], t_vec[start : start + chunk]
            k = c.shape[0]
            # one draw per point, so that the result does not depend on batch_size
            u = torch.cat([sphere_directions(1, n_directions, event_shape, generator, points.device, points.dtype)
                           for _ in range(k)])
            y = c.unsqueeze(1) + r.view(k, 1, *([1] * len(event_shape))) * u
            s = _batched_scores(score_fn, y.reshape(k * n_directions, *event_shape),
                                tc.repeat_interleave(n_directions), batch_size)
            if s.shape != (k * n_directions, *event_shape):
                raise ValueError(f"the score must have the shape of its input {(k * n_directions, *event_shape)}, "
                                 f"got {tuple(s.shape)}")
            s, u = s.reshape(k, n_directions, n_dims), u.reshape(k, n_directions, n_dims)
            normal = (s * u).sum(-1)
            if p != 2.0:  # |s|^(p-2) (s . u); the field |s|^(p-2) s is 0 where s = 0 (taken as 0 for p = 1 too)
                normal = normal * s.norm(dim=-1).clamp_min(torch.finfo(s.dtype).tiny).pow(p - 2.0)
            fluxes.append(normal.mean(1))
    return torch.cat(fluxes)


def hutchinson_laplacian(
    score_fn: ScoreLike,
    points: torch.Tensor,
    t: TimeLike,
    n_probes: int = 16,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    r"""Hutchinson estimate of the Laplacian of log p_t, div s(x) = tr(J_s(x)) ~ (1/m) sum_k v_k^T J_s(x) v_k.

    v_k are Rademacher (+-1) probes; each term is one vector-Jacobian product through the score (autograd), so the
    score must be differentiable in x. All probes of a point are evaluated in one batch (per-sample models only:
    no BatchNorm across the batch).

    Args:
        score_fn: a ``ScoreModel`` or a callable ``score_fn(x, t) -> score`` (see the module docstring).
        points (`torch.Tensor` of shape `(n_points, *event_shape)`): where to evaluate.
        t (`float` or `torch.Tensor` of shape `(n_points,)`): diffusion time.
        n_probes (`int`): number of probes m >= 1.
        generator (`torch.Generator`, *optional*): source of the probes.
        batch_size (`int`): about this many score evaluations per backward pass (all probes of a point together).

    Returns:
        `torch.Tensor` of shape `(n_points,)`: the estimate of Delta log p_t at each point (exact for any m when J_s
        is diagonal, e.g. an isotropic Gaussian).
    """
    fn, expected_shape = resolve_score_fn(score_fn)
    check_points(points, expected_shape)
    _check_count(n_probes, "n_probes")
    _check_count(batch_size, "batch_size")
    t_vec = _per_point(t, "t", points, positive=False)
    event_shape = tuple(points.shape[1:])
    chunk = max(1, batch_size // n_probes)
    estimates = []
    for start in range(0, points.shape[0], chunk):
        c, tc = points[start : start + chunk], t_vec[start : start + chunk]
        k = c.shape[0]
        v = torch.cat([rademacher((n_probes, *event_shape), generator, points.device, points.dtype) for _ in range(k)])
        with torch.enable_grad():
            x = c.detach().repeat_interleave(n_probes, dim=0).requires_grad_(True)
            s = fn(x, tc.repeat_interleave(n_probes))
            (vjp,) = torch.autograd.grad(s, x, grad_outputs=v)
        estimates.append((vjp * v).flatten(1).sum(1).view(k, n_probes).mean(1).detach())
    return torch.cat(estimates)
