"""``MSGMInpaintPipeline``: predictor-corrector inpainting with a (moderated) score model.

Song et al. 2021, appendix I.2 ("imputation"): the known pixels Omega are not sampled but replaced, before every
score evaluation at time t, by a fresh draw of the forward kernel, x_t(Omega) = alpha_t y(Omega) + sigma_t z
(``scheduler.add_noise``); the unknown pixels follow the reverse SDE (eq. 6) / probability flow (eq. 13) with the
scheduler's corrector and predictor. The output keeps the known pixels exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..moderation import Moderation
from .pipeline_utils import Generator, ImageInput, MSGMPipelineMixin, images_to_tensor, to_model_space

#: mask values >= MASK_THRESHOLD are "known" (kept), the others are inpainted.
MASK_THRESHOLD = 0.5


def prepare_mask(mask_image: ImageInput, image: torch.Tensor) -> torch.Tensor:
    """Mask as PIL / numpy / tensor in [0, 1] -> float ``(N or 1, C or 1, H, W)`` of exactly 0 and 1.

    numpy masks are ``(H, W)``, ``(H, W, C)`` or ``(N, H, W, C)``; tensors ``(H, W)``, ``(C, H, W)`` or
    ``(N, C, H, W)``; PIL masks are read as grayscale. Values >= 0.5 become 1 (keep), the others 0 (inpaint).
    """
    if isinstance(mask_image, Image.Image):
        mask_image = mask_image.convert("L")
    elif isinstance(mask_image, (list, tuple)):
        mask_image = [m.convert("L") if isinstance(m, Image.Image) else m for m in mask_image]
    elif getattr(mask_image, "ndim", None) == 2:  # (H, W) array or tensor
        mask_image = mask_image[..., None] if not isinstance(mask_image, torch.Tensor) else mask_image[None]
    mask = images_to_tensor(mask_image, name="mask_image")
    n, c, h, w = image.shape
    if tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"`mask_image` has size {tuple(mask.shape[-2:])} (H, W) but `image` has {(h, w)}")
    if mask.shape[1] not in (1, c):
        raise ValueError(f"`mask_image` has {mask.shape[1]} channels; expected 1 or the image's {c}")
    if mask.shape[0] not in (1, n):
        raise ValueError(f"`mask_image` holds {mask.shape[0]} masks; expected 1 or one per image ({n})")
    return (mask >= MASK_THRESHOLD).to(image.dtype)


class MSGMInpaintPipeline(MSGMPipelineMixin, DiffusionPipeline):
    r"""Fill in the unknown region of images with a (moderated) score-based model (Song et al. 2021, app. I.2).

    Mask convention: **1 = known, kept** and 0 = inpainted (score_sde's convention; the opposite of diffusers'
    ``StableDiffusionInpaintPipeline``, where white is repainted). Masks are thresholded at 0.5.

    Args:
        score_model ([`ScoreModel`]): the score network.
        scheduler ([`ModeratedScoreScheduler`]): sampler for the score model's SDE (any predictor / corrector).
    """

    _callback_tensor_inputs = ["sample", "score"]

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        mask_image: ImageInput,
        num_inference_steps: int = 1000,
        num_images_per_image: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        moderation: Moderation | None = None,
        callback_on_step_end: Union[Callable[[Any, int, float, dict], dict], PipelineCallback, MultiPipelineCallbacks] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **model_kwargs: Any,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""Inpaint ``image`` where ``mask_image`` is 0.

        Args:
            image: PIL image(s), numpy ``(H, W, C)`` / ``(N, H, W, C)`` (float in [0, 1] or uint8) or a tensor
                ``(C, H, W)`` / ``(N, C, H, W)`` in [0, 1] (what ``output_type="pt"`` returns); its shape must be
                the score model's ``sample_shape``.
            mask_image: same formats (PIL read as grayscale; 2-D arrays allowed), values in [0, 1]; **>= 0.5 means
                known (kept)**, < 0.5 means inpainted. One channel or one per image channel; one mask or one per
                image.
            num_inference_steps (`int`): number of predictor steps, as in [`MSGMPipeline`].
            num_images_per_image (`int`): samples drawn per input image (the batch is
                ``len(image) * num_images_per_image``, images repeated consecutively).
            generator (`torch.Generator` or list of them, *optional*): makes sampling deterministic.
            output_type (`str`): ``"pil"``, ``"np"`` (NHWC float in [0, 1]) or ``"pt"`` (NCHW in [0, 1]).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a tuple.
            moderation (*optional*): ``(score, sample, t) -> score`` for this call (overrides the scheduler's hook).
            callback_on_step_end (*optional*): ``callback(pipe, i, t, callback_kwargs)`` after every step, with the
                tensors in ``callback_on_step_end_tensor_inputs`` (``"sample"``, ``"score"``); may return a dict
                whose ``"sample"`` replaces the current sample.
            model_kwargs: passed to the score model (e.g. ``class_labels``).
        """
        if not isinstance(num_images_per_image, int) or num_images_per_image < 1:
            raise ValueError(f"`num_images_per_image` must be a positive int, got {num_images_per_image!r}")
        known01 = self.image_input(image)
        mask = prepare_mask(mask_image, known01).expand_as(known01)
        batch_size = known01.shape[0] * num_images_per_image
        tensor_inputs = self.check_call_inputs(
            output_type, batch_size, generator, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        device, dtype = self._execution_device, self.score_model.dtype
        known01 = known01.repeat_interleave(num_images_per_image, 0).to(device=device, dtype=dtype)
        keep = mask.repeat_interleave(num_images_per_image, 0).to(device=device) > 0
        known = to_model_space(known01, self.score_model.config.centered_data)
        sample = self.scheduler.sde.prior_sampling(known.shape, generator=generator, device=device, dtype=dtype)

        def replace_known(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            noise = randn_tensor(x.shape, generator=generator, device=device, dtype=dtype)
            return torch.where(keep, self.scheduler.add_noise(known, noise, t), x)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.moderation_scope(moderation):
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                sample, score = self.pc_update(sample, t, generator, model_kwargs, constrain=replace_known)
                if callback_on_step_end is not None:
                    local_vars = {"sample": sample, "score": score}
                    sample = self.run_step_callback(callback_on_step_end, i, t, tensor_inputs, local_vars)

        images01 = torch.where(keep, known01, self.to_unit_range(sample))  # known pixels exactly as given
        images = self.convert_output(images01, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
