import json
import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel
from helpers import AnalyticGaussianUNet, analytic_score_model, tiny_unet

from diffusers_msgm import ScoreModel, score_model_from_diffusers_pipeline

CASES = [("vp", "epsilon"), ("vp", "v_prediction"), ("vp", "sample"), ("subvp", "epsilon"),
         ("subvp", "v_prediction"), ("ve", "score"), ("ve", "epsilon")]


@pytest.mark.parametrize("sde_type,prediction_type", CASES)
def test_wrapper_gives_the_analytic_gaussian_score(sde_type, prediction_type):
    mu, s0 = 0.5, 0.3
    model = analytic_score_model(sde_type, prediction_type, mu=mu, s0=s0)
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.8, 1.0])
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in model.sde.marginal_coefficients(t))
    expected = -(x - alpha * mu) / (alpha**2 * s0**2 + sigma**2)
    torch.testing.assert_close(model(x, t).score, expected, rtol=2e-4, atol=1e-5)


def test_time_labels_follow_the_checkpoint_conventions():
    vp = ScoreModel.from_unet(tiny_unet(), sde_type="vp", num_train_timesteps=1000)
    t = torch.tensor([0.001, 0.5, 1.0])
    torch.testing.assert_close(vp.time_input(t), t * 999)
    ve = ScoreModel.from_unet(tiny_unet(), sde_type="ve", prediction_type="score", sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(ve.time_input(t), 0.01 * 5000.0**t)


def test_epsilon_conversion_on_a_real_unet():
    unet = tiny_unet()
    model = ScoreModel.from_unet(unet)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    _, sigma = model.sde.marginal_coefficients(t)
    expected = -unet(x, t * 999).sample / sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model(x, t).score, expected)
    assert model.unet is unet  # weights shared, not copied


def test_learned_variance_unet_uses_first_half():
    unet = tiny_unet(out_channels=2)
    model = ScoreModel.from_unet(unet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6])
    _, sigma = model.sde.marginal_coefficients(t)
    torch.testing.assert_close(model(x, t).score, -unet(x, t * 999).sample[:, :1] / sigma.view(-1, 1, 1, 1))


def test_save_load_round_trip(tmp_path):
    model = ScoreModel.from_unet(tiny_unet(seed=3), sde_type="subvp", beta_max=15.0)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = ScoreModel.from_pretrained(tmp_path)
    assert loaded.config.sde_type == "subvp" and loaded.config.beta_max == 15.0
    assert loaded.config.unet_config["block_out_channels"] == [8, 16]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.7])
    torch.testing.assert_close(loaded(x, t).score, model(x, t).score)


def _save_stock_ddpm(path, **scheduler_kwargs):
    DDPMPipeline(unet=tiny_unet(seed=1), scheduler=DDPMScheduler(**scheduler_kwargs)).save_pretrained(path)


def test_from_stock_ddpm_pipeline(tmp_path):
    _save_stock_ddpm(tmp_path, beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    model = score_model_from_diffusers_pipeline(tmp_path)
    assert (model.config.sde_type, model.config.prediction_type) == ("vp", "epsilon")
    assert model.config.beta_min == pytest.approx(0.1) and model.config.beta_max == pytest.approx(20.0)
    unet = UNet2DModel.from_pretrained(tmp_path / "unet")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.25, 0.75])
    _, sigma = model.sde.marginal_coefficients(t)
    torch.testing.assert_close(model(x, t).score, -unet(x, t * 999).sample / sigma.view(-1, 1, 1, 1))
    # the continuous VP marginal matches the discrete DDPM one at the time labels, up to the Riemann-sum gap
    abar = DDPMScheduler(beta_start=1e-4, beta_end=0.02).alphas_cumprod
    alpha, _ = model.sde.marginal_coefficients(torch.tensor([500 / 999]))
    assert alpha.item() ** 2 == pytest.approx(abar[500].item(), rel=2e-2)  # O(1/N) discretisation gap


def test_from_stock_pipeline_v_prediction_and_repo_id(tmp_path, monkeypatch):
    _save_stock_ddpm(tmp_path / "snap", prediction_type="v_prediction")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr("diffusers_msgm.hub.snapshot_download", fake_snapshot_download)
    model = score_model_from_diffusers_pipeline("google/ddpm-fake-32")
    assert calls and calls[0][0] == "google/ddpm-fake-32" and "unet/*" in calls[0][1]
    assert model.config.prediction_type == "v_prediction"


def test_refuses_non_linear_schedule(tmp_path):
    _save_stock_ddpm(tmp_path, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="beta_schedule"):
        score_model_from_diffusers_pipeline(tmp_path)


def test_from_stock_score_sde_ve_pipeline(tmp_path):
    ScoreSdeVePipeline(unet=tiny_unet(), scheduler=ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=90.0)).save_pretrained(
        tmp_path
    )
    model = score_model_from_diffusers_pipeline(tmp_path)
    assert (model.config.sde_type, model.config.prediction_type) == ("ve", "score")
    assert model.config.sigma_max == 90.0 and model.config.centered_data is False


def test_refuses_pickle_only_weights_unless_allowed(tmp_path):
    _save_stock_ddpm(tmp_path)
    unet_dir = tmp_path / "unet"
    from safetensors.torch import load_file

    state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    os.remove(unet_dir / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="only pickle weights"):
        score_model_from_diffusers_pipeline(tmp_path)
    assert score_model_from_diffusers_pipeline(tmp_path, allow_pickle=True).config.sde_type == "vp"


def test_not_a_pipeline_dir(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        score_model_from_diffusers_pipeline(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"sde_type": "cosine"}, "sde_type"), ({"prediction_type": "x0"}, "prediction_type"),
     ({"unet_class": "Transformer2DModel"}, "unet_class"), ({"num_train_timesteps": 1}, "num_train_timesteps")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoreModel(unet_config=dict(tiny_unet().config), **kwargs)


def test_bad_forward_inputs():
    model = ScoreModel.from_unet(tiny_unet())
    x = torch.randn(2, 1, 8, 8)
    for t in (0.0, 1.5, torch.tensor([0.5, -0.1])):
        with pytest.raises(ValueError, match=r"`t` must lie in \(0, 1.0\]"):
            model(x, t)
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="out_channels"):
        ScoreModel.from_unet(tiny_unet(out_channels=3))


def test_analytic_unet_helper_is_exact_for_ve_sigma():
    model = analytic_score_model("ve", "score")
    assert isinstance(model.unet, AnalyticGaussianUNet)
    x = torch.zeros(1, 1, 4, 4)
    # at x = alpha * mu the score vanishes
    torch.testing.assert_close(model(x + 0.5, 0.5).score, torch.zeros_like(x), atol=1e-6, rtol=0)
