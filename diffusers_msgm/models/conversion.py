"""Build a :class:`ScoreModel` from a stock diffusers ``DDPMPipeline`` / ``DDIMPipeline`` / ``ScoreSdeVePipeline``.

A DDPM trained with a linear schedule ``beta_i = beta_start + i (beta_end - beta_start) / (N - 1)`` is the
discretisation of the VP SDE with ``beta_min = N beta_start`` and ``beta_max = N beta_end`` evaluated at the time
labels ``t (N - 1)`` (Song et al. 2021, appendix B). Other schedules have no VP-SDE counterpart and are refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from diffusers import UNet2DConditionModel, UNet2DModel

from ..hub import resolve_pretrained_dir
from .file_checks import check_weights_dir
from .score_model import ScoreModel

DDPM_LIKE_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler", "PNDMScheduler")
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)


def score_model_config_from_scheduler(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """``ScoreModel`` config fields (sde, schedule, prediction type) implied by a diffusers scheduler config."""
    cls = scheduler_config.get("_class_name")
    if cls in VE_SCHEDULERS:
        return {
            "sde_type": "ve",
            "sigma_min": float(scheduler_config.get("sigma_min", 0.01)),
            "sigma_max": float(scheduler_config.get("sigma_max", 1348.0)),
            "prediction_type": "score",
            "num_train_timesteps": int(scheduler_config.get("num_train_timesteps", 2000)),
            "centered_data": False,
        }
    if cls in DDPM_LIKE_SCHEDULERS:
        schedule = scheduler_config.get("beta_schedule", "linear")
        if schedule != "linear" or scheduler_config.get("trained_betas") is not None:
            raise ValueError(
                f"scheduler `beta_schedule` is {schedule!r}; only a linear schedule maps onto the VP SDE "
                "(beta_min = N * beta_start, beta_max = N * beta_end)"
            )
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler `prediction_type` {prediction!r} is not supported")
        return {
            "sde_type": "vp",
            "beta_min": float(scheduler_config.get("beta_start", 1e-4)) * n,
            "beta_max": float(scheduler_config.get("beta_end", 0.02)) * n,
            "prediction_type": prediction,
            "num_train_timesteps": n,
            "centered_data": True,
        }
    raise ValueError(
        f"scheduler class {cls!r} is not supported; expected one of {DDPM_LIKE_SCHEDULERS + VE_SCHEDULERS}"
    )


def score_model_from_diffusers_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    unet_subfolder: str = "unet",
    scheduler_subfolder: str = "scheduler",
    allow_pickle: bool = False,
    **hub_kwargs: Any,
) -> ScoreModel:
    """Load the UNet and scheduler config of a stock diffusers pipeline (local dir or Hub repo id) as a ScoreModel.

    Weights are read from safetensors; ``allow_pickle=True`` also accepts ``.bin`` files (loaded by diffusers with
    ``torch.load(weights_only=True)``).
    """
    local = resolve_pretrained_dir(
        pretrained_model_name_or_path,
        allow_patterns=["model_index.json", f"{unet_subfolder}/*", f"{scheduler_subfolder}/*"],
        **hub_kwargs,
    )
    scheduler_path = os.path.join(local, scheduler_subfolder, "scheduler_config.json")
    unet_dir = os.path.join(local, unet_subfolder)
    if not os.path.isfile(scheduler_path) or not os.path.isdir(unet_dir):
        raise ValueError(
            f"`pretrained_model_name_or_path` {os.fspath(pretrained_model_name_or_path)!r} is not a diffusers "
            f"pipeline: expected {unet_subfolder}/ and {scheduler_subfolder}/scheduler_config.json"
        )
    with open(scheduler_path) as f:
        fields = score_model_config_from_scheduler(json.load(f))
    with open(os.path.join(unet_dir, "config.json")) as f:
        unet_cls = UNet2DConditionModel if json.load(f).get("_class_name") == "UNet2DConditionModel" else UNet2DModel
    check_weights_dir(unet_dir, allow_pickle=allow_pickle)
    unet = unet_cls.from_pretrained(unet_dir, use_safetensors=None if allow_pickle else True)
    sde_type, prediction = fields.pop("sde_type"), fields.pop("prediction_type")
    return ScoreModel.from_unet(unet, sde_type=sde_type, prediction_type=prediction, **fields)
