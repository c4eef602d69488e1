"""``ScoreModel``: a diffusers UNet seen as the score s(x, t) = grad_x log p_t(x) of a continuous-time SDE."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Union

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..sde import SDE, SDE_TYPES, get_sde

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _unpickling_error(err: BaseException) -> str | None:
    """The last ``pickle.UnpicklingError`` message in ``err``'s chain (diffusers re-raises it as an OSError)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, pickle.UnpicklingError):
            found = str(err).strip().splitlines()[0]
        err = err.__cause__ or err.__context__
    return found


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


@dataclass
class ScoreModelOutput(BaseOutput):
    """Output of :class:`ScoreModel`.

    Args:
        score (`torch.Tensor` of shape `(batch, channels, height, width)`): the model's estimate of
            grad_x log p_t(x) at the given sample and time.
    """

    score: torch.Tensor


class ScoreModel(ModelMixin, ConfigMixin):
    r"""Wraps a diffusers UNet so that ``model(x, t).score`` is the score of the SDE marginal p_t at continuous t.

    Conversions from the UNet output ``out`` with ``x_t = alpha_t x_0 + sigma_t eps`` (``marginal_coefficients``):

    * ``epsilon``:      s = -out / sigma_t
    * ``v_prediction``: eps = (sigma_t x + alpha_t v) / (alpha_t^2 + sigma_t^2), then s = -eps / sigma_t
    * ``sample``:       eps = (x - alpha_t out) / sigma_t, then s = -eps / sigma_t
    * ``score``:        s = out (NCSN++ / ``ScoreSdeVePipeline`` weights)

    The UNet's time input is ``t * (num_train_timesteps - 1)`` for the VP and sub-VP SDEs (score_sde's convention
    for DDPM checkpoints) and ``sigma(t)`` for the VE SDE (the convention of diffusers' ``ScoreSdeVePipeline``).
    A UNet with ``out_channels == 2 * in_channels`` (learned variance) is used through its first half.

    Args:
        unet_config (`dict`): config of the wrapped UNet (as in its ``config.json``).
        unet_class (`str`): ``"UNet2DModel"`` or ``"UNet2DConditionModel"``.
        sde_type (`str`): ``"vp"``, ``"subvp"`` or ``"ve"``.
        beta_min, beta_max (`float`): VP / sub-VP parameters.
        sigma_min, sigma_max (`float`): VE parameters.
        prediction_type (`str`): what the UNet predicts, one of ``PREDICTION_TYPES``.
        num_train_timesteps (`int`): number of discrete steps the UNet's time labels were trained on.
        centered_data (`bool`): data lives in [-1, 1] (DDPM) if True, in [0, 1] (score_sde VE) if False.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        unet_class: str = "UNet2DModel",
        sde_type: str = "vp",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        centered_data: bool = True,
    ):
        super().__init__()
        if sde_type not in SDE_TYPES:
            raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {sde_type!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if unet_class not in UNET_CLASSES:
            raise ValueError(f"`unet_class` must be one of {UNET_CLASSES}, got {unet_class!r}")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be an int >= 2, got {num_train_timesteps!r}")
        in_ch, out_ch = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
        if out_ch not in (in_ch, 2 * in_ch):
            raise ValueError(
                f"`unet_config` has in_channels={in_ch} and out_channels={out_ch}; a score model needs "
                "out_channels == in_channels (or 2 * in_channels for learned-variance DDPMs)"
            )
        unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        self.unet = getattr(diffusers, unet_class).from_config(unet_config)
        self._sde = get_sde(sde_type, beta_min=beta_min, beta_max=beta_max, sigma_min=sigma_min, sigma_max=sigma_max)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(
        cls,
        unet: Union[diffusers.UNet2DModel, diffusers.UNet2DConditionModel],
        sde_type: str = "vp",
        prediction_type: str = "epsilon",
        **config: Any,
    ) -> ScoreModel:
        """Wrap an existing UNet (its weights are shared, not copied)."""
        if type(unet).__name__ not in UNET_CLASSES:
            raise ValueError(f"`unet` must be one of {UNET_CLASSES}, got {type(unet).__name__}")
        with init_empty_weights():
            model = cls(
                unet_config={k: v for k, v in unet.config.items() if not k.startswith("_")},
                unet_class=type(unet).__name__,
                sde_type=sde_type,
                prediction_type=prediction_type,
                **config,
            )
        model.unet = unet
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> ScoreModel:
        """``ModelMixin.from_pretrained`` that refuses weight files with missing or unexpected tensors (diffusers
        would leave missing ones randomly initialised). ``output_loading_info=True`` is honoured."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except ValueError as err:
            if "expected shape" not in str(err):
                raise
            raise ValueError(f"the weights in {os.fspath(pretrained_model_name_or_path)} do not fit the architecture "
                             f"in its config.json: {err}") from err
        except OSError as err:
            refusal = _unpickling_error(err)
            if refusal is None:
                raise
            raise ValueError(f"the pickle weights in {os.fspath(pretrained_model_name_or_path)} were refused by "
                             f"torch.load(weights_only=True), they hold more than tensors: {refusal}") from err
        missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
        if missing or unexpected:
            raise ValueError(
                f"the weights in {os.fspath(pretrained_model_name_or_path)} do not match the ScoreModel config: "
                f"missing tensors {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}, unexpected tensors "
                f"{sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ properties
    @property
    def sde(self) -> SDE:
        """The forward SDE this score belongs to."""
        return self._sde

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the samples the UNet was built for."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    @property
    def is_conditional(self) -> bool:
        """Whether the wrapped UNet is a ``UNet2DConditionModel`` (takes ``encoder_hidden_states``)."""
        return self.config.unet_class == "UNet2DConditionModel"

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's time label for continuous ``t``: sigma(t) (VE) or t * (N - 1) (VP, sub-VP)."""
        if self.config.sde_type == "ve":
            return self._sde.marginal_coefficients(t)[1]
        return t * (self.config.num_train_timesteps - 1)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, sample: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"`sample` must be a torch.Tensor, got {type(sample).__name__}")
        if sample.ndim != 4:
            raise ValueError(f"`sample` must have shape (batch, channels, height, width), got {tuple(sample.shape)}")
        if sample.shape[1] != self.unet.config.in_channels:
            raise ValueError(
                f"`sample` has {sample.shape[1]} channels but the UNet expects {self.unet.config.in_channels}"
            )
        model_device, model_dtype = self.device, self.dtype
        if model_device.type != "meta" and sample.device != model_device:  # meta: offloaded, the hooks move weights
            raise ValueError(f"`sample` is on {sample.device} but the score model is on {model_device}; "
                             "move one of them (`sample.to(model.device)`)")
        if not sample.is_floating_point() or (sample.dtype != model_dtype and not _autocast_on(sample.device)):
            raise TypeError(f"`sample` has dtype {sample.dtype} but the score model's weights are {model_dtype}; "
                            "cast it with `sample.to(model.dtype)`")
        t = torch.as_tensor(t, device=sample.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        if t.ndim != 1 or t.shape[0] != sample.shape[0]:
            raise ValueError(f"`t` must be a float or have shape (batch,)=({sample.shape[0]},), got {tuple(t.shape)}")
        t_bad, sample_bad = torch.stack([(~torch.isfinite(t) | (t <= 0) | (t > self._sde.T)).any(),
                                         ~torch.isfinite(sample).all()]).tolist()  # one device sync for both
        if t_bad:
            raise ValueError(f"`t` must lie in (0, {self._sde.T}], got values in [{t.min():.3g}, {t.max():.3g}]")
        if sample_bad:
            raise ValueError("`sample` has non-finite values (NaN or Inf)")
        return t

    def forward(
        self, sample: torch.Tensor, t: Union[float, torch.Tensor], return_dict: bool = True, **cond: Any
    ) -> Union[ScoreModelOutput, tuple[torch.Tensor]]:
        """Score at ``(sample, t)``; ``cond`` (e.g. ``encoder_hidden_states``, ``class_labels``) goes to the UNet."""
        t = self._check_inputs(sample, t)
        out = self.unet(sample, self.time_input(t).to(sample.dtype), return_dict=False, **cond)[0]
        if self.config.prediction_type == "score":
            score = out[:, : sample.shape[1]]
        else:
            sigma = self._sde.marginal_coefficients(t)[1].to(sample.dtype).view(-1, 1, 1, 1)
            score = -self.epsilon_from_output(sample, t, out) / sigma
        return ScoreModelOutput(score=score) if return_dict else (score,)

    def epsilon_from_output(self, sample: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps_hat = -sigma_t s(x_t, t) from the UNet's raw output ``out`` for this model's ``prediction_type``
        (v: eps = (sigma x + alpha v) / (alpha^2 + sigma^2); sample: eps = (x - alpha x0) / sigma). No input checks,
        so it can run under ``torch.func.vmap``; a learned-variance output keeps its mean half."""
        alpha, sigma = (c.to(sample.dtype).view(-1, 1, 1, 1) for c in self._sde.marginal_coefficients(t))
        out = out[:, : sample.shape[1]]
        kind = self.config.prediction_type
        if kind == "epsilon":
            return out
        if kind == "v_prediction":
            return (sigma * sample + alpha * out) / (alpha**2 + sigma**2)
        if kind == "sample":
            return (sample - alpha * out) / sigma
        return -sigma * out  # "score"
