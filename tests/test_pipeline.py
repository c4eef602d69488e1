import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from helpers import analytic_score_model, tiny_unet
from PIL import Image

from diffusers_msgm import DirectionModeration, ModeratedScoreScheduler, MSGMPipeline, ScoreModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pipe(**scheduler_kwargs):
    model = ScoreModel.from_unet(tiny_unet(seed=7))
    return MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model, **scheduler_kwargs))


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_output_types_and_determinism():
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    pil = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "L"
    a = run(pipe)
    assert a.shape == (2, 8, 8, 1) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, run(pipe))
    assert not np.array_equal(a, run(pipe, seed=1))
    pt = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert isinstance(pt, ImagePipelineOutput) and pt.images.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(pt.images.permute(0, 2, 3, 1).numpy(), a, atol=1e-6)
    (tup,) = pipe(batch_size=1, num_inference_steps=2, output_type="np", return_dict=False)
    assert tup.shape == (1, 8, 8, 1)


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    pipe = make_pipe(corrector="langevin")
    pipe.save_pretrained(tmp_path)
    index = (tmp_path / "model_index.json").read_text()
    assert '"diffusers_msgm.models.score_model"' in index and '"diffusers_msgm.schedulers.scheduling_moderated_score"' in index
    assert (tmp_path / "score_model" / "diffusion_pytorch_model.safetensors").exists()
    loaded = MSGMPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler.config.corrector == "langevin"
    np.testing.assert_array_equal(run(pipe), run(loaded))


def test_from_pretrained_repo_id_downloads_then_loads_locally(tmp_path, monkeypatch):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("diffusers_msgm.hub.snapshot_download", fake_snapshot_download)
    loaded = MSGMPipeline.from_pretrained("someone/msgm-digits", revision="main")
    assert calls == [("someone/msgm-digits", {"revision": "main"})]
    np.testing.assert_array_equal(run(pipe), run(loaded))


def test_community_pipeline_entry_file_loads_the_same_class(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    entry = os.path.join(REPO_ROOT, "pipelines", "msgm_pipeline.py")
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=entry, trust_remote_code=True)
    assert type(loaded).__name__ == "MSGMPipeline"
    np.testing.assert_array_equal(run(pipe), run(loaded))


def test_callback_on_step_end_sees_and_replaces_the_sample():
    pipe = make_pipe()
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t), kwargs["sample"].shape, kwargs["score"].shape))
        return {"sample": torch.zeros_like(kwargs["sample"])} if i == 2 else {}

    images = run(pipe, num_inference_steps=3, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["sample", "score"])
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == 1.0 and seen[0][2] == (2, 1, 8, 8)
    np.testing.assert_allclose(images, 0.5)  # zero in [-1, 1] maps to 0.5
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])


def test_call_level_moderation_is_used_then_restored():
    pipe = make_pipe()
    calls = []

    def moderation(score, x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(score)

    zero_score = run(pipe, num_inference_steps=4, moderation=moderation)
    assert len(calls) == 4 and pipe.scheduler.moderation is None
    assert not np.array_equal(zero_score, run(pipe, num_inference_steps=4))
    direction = DirectionModeration(torch.ones(1, 1, 8, 8), mode="orthogonal")
    assert run(pipe, moderation=direction).shape == (2, 8, 8, 1)


def test_heun_and_corrector_nfe():
    for kwargs, nfe in [({"predictor": "ode", "ode_solver": "heun"}, 5), ({"corrector": "langevin", "n_corrector_steps": 2}, 9)]:
        pipe = make_pipe(**kwargs)
        calls = []
        hook = pipe.score_model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        run(pipe, num_inference_steps=3)
        hook.remove()
        assert len(calls) == nfe, kwargs


def test_pipeline_samples_the_analytic_gaussian():
    model = analytic_score_model("vp", "epsilon", mu=0.2, s0=0.3)
    pipe = MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model))
    pipe.set_progress_bar_config(disable=True)
    x = pipe(batch_size=1000, num_inference_steps=200, generator=torch.Generator().manual_seed(0), output_type="pt").images
    x = x * 2 - 1  # back to model space
    assert abs(x.mean().item() - 0.2) < 0.02 and abs(x.std().item() - 0.3) / 0.3 < 0.05


def test_conditional_unet_gets_class_labels():
    unet = tiny_unet(num_class_embeds=3)
    model = ScoreModel.from_unet(unet)
    pipe = MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model))
    a = run(pipe, class_labels=torch.tensor([0, 0]))
    b = run(pipe, class_labels=torch.tensor([2, 2]))
    assert not np.array_equal(a, b)


def test_bad_pipeline_inputs():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=1, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="latents"):
        pipe(batch_size=2, num_inference_steps=2, latents=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="generator"):
        pipe(batch_size=2, num_inference_steps=2, generator=[torch.Generator()])
    mismatched = MSGMPipeline(pipe.score_model, ModeratedScoreScheduler(sde_type="ve"))
    with pytest.raises(ValueError, match="different SDEs"):
        mismatched(batch_size=1, num_inference_steps=2)


def test_from_stock_diffusers_pipeline(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(seed=2), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    pipe = MSGMPipeline.from_diffusers_pipeline(tmp_path, predictor="ode")
    assert pipe.scheduler.config.predictor == "ode" and pipe.score_model.config.beta_max == pytest.approx(20.0)
    assert run(pipe).shape == (2, 8, 8, 1)
