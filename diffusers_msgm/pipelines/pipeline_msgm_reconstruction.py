"""``MSGMReconstructionPipeline``: encode images to x_T with the probability-flow ODE, then decode them back.

Probability-flow ODE (Song et al. 2021, eq. 13): dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt. It is deterministic and
invertible, so integrating it forward (``sampling_eps`` -> T, encoding) and backward (T -> ``sampling_eps``,
decoding, the ``predictor="ode"`` sampler) returns the input **up to the ODE discretisation error** (and the
score's own error: a model that cannot reconstruct an image -- e.g. one that unlearned it -- shows a large MSE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..moderation import Moderation
from ..schedulers.scheduling_moderated_score import ODE_SOLVERS, ModeratedScoreScheduler
from .pipeline_utils import Generator, ImageInput, MSGMPipelineMixin, to_model_space


@dataclass
class MSGMReconstructionPipelineOutput(BaseOutput):
    """Output of [`MSGMReconstructionPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the decoded images, in ``output_type``.
        latents (`torch.Tensor` of shape `(batch, C, H, W)`): the x_T they were decoded from (model space, after
            the optional ``latent_noise_scale`` perturbation).
        mse (`torch.Tensor` of shape `(batch,)`): per-image mean squared error between the decoded and the input
            image, both in [0, 1] (before any PIL quantisation).
    """

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
    latents: torch.Tensor
    mse: torch.Tensor


class MSGMReconstructionPipeline(MSGMPipelineMixin, DiffusionPipeline):
    r"""Reconstruct images through the probability-flow ODE: x_0 -> x_T (encode) -> x_0' (decode).

    The encode-decode round trip is exact up to the ODE discretisation error (Heun: second order in the step).
    Optional perturbations make it a reconstruction test of the model: ``perturb_t`` first diffuses the image to
    time ``perturb_t`` with the forward kernel (e.g. 0.02) and encodes from there, so decoding has to denoise it;
    ``latent_noise_scale`` adds noise to x_T.

    Args:
        score_model ([`ScoreModel`]): the score network.
        scheduler ([`ModeratedScoreScheduler`]): its SDE and ``sampling_eps`` are used (the predictor is
            replaced by ``"ode"`` for decoding).
    """

    _callback_tensor_inputs = ["sample"]

    def _ode_scheduler(self, ode_solver: str) -> ModeratedScoreScheduler:
        if ode_solver not in ODE_SOLVERS:
            raise ValueError(f"`ode_solver` must be one of {ODE_SOLVERS}, got {ode_solver!r}")
        return ModeratedScoreScheduler.from_config(self.scheduler.config, predictor="ode", ode_solver=ode_solver,
                                                   corrector=None)

    def _drift(self, x: torch.Tensor, t: float, model_kwargs: dict[str, Any]) -> torch.Tensor:
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        score = self.score_model(x, t_batch, **model_kwargs).score
        return self.scheduler.sde.reverse_drift(x, t, score, probability_flow=True)[0]

    def encode(
        self,
        sample: torch.Tensor,
        num_inference_steps: int = 100,
        ode_solver: str = "heun",
        t_start: float | None = None,
        progress: Any = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Integrate eq. 13 forward in time from ``t_start`` (default ``sampling_eps``) to T on a uniform grid of
        ``num_inference_steps`` times (the decoder's grid reversed); ``sample`` is in model space."""
        self._ode_scheduler(ode_solver)  # validates ode_solver
        sde = self.scheduler.sde
        t_start = self.scheduler.sampling_eps if t_start is None else float(t_start)
        grid = torch.linspace(sde.T, t_start, num_inference_steps, dtype=torch.float64).flip(0).tolist()
        x = sample
        for t, t_next in zip(grid[:-1], grid[1:]):
            dt = t_next - t
            drift = self._drift(x, t, model_kwargs)
            if ode_solver == "euler":
                x = x + drift * dt
            else:
                x_pred = x + drift * dt
                x = x + 0.5 * (drift + self._drift(x_pred, t_next, model_kwargs)) * dt
            if progress is not None:
                progress.update()
        return x

    def decode(
        self,
        latents: torch.Tensor,
        num_inference_steps: int = 100,
        ode_solver: str = "heun",
        moderation: Moderation | None = None,
        progress: Any = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Integrate eq. 13 backward from T to ``sampling_eps`` with the ``predictor="ode"`` scheduler (the final
        step to t = 0 is left out, so that decode inverts :meth:`encode`); ``moderation`` applies here only."""
        scheduler = self._ode_scheduler(ode_solver)
        scheduler.moderation = moderation if moderation is not None else self.scheduler.moderation
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        x = latents
        for t in scheduler.timesteps[:-1]:
            score = self.score_model(x, t.expand(x.shape[0]), **model_kwargs).score
            x = scheduler.step(score, t, x).prev_sample
            if progress is not None:
                progress.update()
        return x

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 100,
        ode_solver: str = "heun",
        perturb_t: float | None = None,
        latent_noise_scale: float = 0.0,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        moderation: Moderation | None = None,
        **model_kwargs: Any,
    ) -> Union[MSGMReconstructionPipelineOutput, tuple]:
        r"""Encode ``image`` to x_T and decode it back.

        Args:
            image: PIL image(s), numpy ``(H, W, C)`` / ``(N, H, W, C)`` in [0, 1] (or uint8) or a tensor
                ``(C, H, W)`` / ``(N, C, H, W)`` in [0, 1]; its shape must be the score model's ``sample_shape``.
            num_inference_steps (`int`, >= 2): times on each uniform grid (``num_inference_steps - 1`` ODE steps
                each way; Heun uses 2 score evaluations per step).
            ode_solver (`str`): ``"heun"`` or ``"euler"``, for both directions.
            perturb_t (`float`, *optional*): diffuse the image to this time, x = alpha_t x_0 + sigma_t z, then
                encode from ``perturb_t`` (in [sampling_eps, T)); e.g. 0.02.
            latent_noise_scale (`float`): x_T <- x_T + latent_noise_scale * prior_std * z before decoding.
            generator (*optional*): for the two perturbations' noise.
            output_type (`str`): ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict (`bool`): return a [`MSGMReconstructionPipelineOutput`] instead of a tuple.
            moderation (*optional*): ``(score, sample, t) -> score`` for the decoding (the encoding uses the plain
                score); defaults to the scheduler's hook.
            model_kwargs: passed to the score model (e.g. ``class_labels``).

        Returns:
            [`MSGMReconstructionPipelineOutput`] or ``(images, latents, mse)``.
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
            raise ValueError(f"`num_inference_steps` must be an int >= 2, got {num_inference_steps!r}")
        self._ode_scheduler(ode_solver)
        sde, eps = self.scheduler.sde, self.scheduler.sampling_eps
        if perturb_t is not None and not eps <= perturb_t < sde.T:
            raise ValueError(f"`perturb_t` must lie in [sampling_eps={eps:g}, T={sde.T:g}), got {perturb_t}")
        if latent_noise_scale < 0:
            raise ValueError(f"`latent_noise_scale` must be >= 0, got {latent_noise_scale}")
        x01 = self.image_input(image)
        self.check_call_inputs(output_type, x01.shape[0], generator)

        device, dtype = self._execution_device, self.score_model.dtype
        x01 = x01.to(device=device, dtype=dtype)
        x = to_model_space(x01, self.score_model.config.centered_data)
        if perturb_t is not None:
            x = self.scheduler.add_noise(x, randn_tensor(x.shape, generator=generator, device=device, dtype=dtype),
                                         perturb_t)
        decode_entries = 2 if ode_solver == "heun" else 1  # scheduler entries per decoding step
        with self.progress_bar(total=(num_inference_steps - 1) * (1 + decode_entries)) as progress:
            latents = self.encode(x, num_inference_steps, ode_solver, t_start=perturb_t, progress=progress,
                                  **model_kwargs)
            if latent_noise_scale > 0:
                noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
                latents = latents + latent_noise_scale * sde.prior_std() * noise
            decoded = self.decode(latents, num_inference_steps, ode_solver, moderation, progress=progress,
                                  **model_kwargs)

        images01 = self.to_unit_range(decoded)
        mse = (images01 - x01).pow(2).flatten(1).mean(1).float().cpu()
        images = self.convert_output(images01, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, latents, mse)
        return MSGMReconstructionPipelineOutput(images=images, latents=latents, mse=mse)
