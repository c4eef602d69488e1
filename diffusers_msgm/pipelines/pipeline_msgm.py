"""``MSGMPipeline``: unconditional (or class/text-conditional) sampling from a ``ScoreModel``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..hub import pop_hub_kwargs, resolve_pretrained_dir
from ..models.conversion import score_model_from_diffusers_pipeline
from ..models.score_model import ScoreModel
from ..moderation import Moderation
from ..schedulers.scheduling_moderated_score import ModeratedScoreScheduler

OUTPUT_TYPES = ("pil", "np", "pt")


class MSGMPipeline(DiffusionPipeline):
    r"""Sample a (moderated) score-based model by predictor-corrector integration of the reverse SDE.

    Args:
        score_model ([`ScoreModel`]): the score network.
        scheduler ([`ModeratedScoreScheduler`]): sampler for the score model's SDE.
    """

    model_cpu_offload_seq = "score_model"
    _callback_tensor_inputs = ["sample", "score"]

    def __init__(self, score_model: ScoreModel, scheduler: ModeratedScoreScheduler):
        super().__init__()
        self.register_modules(score_model=score_model, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> MSGMPipeline:
        """Load from a local directory or a Hub repo id (the snapshot is downloaded first, see diffusers#6563)."""
        local = resolve_pretrained_dir(pretrained_model_name_or_path, **pop_hub_kwargs(kwargs))
        return super().from_pretrained(local, **kwargs)

    @classmethod
    def from_diffusers_pipeline(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], allow_pickle: bool = False, **scheduler_kwargs: Any
    ) -> MSGMPipeline:
        """Wrap a stock ``DDPMPipeline`` / ``ScoreSdeVePipeline`` (dir or repo id); ``scheduler_kwargs`` configure
        the :class:`ModeratedScoreScheduler` (e.g. ``predictor="ode"``)."""
        score_model = score_model_from_diffusers_pipeline(pretrained_model_name_or_path, allow_pickle=allow_pickle)
        return cls(score_model, ModeratedScoreScheduler.from_score_model(score_model, **scheduler_kwargs))

    def _check_sde_match(self) -> None:
        m, s = self.score_model.config, self.scheduler.config
        keys = ("sde_type", "beta_min", "beta_max") if m.sde_type != "ve" else ("sde_type", "sigma_min", "sigma_max")
        bad = [k for k in keys if (m[k] != s[k] if k == "sde_type" else abs(float(m[k]) - float(s[k])) > 1e-9)]
        if bad:
            raise ValueError(
                "`scheduler` and `score_model` describe different SDEs ("
                + ", ".join(f"{k}: {s[k]} vs {m[k]}" for k in bad)
                + "); build it with ModeratedScoreScheduler.from_score_model(score_model)"
            )

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """Map model space to [0, 1] (``centered_data``: [-1, 1] -> [0, 1]) and convert to ``output_type``."""
        if self.score_model.config.centered_data:
            sample = sample / 2 + 0.5
        sample = sample.clamp(0, 1)
        if output_type == "pt":
            return sample
        array = sample.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(array) if output_type == "pil" else array

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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` list has {len(generator)} entries but `batch_size` is {batch_size}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["sample"]
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {sorted(unknown)} not in {self._callback_tensor_inputs}")
        self._check_sde_match()

        shape = (batch_size, *self.score_model.sample_shape)
        device, dtype = self._execution_device, self.score_model.dtype
        if latents is None:
            sample = self.scheduler.sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        else:
            sample = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        saved_moderation = self.scheduler.moderation
        if moderation is not None:
            self.scheduler.moderation = moderation
        use_corrector = self.scheduler.config.corrector == "langevin"
        try:
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                t_batch = t.expand(batch_size)
                if use_corrector:
                    for _ in range(self.scheduler.config.n_corrector_steps):
                        score = self.score_model(sample, t_batch, **model_kwargs).score
                        sample = self.scheduler.step_correct(score, t, sample, generator=generator).prev_sample
                score = self.score_model(sample, t_batch, **model_kwargs).score
                sample = self.scheduler.step(score, t, sample, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    local_vars = {"sample": sample, "score": score}
                    callback_kwargs = {k: local_vars[k] for k in tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    sample = (callback_outputs or {}).get("sample", sample)
        finally:
            self.scheduler.moderation = saved_moderation

        image = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

