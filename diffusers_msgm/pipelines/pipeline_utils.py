"""Code shared by the MSGM pipelines: loading, call checks, the predictor-corrector update, image conversion.

``MSGMPipelineMixin`` goes before ``DiffusionPipeline`` in the bases (``class P(MSGMPipelineMixin,
DiffusionPipeline)``) of a pipeline whose modules are ``score_model`` ([`ScoreModel`]) and ``scheduler``
([`ModeratedScoreScheduler`]).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from PIL import Image

from ..hub import pop_hub_kwargs, resolve_pretrained_dir
from ..models.conversion import score_model_from_diffusers_pipeline
from ..models.file_checks import check_score_model_dir
from ..models.score_model import ScoreModel
from ..moderation import Moderation
from ..schedulers.scheduling_moderated_score import ModeratedScoreScheduler

OUTPUT_TYPES = ("pil", "np", "pt")

ImageInput = Union[Image.Image, Sequence[Image.Image], np.ndarray, torch.Tensor]
Generator = Union[torch.Generator, list[torch.Generator], None]


def _as_float_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise ValueError(f"`{name}` must be a float, bool or uint8 array, got dtype {array.dtype}")


def images_to_tensor(images: ImageInput, name: str = "image") -> torch.Tensor:
    """PIL image(s), a numpy array (``(H, W, C)`` / ``(N, H, W, C)``, floats in [0, 1] or uint8) or a tensor
    (``(C, H, W)`` / ``(N, C, H, W)`` in [0, 1], as ``output_type="pt"`` returns) -> float ``(N, C, H, W)`` in [0, 1].

    PIL images keep their mode ("L": 1 channel, "RGB": 3). Values outside [0, 1] raise a ``ValueError``.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"`{name}` is an empty list")
        if not all(isinstance(im, Image.Image) for im in images):
            raise ValueError(f"`{name}` as a list must hold PIL images only")
        if len({(im.size, im.mode) for im in images}) > 1:
            raise ValueError(f"the PIL images of `{name}` differ in size or mode: {sorted({(im.size, im.mode) for im in images})}")
        arrays = [np.asarray(im) for im in images]
        images = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"`{name}` as a numpy array must be (H, W, C) or (N, H, W, C), got shape {images.shape}")
        images = torch.from_numpy(_as_float_array(images if images.ndim == 4 else images[None], name)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim not in (3, 4):
            raise ValueError(f"`{name}` as a tensor must be (C, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
        images = (images if images.ndim == 4 else images[None]).float()
    else:
        raise ValueError(f"`{name}` must be a PIL image, a list of them, a numpy array or a tensor, got {type(images).__name__}")
    if images.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(images.shape)})")
    if not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"`{name}` values must lie in [0, 1] (PIL, uint8 or float images; tensors as `output_type='pt'` returns), "
            f"got [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
    return images.contiguous()


def to_model_space(images01: torch.Tensor, centered_data: bool) -> torch.Tensor:
    """[0, 1] -> the model's data space: [-1, 1] when ``centered_data`` else unchanged."""
    return images01 * 2 - 1 if centered_data else images01


class MSGMPipelineMixin:
    """Modules, loading, checks and the sampling update shared by ``MSGMPipeline`` and the downstream pipelines.

    Put it before ``DiffusionPipeline`` in the bases; the pipeline's modules are ``score_model`` and ``scheduler``.
    """

    model_cpu_offload_seq = "score_model"

    def __init__(self, score_model: ScoreModel, scheduler: ModeratedScoreScheduler):
        super().__init__()
        self.register_modules(score_model=score_model, scheduler=scheduler)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], allow_pickle: bool = False, **kwargs: Any
    ) -> DiffusionPipeline:
        """Load from a local directory or a Hub repo id (the snapshot is downloaded first, see diffusers#6563).

        The ``score_model/`` folder is checked first (``models/file_checks.py``): its config must have exactly the
        ScoreModel fields, its safetensors must be intact, and pickle-only (``.bin``) weights are refused unless
        ``allow_pickle=True`` (then loaded with ``torch.load(weights_only=True)``).
        """
        local = resolve_pretrained_dir(pretrained_model_name_or_path, **pop_hub_kwargs(kwargs))
        score_dir = os.path.join(local, "score_model")
        if os.path.isdir(score_dir) and "score_model" not in kwargs:
            check_score_model_dir(score_dir, allow_pickle=allow_pickle)
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        return super().from_pretrained(local, **kwargs)

    @classmethod
    def from_diffusers_pipeline(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], allow_pickle: bool = False, **scheduler_kwargs: Any
    ) -> DiffusionPipeline:
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

    def to_unit_range(self, sample: torch.Tensor) -> torch.Tensor:
        """Model space -> [0, 1] (``centered_data``: [-1, 1] -> [0, 1]), clamped."""
        if self.score_model.config.centered_data:
            sample = sample / 2 + 0.5
        return sample.clamp(0, 1)

    def convert_output(self, images01: torch.Tensor, output_type: str) -> Union[torch.Tensor, np.ndarray, list[Image.Image]]:
        """NCHW images in [0, 1] -> ``output_type`` (``"pt"`` as is, ``"np"`` NHWC float, ``"pil"``)."""
        if output_type == "pt":
            return images01
        array = images01.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(array) if output_type == "pil" else array

    def postprocess(self, sample: torch.Tensor, output_type: str) -> Union[torch.Tensor, np.ndarray, list[Image.Image]]:
        """Map model space to [0, 1] (``centered_data``: [-1, 1] -> [0, 1]) and convert to ``output_type``."""
        return self.convert_output(self.to_unit_range(sample), output_type)

    def image_input(self, image: ImageInput) -> torch.Tensor:
        """``image`` as an NCHW tensor in [0, 1], refused unless it matches the score model's sample shape."""
        x01 = images_to_tensor(image, name="image")
        if tuple(x01.shape[1:]) != tuple(self.score_model.sample_shape):
            raise ValueError(
                f"`image` has shape (C, H, W)={tuple(x01.shape[1:])} but the score model expects "
                f"{tuple(self.score_model.sample_shape)}"
            )
        return x01

    def check_call_inputs(
        self,
        output_type: str,
        batch_size: int,
        generator: Generator,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> list[str]:
        """Validate the arguments every pipeline call shares (and the SDE match); return the callback's tensor names."""
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
        return tensor_inputs

    @contextlib.contextmanager
    def moderation_scope(self, moderation: Moderation | None) -> Iterator[None]:
        """Use ``moderation`` (if given) as the scheduler's hook inside the block; restore the old hook after."""
        saved = self.scheduler.moderation
        if moderation is not None:
            self.scheduler.moderation = moderation
        try:
            yield
        finally:
            self.scheduler.moderation = saved

    def pc_update(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        generator: Generator,
        model_kwargs: dict[str, Any],
        constrain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's corrector steps (if any) then one predictor step at ``t``; returns ``(sample, score)``.

        ``constrain(sample, t)``, if given, is applied before every score evaluation (inpainting's data replacement).
        """
        t_batch = t.expand(sample.shape[0])
        if self.scheduler.config.corrector == "langevin":
            for _ in range(self.scheduler.config.n_corrector_steps):
                if constrain is not None:
                    sample = constrain(sample, t)
                score = self.score_model(sample, t_batch, **model_kwargs).score
                sample = self.scheduler.step_correct(score, t, sample, generator=generator).prev_sample
        if constrain is not None:
            sample = constrain(sample, t)
        score = self.score_model(sample, t_batch, **model_kwargs).score
        sample = self.scheduler.step(score, t, sample, generator=generator).prev_sample
        return sample, score

    def run_step_callback(
        self, callback: Any, i: int, t: torch.Tensor, tensor_inputs: list[str], local_vars: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Call ``callback(pipe, i, t, {name: tensor})`` and return its ``"sample"`` (or the current one)."""
        outputs = callback(self, i, t, {k: local_vars[k] for k in tensor_inputs})
        return (outputs or {}).get("sample", local_vars["sample"])
