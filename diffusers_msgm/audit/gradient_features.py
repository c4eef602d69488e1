"""Per-sample gradient features of a score model (TRAK / D-TRAK / DAS), with ``torch.func``.

For an image x_0 and a method's output function f, the feature is (Zheng et al. 2024, eq. 6; Lin et al. 2025)

    g(x_0) = (1/K) sum_{k=1..K} n_k( grad_theta f(eps_hat_theta(x_{t_k}, t_k), z_k) ),
    x_{t_k} = alpha_{t_k} x_0 + sigma_{t_k} z_k   (the ScoreModel's SDE marginal, ``losses.perturb``),

then ``phi(x_0) = M^T g(x_0)`` with a seeded random projection M (``projection.BlockwiseProjector``).

``eps_hat`` is the ScoreModel's epsilon estimate ``-sigma_t * s_theta(x_t, t)`` whatever the UNet predicts: for
``prediction_type="epsilon"`` it is the UNet output; for ``"v_prediction"`` (sigma_t x_t + alpha_t v) / (alpha_t^2 +
sigma_t^2); for ``"sample"`` (x_t - alpha_t x0_hat) / sigma_t; for ``"score"`` -sigma_t times the UNet output.

Output functions f (means over the C*H*W pixels):

* ``"trak"``:   the DSM loss mean((eps_hat - z)^2) = mean((sigma_t s + z)^2) of ``denoising_score_matching_loss``;
* ``"d-trak"``: mean(eps_hat^2) (D-TRAK's best "squared-norm" output function);
* ``"das"``:    mean(eps_hat), each timestep's gradient normalised to unit length before the average (n_k).

The noise z_k is one fixed (C, H, W) tensor per (seed, k), shared by every image, so a feature does not depend on
the batch an image is in, and training and query images see the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, vmap

from .projection import BlockwiseProjector

OUTPUT_FUNCTIONS = ("trak", "d-trak", "das")


def check_method(method: str) -> str:
    if method not in OUTPUT_FUNCTIONS:
        raise ValueError(f"`method` must be one of {OUTPUT_FUNCTIONS}, got {method!r}")
    return method


def resolve_timesteps(timesteps: int | Sequence[float] | torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``int K`` -> the K bin midpoints ``(k + 1/2) T / K`` of (0, T]; a list -> those times (each in (0, T])."""
    if isinstance(timesteps, bool):
        raise TypeError("`timesteps` must be an int K or a sequence of times in (0, T], got a bool")
    if isinstance(timesteps, int):
        if timesteps < 1:
            raise ValueError(f"`timesteps` must be >= 1 when an int, got {timesteps}")
        return (torch.arange(timesteps, dtype=torch.float32) + 0.5) * (T / timesteps)
    times = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    if times.numel() == 0:
        raise ValueError("`timesteps` must not be empty")
    if bool(((times <= 0) | (times > T)).any()):
        raise ValueError(f"every timestep must lie in (0, {T}], got {times.tolist()}")
    return times


def eps_from_unet_output(score_model, sample: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """eps_hat = -sigma_t s(x_t, t) from the wrapped UNet's raw output (``ScoreModel.epsilon_from_output``, which
    skips the data-dependent input checks of ``ScoreModel.forward`` that ``torch.func.vmap`` cannot trace)."""
    return score_model.epsilon_from_output(sample, t, out)


def fixed_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise z for timestep number ``index``: a function of ``(seed, index)`` only."""
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(index))
    return torch.randn(tuple(shape), generator=generator)


class GradientFeaturizer:
    """Computes projected, timestep-averaged per-sample gradients of a method's output function.

    Args:
        score_model: an unconditional :class:`~diffusers_msgm.ScoreModel` (its trainable parameters are used).
        method (`str`): ``"trak"``, ``"d-trak"`` or ``"das"``.
        timesteps: an int K or explicit continuous times in (0, T].
        proj_dim (`int`): k.
        seed (`int`): seeds the projection and the noise.
        projection (`str`): ``"gaussian"`` or ``"rademacher"``.
        batch_size (`int`): images per vmap call.
        block_size (`int`): rows of the projection generated at once (``BlockwiseProjector``).
    """

    def __init__(self, score_model, method: str, timesteps, proj_dim: int, seed: int = 0,
                 projection: str = "gaussian", batch_size: int = 16, block_size: int = 8192) -> None:
        if getattr(score_model, "is_conditional", False):
            raise ValueError("attribution supports unconditional ScoreModels (UNet2DModel) only")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        self.model, self.method = score_model, check_method(method)
        self.times = resolve_timesteps(timesteps, score_model.sde.T)
        self.seed, self.batch_size = int(seed), batch_size
        self.names = [n for n, p in score_model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("`score_model` has no trainable parameters")
        if not all(n.startswith("unet.") for n in self.names):
            raise ValueError("every trainable parameter of `score_model` must belong to its `unet`")
        self.num_params = sum(p.numel() for n, p in score_model.named_parameters() if p.requires_grad)
        self.projector = BlockwiseProjector(self.num_params, proj_dim, seed=self.seed, kind=projection,
                                            block_size=block_size)

    # ------------------------------------------------------------------ the output function
    def _output(self, params: dict, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """f for one image (no batch dimension) and the DSM loss as auxiliary output."""
        sample = x_t.unsqueeze(0)
        unet_params = {n[len("unet."):]: p for n, p in params.items()}
        time_label = self.model.time_input(t).to(sample.dtype)
        out = functional_call(self.model.unet, unet_params, (sample, time_label), {"return_dict": False})[0]
        eps_hat = eps_from_unet_output(self.model, sample, t, out)[0]
        loss = (eps_hat - noise).pow(2).mean()
        if self.method == "trak":
            value = loss
        elif self.method == "d-trak":
            value = eps_hat.pow(2).mean()
        else:
            value = eps_hat.mean()
        return value, loss.detach()

    def _params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def _noisy(self, x0: torch.Tensor, k: int):
        t = self.times[k : k + 1].to(x0.device)
        noise = fixed_noise(self.seed, k, x0.shape[1:]).to(x0).expand_as(x0)
        alpha, sigma = self.model.sde.marginal_coefficients(t)
        return alpha * x0 + sigma * noise, noise, t

    def per_sample_grads(self, x0: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``vmap(grad(f))`` at timestep number ``k``: flat gradients ``(batch, P)`` and DSM losses ``(batch,)``."""
        x_t, noise, t = self._noisy(x0, k)
        fn = vmap(grad(self._output, has_aux=True), in_dims=(None, 0, 0, None))
        grads, loss = fn(self._params(), x_t, noise, t)
        return torch.cat([grads[n].flatten(1) for n in self.names], 1), loss

    def per_sample_grads_loop(self, x0: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference implementation of :meth:`per_sample_grads`: one ``torch.autograd.grad`` per image."""
        x_t, noise, t = self._noisy(x0, k)
        params = [p for n, p in self.model.named_parameters() if n in set(self.names)]
        rows, losses = [], []
        for i in range(x0.shape[0]):
            value, loss = self._output(dict(zip(self.names, params)), x_t[i], noise[i], t)
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(value, params)]))
            losses.append(loss)
        return torch.stack(rows), torch.stack(losses)

    # ------------------------------------------------------------------ features
    def averaged_grads(self, x0: torch.Tensor, loop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """g(x_0) of the module docstring ``(batch, P)`` and the residual mean_k sqrt(loss_k) ``(batch,)``."""
        total = torch.zeros(x0.shape[0], self.num_params, dtype=torch.float32, device=x0.device)
        residual = torch.zeros(x0.shape[0], dtype=torch.float32, device=x0.device)
        for k in range(len(self.times)):
            flat, loss = (self.per_sample_grads_loop if loop else self.per_sample_grads)(x0, k)
            if self.method == "das":
                flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
            total += flat.float()
            residual += loss.float().clamp_min(0).sqrt()
        return total / len(self.times), residual / len(self.times)

    def features(self, images: torch.Tensor, loop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features ``phi`` ``(N, k)`` and residuals ``(N,)`` for images ``(N, C, H, W)``, in batches."""
        feats, residuals = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, images.shape[0], self.batch_size):
                g, r = self.averaged_grads(images[start : start + self.batch_size], loop=loop)
                feats.append(self.projector.project(g))
                residuals.append(r)
        finally:
            self.model.train(was_training)
        return torch.cat(feats), torch.cat(residuals)
