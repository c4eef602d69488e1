"""Shared fixtures: tiny UNets and an analytic Gaussian "UNet" whose prediction is exact."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffusers_msgm import ScoreModel


def tiny_unet(sample_size: int = 8, channels: int = 1, seed: int = 0, **kwargs) -> UNet2DModel:
    """A UNet2DModel of a few thousand parameters."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    config.update(kwargs)
    return UNet2DModel(**config)


class AnalyticGaussianUNet(torch.nn.Module):
    """Exact predictor for data x0 ~ N(mu, s0^2 I): x_t ~ N(alpha mu, (alpha^2 s0^2 + sigma^2) I).

    It receives the UNet time label of the wrapping ScoreModel and returns what the ScoreModel's
    ``prediction_type`` expects, so the wrapper's conversions are tested against the closed-form score.
    """

    def __init__(self, score_model: ScoreModel, mu: float, s0: float):
        super().__init__()
        self.sm, self.mu, self.s0 = score_model, mu, s0
        self.config = score_model.unet.config
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def coefficients(self, time_label: torch.Tensor):
        cfg = self.sm.config
        if cfg.sde_type == "ve":
            sigma = time_label
            alpha = torch.ones_like(sigma)
        else:
            t = time_label / (cfg.num_train_timesteps - 1)
            alpha, sigma = self.sm.sde.marginal_coefficients(t)
        return alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)

    def forward(self, sample, timestep, return_dict=False, **_):
        alpha, sigma = self.coefficients(timestep)
        var = alpha**2 * self.s0**2 + sigma**2
        score = -(sample - alpha * self.mu) / var
        eps = -sigma * score
        x0 = (sample - sigma * eps) / alpha
        kind = self.sm.config.prediction_type
        out = {"epsilon": eps, "score": score, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[kind]
        return (out,)


def analytic_score_model(sde_type="vp", prediction_type="epsilon", mu=0.5, s0=0.3, sample_size=4) -> ScoreModel:
    model = ScoreModel.from_unet(tiny_unet(sample_size), sde_type=sde_type, prediction_type=prediction_type)
    model.unet = AnalyticGaussianUNet(model, mu, s0)
    return model


def gaussian_score(sde, mu, s0):
    """Closed-form score of p_t for data N(mu, s0^2) under ``sde`` (any tensor shape)."""

    def score_fn(x, t):
        alpha, sigma = sde.marginal_coefficients(t.view(-1, *([1] * (x.ndim - 1))))
        return -(x - alpha * mu) / (alpha**2 * s0**2 + sigma**2)

    return score_fn
