"""``MSGMPipeline``: unconditional (or class/text-conditional) sampling from a ``ScoreModel``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..moderation import Moderation
from .pipeline_utils import MSGMPipelineMixin


class MSGMPipeline(MSGMPipelineMixin, DiffusionPipeline):
    r"""Sample a (moderated) score-based model by predictor-corrector integration of the reverse SDE.

    Args:
        score_model ([`ScoreModel`]): the score network.
        scheduler ([`ModeratedScoreScheduler`]): sampler for the score model's SDE.
    """

    _callback_tensor_inputs = ["sample", "score"]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        generator: Union[torch.Generator, list[torch.Generator]] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        moderation: Moderation | None = None,
        callback_on_step_end: Union[Callable[[Any, int, float, dict], dict], PipelineCallback, MultiPipelineCallbacks] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        latents: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""Generate images.

        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): number of predictor steps (score evaluations, times 2 - 1 for Heun, plus
                ``n_corrector_steps`` per step with a corrector).
            generator (`torch.Generator` or list of them, *optional*): makes sampling deterministic.
            output_type (`str`): ``"pil"``, ``"np"`` (float arrays in [0, 1], NHWC) or ``"pt"`` (NCHW in [0, 1]).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a tuple.
            moderation (*optional*): inference-time moderation ``(score, sample, t) -> score`` for this call only
                (overrides the scheduler's own hook).
            callback_on_step_end (*optional*): called as ``callback(pipe, i, t, callback_kwargs)`` after every
                step, with the tensors named in ``callback_on_step_end_tensor_inputs``; may return a dict whose
                ``"sample"`` replaces the current sample.
            latents (`torch.Tensor`, *optional*): prior sample x_T to start from (shape ``(batch, C, H, W)``).
            model_kwargs: passed to the score model (e.g. ``class_labels``, ``encoder_hidden_states``).
        """
        tensor_inputs = self.check_call_inputs(
            output_type, batch_size, generator, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        shape = (batch_size, *self.score_model.sample_shape)
        device, dtype = self._execution_device, self.score_model.dtype
        if latents is None:
            sample = self.scheduler.sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        elif not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` has non-finite values (NaN or Inf)")
        else:
            sample = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.moderation_scope(moderation):
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                sample, score = self.pc_update(sample, t, generator, model_kwargs)
                if callback_on_step_end is not None:
                    local_vars = {"sample": sample, "score": score}
                    sample = self.run_step_callback(callback_on_step_end, i, t, tensor_inputs, local_vars)

        image = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

