"""Inpainting, reconstruction and data-driven moderations (exemplars, noise-aware classifier)."""

import numpy as np
import pytest
import torch
from helpers import analytic_score_model, tiny_unet
from PIL import Image

from diffusers_msgm import (
    ClassifierModeration,
    ExemplarModeration,
    ModeratedScoreScheduler,
    MSGMInpaintPipeline,
    MSGMPipeline,
    MSGMReconstructionPipeline,
    MSGMReconstructionPipelineOutput,
    NoiseAwareClassifier,
    ScoreModel,
    train_noise_aware_classifier,
)
from diffusers_msgm.sde import get_sde

MU, S0 = 0.1, 0.25  # model-space data N(MU, S0^2 I): in [0, 1] mean 0.55, std 0.125, clipping negligible
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)


def make(cls, sde_type="vp", prediction_type="epsilon", **scheduler_kwargs):
    model = analytic_score_model(sde_type, prediction_type, mu=MU, s0=S0)
    pipe = cls(model, ModeratedScoreScheduler.from_score_model(model, **scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def half_mask():  # left half known
    return torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)


@pytest.mark.parametrize(
    "options", [{}, {"corrector": "langevin"}, {"predictor": "ode", "ode_solver": "heun"}], ids=["em", "pc", "heun"]
)
def test_inpainting_keeps_known_pixels_and_samples_the_unknown_gaussian(options):
    pipe = make(MSGMInpaintPipeline, **options)
    image = torch.rand(1, 1, 4, 4, generator=gen(1))
    out = pipe(image, half_mask(), num_inference_steps=100, num_images_per_image=1000, generator=gen(),
               output_type="pt").images
    assert out.shape == (1000, 1, 4, 4)
    assert torch.equal(out[..., :2], image[..., :2].expand(1000, -1, -1, -1))  # bit-exact
    unknown = out[..., 2:] * 2 - 1  # back to model space
    assert abs(unknown.mean().item() - MU) < 0.1 * S0
    assert abs(unknown.std().item() - S0) / S0 < 0.1


def test_inpainting_pil_and_numpy_inputs_and_mask_threshold():
    pipe = make(MSGMInpaintPipeline)
    pixels = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 13)
    mask = np.full((4, 4), 0.49, dtype=np.float32)
    mask[0, :] = 0.5  # >= 0.5: known
    pil_mask = Image.fromarray(np.where(mask >= 0.5, 255, 0).astype(np.uint8), "L")
    pil = pipe(Image.fromarray(pixels, "L"), pil_mask, num_inference_steps=5, generator=gen()).images
    assert len(pil) == 1 and pil[0].mode == "L"
    out = np.asarray(pil[0])
    np.testing.assert_array_equal(out[0], pixels[0])
    arr = pipe(pixels[..., None].astype(np.float32) / 255, mask, num_inference_steps=5, generator=gen(),
               output_type="np").images
    assert arr.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(arr[0, 0, :, 0], pixels[0].astype(np.float32) / 255)
    assert not np.allclose(arr[0, 1:, :, 0], pixels[1:] / 255)  # 0.49 is below the threshold: inpainted


def test_inpainting_moderation_callback_and_batched_masks():
    pipe = make(MSGMInpaintPipeline)
    calls, seen = [], []

    def moderation(score, x, t):
        calls.append(float(t[0]))
        return score

    def callback(p, i, t, kwargs):
        seen.append((i, kwargs["sample"].shape, kwargs["score"].shape))
        return {}

    images = torch.rand(2, 1, 4, 4, generator=gen(2))
    masks = torch.stack([half_mask(), 1 - half_mask()])[:, None]
    (out,) = pipe(images, masks, num_inference_steps=4, generator=[gen(0), gen(1)], output_type="pt",
                  return_dict=False, moderation=moderation, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["sample", "score"])
    assert len(calls) == 4 and pipe.scheduler.moderation is None
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][1] == (2, 1, 4, 4)
    assert torch.equal(out[0, ..., :2], images[0, ..., :2]) and torch.equal(out[1, ..., 2:], images[1, ..., 2:])


def test_inpaint_bad_inputs():
    pipe = make(MSGMInpaintPipeline)
    image, mask = torch.rand(1, 1, 4, 4), half_mask()
    cases = [
        ({"mask_image": mask * 2}, "mask_image` values must lie in \\[0, 1\\]"),
        ({"mask_image": torch.ones(5, 5)}, "mask_image` has size"),
        ({"mask_image": torch.ones(3, 1, 4, 4)}, "one per image"),
        ({"mask_image": torch.ones(2, 4, 4)}, "channels"),
        ({"image": torch.rand(1, 1, 8, 8)}, "score model expects"),
        ({"image": image * 2 - 1}, "`image` values must lie in"),
        ({"image": [np.zeros((4, 4))]}, "PIL images only"),
        ({"output_type": "latent"}, "output_type"),
        ({"generator": [gen(), gen()]}, "generator"),
        ({"num_images_per_image": 0}, "num_images_per_image"),
    ]
    for override, match in cases:
        kwargs = {"image": image, "mask_image": mask, "num_inference_steps": 2, **override}
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)


def test_downstream_pipelines_load_like_msgm_pipeline(tmp_path, monkeypatch):
    model = ScoreModel.from_unet(tiny_unet(sample_size=4, seed=3))
    MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model)).save_pretrained(tmp_path)
    monkeypatch.setattr("diffusers_msgm.hub.snapshot_download", lambda repo_id, allow_patterns=None, **kw: str(tmp_path))
    for cls in (MSGMInpaintPipeline, MSGMReconstructionPipeline):
        pipe = cls.from_pretrained("someone/msgm-tiny")
        assert type(pipe) is cls and pipe.score_model.sample_shape == (1, 4, 4)
    inpaint = MSGMInpaintPipeline.from_pretrained(tmp_path)
    assert inpaint(torch.rand(1, 1, 4, 4), half_mask(), num_inference_steps=2, output_type="np").images.shape == (1, 4, 4, 1)


@pytest.mark.parametrize(
    "sde_type,prediction_type,solver,steps",
    [("vp", "epsilon", "heun", 50), ("vp", "epsilon", "euler", 500), ("ve", "score", "heun", 100)],
)
def test_reconstruction_round_trip_is_exact_up_to_discretisation(sde_type, prediction_type, solver, steps):
    pipe = make(MSGMReconstructionPipeline, sde_type, prediction_type)
    x01 = (MU + S0 * torch.randn(64, 1, 4, 4, generator=gen(1))) / 2 + 0.5
    out = pipe(x01, num_inference_steps=steps, ode_solver=solver, output_type="pt")
    assert isinstance(out, MSGMReconstructionPipelineOutput) and out.mse.shape == (64,)
    assert out.mse.max().item() < 1e-3
    torch.testing.assert_close(out.mse, (out.images - x01).pow(2).flatten(1).mean(1))
    prior_std = pipe.scheduler.sde.prior_std()  # x_T of Gaussian data is ~N(0, prior_std^2)
    assert abs(out.latents.std().item() / prior_std - 1) < 0.1 and abs(out.latents.mean().item()) < 0.1 * prior_std


def test_reconstruction_perturbations_and_moderation_on_decoding_only():
    pipe = make(MSGMReconstructionPipeline)
    x01 = (MU + S0 * torch.randn(16, 1, 4, 4, generator=gen(1))) / 2 + 0.5
    exact = pipe(x01, num_inference_steps=20, output_type="pt").mse
    perturbed = pipe(x01, num_inference_steps=20, perturb_t=0.02, generator=gen(), output_type="pt").mse
    assert exact.mean() < 1e-5 < perturbed.mean() < 1e-2
    calls = []

    def moderation(score, x, t):
        calls.append(1)
        return score

    images, latents, mse = pipe(x01, num_inference_steps=5, ode_solver="euler", latent_noise_scale=0.5,
                                generator=gen(), output_type="np", return_dict=False, moderation=moderation)
    assert len(calls) == 4 and images.shape == (16, 4, 4, 1) and mse.mean() > 1e-4  # 4 decoding steps, not encoding


def test_reconstruction_bad_inputs():
    pipe = make(MSGMReconstructionPipeline)
    image = torch.rand(1, 1, 4, 4)
    for kwargs, match in [
        ({"num_inference_steps": 1}, "num_inference_steps"), ({"ode_solver": "rk4"}, "ode_solver"),
        ({"perturb_t": 1.0}, "perturb_t"), ({"perturb_t": 0.0}, "perturb_t"),
        ({"latent_noise_scale": -1.0}, "latent_noise_scale"), ({"output_type": "latent"}, "output_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe(image, **{"num_inference_steps": 3, **kwargs})
    with pytest.raises(ValueError, match="score model expects"):
        pipe(torch.rand(1, 3, 4, 4), num_inference_steps=3)


def _mixture_score(sde, means, s0):
    """Score of p_t for the equal-weight mixture of N(m_k, s0^2 I)."""

    def score_fn(x, t):
        alpha, sigma = sde.marginal_coefficients(t.view(-1, 1))
        var = alpha**2 * s0**2 + sigma**2
        diffs = x[:, None, :] - alpha[:, None] * means[None]  # (n, k, d)
        r = torch.softmax(-(diffs**2).sum(-1) / (2 * var), dim=1)
        return -(r[..., None] * diffs).sum(1) / var

    return score_fn


@torch.no_grad()  # as inside the pipelines: the classifier moderation must enable gradients itself
def _sample(moderation=None, n=4000, steps=200):
    scheduler = ModeratedScoreScheduler(predictor="euler_maruyama", moderation=moderation)
    score_fn = _mixture_score(scheduler.sde, MEANS, 0.2)
    scheduler.set_timesteps(steps)
    g = gen()
    x = scheduler.sde.prior_sampling((n, 2), generator=g, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(score_fn(x, t.double().expand(n)), t, x, generator=g).prev_sample
    return x


def _share(x, k):
    return ((x - MEANS[k]).norm(dim=1) < 1.0).double().mean().item()


@pytest.mark.parametrize("mode,limit", [("obtuse", 0.05), ("orthogonal", 0.30)])
def test_exemplar_moderation_steers_away_from_the_forgotten_mode(mode, limit):
    base = _share(_sample(), 1)
    exemplars = MEANS[1] + 0.2 * torch.randn(20, 2, generator=gen(5), dtype=torch.float64)
    moderation = ExemplarModeration(exemplars, get_sde("vp"), mode=mode)
    moderated = _share(_sample(moderation), 1)
    assert 0.4 < base < 0.6
    assert moderated < limit, (base, moderated)


def _brute_force_forget_score(sde, exemplars, x, t, temperature=1.0):
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        alpha, sigma = (c.item() for c in sde.marginal_coefficients(t[b : b + 1].double()))
        logits = torch.stack([-((x[b] - alpha * e) ** 2).sum() / (2 * sigma**2 * temperature) for e in exemplars])
        w = torch.softmax(logits, 0)
        out[b] = sum(w[i] * (alpha * exemplars[i] - x[b]) for i in range(len(exemplars))) / sigma**2
    return out


@pytest.mark.parametrize("sde_type", ["vp", "ve"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_exemplar_score_matches_a_brute_force_loop(sde_type, temperature):
    sde = get_sde(sde_type)
    g = gen(3)
    exemplars = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    x = 2 * torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    moderation = ExemplarModeration(exemplars, sde, temperature=temperature)
    expected = _brute_force_forget_score(sde, exemplars, x, t, temperature)
    torch.testing.assert_close(moderation.forget_score(x, t), expected, rtol=1e-6, atol=1e-8)
    score = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    unit = expected.flatten(1) / expected.flatten(1).norm(dim=1, keepdim=True)
    inner = (moderation(score, x, t).flatten(1) * unit).sum(1)
    torch.testing.assert_close(inner, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)  # orthogonal


def test_exemplar_inputs_pil_numpy_and_in_a_pipeline():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    from_pil = ExemplarModeration([Image.fromarray(p, "L") for p in pixels], get_sde("vp"))
    from_np = ExemplarModeration(pixels[..., None].astype(np.float32) / 255, get_sde("vp"), centered_data=False)
    torch.testing.assert_close(from_pil.exemplars, torch.from_numpy(pixels[:, None] / 127.5 - 1).float())
    torch.testing.assert_close(from_np.exemplars * 2 - 1, from_pil.exemplars)
    model = ScoreModel.from_unet(tiny_unet(seed=7))
    pipe = MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model))
    pipe.set_progress_bar_config(disable=True)
    moderation = ExemplarModeration(from_pil.exemplars, model, mode="obtuse")
    a = pipe(batch_size=2, num_inference_steps=3, generator=gen(), output_type="np", moderation=moderation).images
    b = pipe(batch_size=2, num_inference_steps=3, generator=gen(), output_type="np").images
    assert a.shape == (2, 8, 8, 1) and np.isfinite(a).all() and not np.array_equal(a, b)


def test_exemplar_bad_inputs():
    sde = get_sde("vp")
    for args, kwargs, match in [
        ((torch.zeros(0, 1, 4, 4), sde), {}, "empty"), (([], sde), {}, "empty"),
        ((torch.zeros(2, 1, 4, 4), sde), {"mode": "sideways"}, "mode"),
        ((torch.zeros(2, 1, 4, 4), sde), {"strength": -1.0}, "strength"),
        ((torch.zeros(2, 1, 4, 4), sde), {"temperature": 0.0}, "temperature"),
        ((torch.zeros(2, 1, 4, 4), "vp"), {}, "sde"),
        ((np.full((2, 4, 4, 1), 2.0), sde), {}, "values must lie in"),
        ((torch.full((2, 1, 4, 4), float("nan")), sde), {}, "non-finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExemplarModeration(*args, **kwargs)
    moderation = ExemplarModeration(torch.zeros(2, 1, 4, 4), sde)
    for shape in [(3, 3, 4, 4), (3, 1, 8, 8)]:
        x = torch.zeros(shape)
        with pytest.raises(ValueError, match="channels and resolution"):
            moderation(x, x, torch.full((3,), 0.5))


def _posterior_logits(x, t):
    """Exact log p(k | x_t) (+ const) of the 2-D mixture: a perfect noise-aware classifier."""
    alpha, sigma = get_sde("vp").marginal_coefficients(t.view(-1, 1))
    var = alpha**2 * 0.2**2 + sigma**2
    return -((x[:, None, :] - alpha[:, None] * MEANS[None]) ** 2).sum(-1) / (2 * var)


def test_classifier_moderation_moves_samples_away_from_the_forgotten_class():
    base = _sample()
    forget = _sample(ClassifierModeration(_posterior_logits, [1], scale=1.0))
    assert 0.4 < _share(base, 1) < 0.6
    assert _share(forget, 1) < 0.2 and forget[:, 0].mean() < base[:, 0].mean() - 1.0
    # the retain form samples p(x | y = 0) exactly: the kept mode keeps its place and width
    retain = _sample(ClassifierModeration(_posterior_logits, [1], scale=1.0, objective="retain"))
    assert _share(retain, 1) < 0.01 and _share(retain, 0) > 0.95
    torch.testing.assert_close(retain.mean(0), MEANS[0], rtol=0, atol=0.05)
    assert abs(retain.std(0)[0].item() / 0.2 - 1) < 0.1


def test_train_noise_aware_classifier_and_use_it(tmp_path):
    g = gen(0)
    labels = torch.arange(64) % 2
    images = 0.1 * torch.randn(64, 1, 8, 8, generator=g)
    images[labels == 0, :, :, :4] += 0.8  # class 0: bright left half, class 1: bright right half
    images[labels == 1, :, :, 4:] += 0.8
    sde = get_sde("vp")
    clf = train_noise_aware_classifier(images, labels, sde, steps=150, batch_size=32, lr=3e-3, seed=0,
                                       hidden_channels=(8, 16))
    assert isinstance(clf, NoiseAwareClassifier) and not clf.training
    with torch.no_grad():
        t = torch.full((64,), 0.05)
        acc = (clf(sde.marginal_prob(images, t)[0], t).argmax(1) == labels).float().mean().item()
    assert acc > 0.9
    clf.save_pretrained(tmp_path)
    loaded = NoiseAwareClassifier.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(images, 0.3), clf(images, 0.3))
    score = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    guided = ClassifierModeration(clf, [1], scale=2.0)(score, images[:4].double(), torch.full((4,), 0.1))
    assert guided.dtype == torch.float64 and guided.abs().sum() > 0


def test_classifier_bad_inputs():
    for args, kwargs, match in [
        (("not callable", [0]), {}, "classifier"), ((_posterior_logits, []), {}, "forget_labels"),
        ((_posterior_logits, [-1]), {}, "forget_labels"), ((_posterior_logits, [1]), {"scale": -1.0}, "scale"),
        ((_posterior_logits, [1]), {"objective": "both"}, "objective"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClassifierModeration(*args, **kwargs)
    x, t = torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="forget_labels"):
        ClassifierModeration(_posterior_logits, [2])(x, x, t)
    with pytest.raises(ValueError, match="logits of shape"):
        ClassifierModeration(lambda x, t: x.sum(1), [0])(x, x, t)
    with pytest.raises(ValueError, match="outside"):
        ClassifierModeration(_posterior_logits, [0, 1], objective="retain")(x, x, t)
    images, sde = torch.zeros(4, 1, 8, 8), get_sde("vp")
    for kwargs, match in [({"labels": [0, 1]}, "labels"), ({"steps": 0}, "steps"),
                          ({"labels": [0, 1, 2, 3], "num_classes": 3}, "labels")]:
        with pytest.raises(ValueError, match=match):
            train_noise_aware_classifier(images, **{"labels": [0, 1, 0, 1], "sde": sde, **kwargs})
