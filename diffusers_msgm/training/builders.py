"""Models and objectives the training scripts build from their flags."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..losses import DDPMMSGMLoss, MSGMLoss
from ..models.score_model import ScoreModel
from ..pipelines.pipeline_msgm import MSGMPipeline
from ..schedulers.scheduling_moderated_score import ModeratedScoreScheduler


def unet_config(args: argparse.Namespace, resolution: int, channels: int) -> dict:
    """A ``UNet2DModel`` config from ``--block_out_channels``, ``--layers_per_block``, ``--attention``."""
    blocks = list(args.block_out_channels)
    levels = len(blocks)
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"--resolution {resolution} must be divisible by 2^{levels - 1} for {levels} UNet levels "
                         f"(--block_out_channels {blocks})")
    groups = min(32, math.gcd(*blocks))
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if args.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    config = dict(sample_size=resolution, in_channels=channels, out_channels=channels,
                  layers_per_block=args.layers_per_block, block_out_channels=tuple(blocks),
                  down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups)
    if args.sde == "ve":
        config["time_embedding_type"] = "fourier"  # sigma(t) spans decades: embed log(sigma), as NCSN++ does
    return config


def new_score_model(args: argparse.Namespace, resolution: int, channels: int) -> ScoreModel:
    """A freshly initialised ScoreModel for ``--sde`` (VE: score output; VP/sub-VP: epsilon unless told)."""
    prediction = args.prediction_type or ("score" if args.sde == "ve" else "epsilon")
    unet = UNet2DModel(**unet_config(args, resolution, channels))
    return ScoreModel.from_unet(
        unet, sde_type=args.sde, prediction_type=prediction, beta_min=args.beta_min, beta_max=args.beta_max,
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, num_train_timesteps=args.num_train_timesteps,
    )


def ddpm_scheduler_for(model: ScoreModel) -> DDPMScheduler:
    """The discrete DDPM schedule whose continuum is the model's VP SDE (beta_start = beta_min / N, ...)."""
    cfg = model.config
    if cfg.sde_type != "vp" or cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError("--discrete_ddpm needs a VP score model predicting epsilon or v, got "
                         f"sde_type={cfg.sde_type!r}, prediction_type={cfg.prediction_type!r}")
    n = cfg.num_train_timesteps
    return DDPMScheduler(num_train_timesteps=n, beta_start=cfg.beta_min / n, beta_end=cfg.beta_max / n,
                         beta_schedule="linear", prediction_type=cfg.prediction_type)


def rewrap(model: ScoreModel, unet: torch.nn.Module) -> ScoreModel:
    """A ScoreModel with ``model``'s SDE fields around ``unet`` (used after discrete-DDPM training)."""
    cfg = model.config
    fields = {k: cfg[k] for k in ("beta_min", "beta_max", "sigma_min", "sigma_max", "num_train_timesteps",
                                  "centered_data")}
    return ScoreModel.from_unet(unet, sde_type=cfg.sde_type, prediction_type=cfg.prediction_type, **fields)


def trainable_module_and_loss(model: ScoreModel, args: argparse.Namespace, variant: str = "orthogonal",
                              forget_weight: float = 0.0, forget_every: int = 1,
                              ) -> tuple[torch.nn.Module, MSGMLoss, Callable[[torch.nn.Module], MSGMPipeline]]:
    """``(module to optimise, loss object, module -> MSGMPipeline)``.

    Continuous time: the ScoreModel with ``MSGMLoss``. ``--discrete_ddpm``: its UNet with ``DDPMMSGMLoss`` (the
    module handed to accelerate must be the one whose forward is called, for DDP's gradient hooks).
    """
    if getattr(args, "discrete_ddpm", False):
        loss = DDPMMSGMLoss(ddpm_scheduler_for(model), variant, forget_weight, forget_every)
        return model.unet, loss, lambda unet: make_pipeline(rewrap(model, unet))
    loss = MSGMLoss(model.sde, variant, forget_weight, forget_every, eps=args.sampling_eps)
    return model, loss, make_pipeline


def make_pipeline(model: ScoreModel, **scheduler_kwargs) -> MSGMPipeline:
    return MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model, **scheduler_kwargs))


def check_resolution(model: ScoreModel, args: argparse.Namespace) -> tuple[int, int]:
    """The model's (resolution, channels), refusing flags that contradict them."""
    channels, height, width = model.sample_shape
    if height != width:
        raise ValueError(f"only square models are supported, got sample_size {(height, width)}")
    if args.resolution is not None and args.resolution != height:
        raise ValueError(f"--resolution {args.resolution} does not match the model's sample_size {height}")
    if args.channels is not None and args.channels != channels:
        raise ValueError(f"--channels {args.channels} does not match the model's in_channels {channels}")
    return height, channels


def scratch_shape(args: argparse.Namespace, default_resolution: int = 16) -> tuple[int, int]:
    return args.resolution or default_resolution, args.channels or 1


def describe(model: ScoreModel) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{model.config.sde_type} score model, {model.config.prediction_type}, {n / 1e6:.2f}M params"

