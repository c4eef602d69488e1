"""Attribution (TRAK / D-TRAK / DAS): per-sample gradients, projection, closed forms, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_unet

from diffusers_msgm import ScoreModel
from diffusers_msgm.audit.attribution import AttributionIndex
from diffusers_msgm.audit.gradient_features import (
    GradientFeaturizer,
    eps_from_unet_output,
    fixed_noise,
    resolve_timesteps,
)
from diffusers_msgm.audit.projection import BlockwiseProjector
from diffusers_msgm.data import arrays_to_dataset

METHODS = ("trak", "d-trak", "das")


def tiny_model(seed: int = 0) -> ScoreModel:
    return ScoreModel.from_unet(tiny_unet(8, seed=seed, add_attention=False), sde_type="vp")


def images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class LinearEps(torch.nn.Module):
    """eps_hat(x_t) = W x_t + b over the flattened pixels: a least-squares model with closed-form gradients."""

    def __init__(self, score_model: ScoreModel, d: int):
        super().__init__()
        self.config = score_model.unet.config
        gen = torch.Generator().manual_seed(3)
        self.weight = torch.nn.Parameter(0.3 * torch.randn(d, d, generator=gen))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d, generator=gen))

    def forward(self, sample, timestep, return_dict=False, **_):
        return ((sample.flatten(1) @ self.weight.T + self.bias).view_as(sample),)


def linear_model(size: int = 3) -> ScoreModel:
    model = ScoreModel.from_unet(tiny_unet(size), sde_type="vp", prediction_type="epsilon")
    model.unet = LinearEps(model, size * size)
    return model


@pytest.mark.parametrize("sde_type", ["vp", "ve"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "score"])
def test_eps_conversion_matches_score_model(prediction_type, sde_type):
    model = ScoreModel.from_unet(tiny_unet(8, add_attention=False), sde_type=sde_type, prediction_type=prediction_type)
    x, t = images(2), torch.tensor([0.3, 0.8])
    sigma = model.sde.marginal_coefficients(t)[1].view(-1, 1, 1, 1)
    with torch.no_grad():
        out = model.unet(x, model.time_input(t), return_dict=False)[0]
        torch.testing.assert_close(eps_from_unet_output(model, x, t, out), -sigma * model(x, t).score)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_gradients_equal_per_sample_loop(method):
    model = tiny_model()
    featurizer = GradientFeaturizer(model, method, 2, proj_dim=16, batch_size=4)
    x = images(3)
    fast, fast_r = featurizer.averaged_grads(x)
    slow, slow_r = featurizer.averaged_grads(x, loop=True)
    assert fast.shape == (3, featurizer.num_params)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast_r, slow_r, rtol=1e-5, atol=1e-6)
    if method == "das":  # the average of K unit vectors has norm <= 1
        assert bool((fast.norm(dim=1) <= 1 + 1e-5).all())


def test_features_do_not_depend_on_batching():
    model = tiny_model()
    x = images(5)
    a = GradientFeaturizer(model, "d-trak", 2, 32, batch_size=5).features(x)[0]
    b = GradientFeaturizer(model, "d-trak", 2, 32, batch_size=2).features(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projection_is_seeded_blockwise_and_norm_preserving(kind):
    g = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
    proj = BlockwiseProjector(500, 64, seed=7, kind=kind, block_size=96, cache_bytes=0)
    again = BlockwiseProjector(500, 64, seed=7, kind=kind, block_size=96)
    other = BlockwiseProjector(500, 64, seed=8, kind=kind, block_size=96)
    assert torch.equal(proj.project(g), again.project(g))  # no stored matrix: regenerated from the seed
    assert not torch.allclose(proj.project(g), other.project(g))
    torch.testing.assert_close(proj.project(g), g @ proj.matrix(), rtol=1e-4, atol=1e-4)
    if kind == "rademacher":
        assert torch.allclose(proj.matrix().abs(), torch.full((500, 64), 64**-0.5))
    # Johnson-Lindenstrauss: E ||M^T g||^2 = ||g||^2, averaged over 40 seeds (std of the mean ~ 0.03)
    ratios = torch.stack([
        BlockwiseProjector(500, 64, seed=s, kind=kind, block_size=128).project(g).pow(2).sum(1) / g.pow(2).sum(1)
        for s in range(40)
    ])
    torch.testing.assert_close(ratios.mean(), torch.tensor(1.0), atol=0.08, rtol=0)
    assert float(ratios.std()) < 0.35  # concentration: 2/k = 0.03 variance for Gaussian entries


def test_trak_scores_match_closed_form_on_least_squares_toy():
    """eps_hat = W x_t + b, f = mean((eps_hat - z)^2): grad_W f = (2/d) r x_t^T, grad_b f = (2/d) r, r = eps_hat - z."""
    model = linear_model(3)
    d, times, k = 9, resolve_timesteps(3), 40
    train, queries = images(7, 1, 3), images(3, 2, 3)
    index = AttributionIndex.build(model, train, "trak", proj_dim=k, timesteps=3, seed=5, damping=0.05)
    w, b = (p.detach().double() for p in (model.unet.weight, model.unet.bias))

    def closed_form_features(x0):
        g = torch.zeros(x0.shape[0], d * d + d, dtype=torch.float64)
        for n, t in enumerate(times):
            alpha, sigma = (c.double() for c in model.sde.marginal_coefficients(t.view(1)))
            z = fixed_noise(5, n, (1, 3, 3)).double().flatten()
            x_t = alpha * x0.double().flatten(1) + sigma * z
            r = x_t @ w.T + b - z
            g += torch.cat([(2 / d) * torch.einsum("ni,nj->nij", r, x_t).flatten(1), (2 / d) * r], 1)
        return g / len(times)

    m = BlockwiseProjector(d * d + d, k, seed=5).matrix().double()
    phi, phi_q = closed_form_features(train) @ m, closed_form_features(queries) @ m
    expected = phi_q @ torch.linalg.solve(phi.T @ phi + 0.05 * torch.eye(k, dtype=torch.float64), phi.T)
    torch.testing.assert_close(index.attribute(queries).double(), expected, rtol=1e-3, atol=1e-5)


def test_leverage_gives_exact_leave_one_out_of_ridge_regression():
    """Sherman-Morrison: removing i from a ridge fit changes phi_q^T w by -phi_q^T K^-1 phi_i e_i / (1 - h_i)."""
    model = tiny_model()
    train = images(10, 4)
    index = AttributionIndex.build(model, train, "das", proj_dim=6, timesteps=1, damping=0.01)
    phi = index.tensors["train_features"].double()
    pre, h = index.tensors["preconditioned"].double(), index.tensors["leverage"].double()
    y = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ridge = lambda a, t: torch.linalg.solve(a.T @ a + 0.01 * torch.eye(6, dtype=a.dtype), a.T @ t)  # noqa: E731
    w = ridge(phi, y)
    q = torch.randn(6, dtype=torch.float64)
    for i in (0, 7):
        keep = torch.arange(10) != i
        exact = q @ ridge(phi[keep], y[keep]) - q @ w
        predicted = -(q @ pre[i]) * (y[i] - phi[i] @ w) / (1 - h[i])
        torch.testing.assert_close(exact, predicted, rtol=1e-3, atol=1e-6)
    assert bool(((h > 0) & (h < 1)).all())


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    model = tiny_model()
    train, queries = images(6), images(2, 9)
    index = AttributionIndex.build(model, train, "das", proj_dim=32, timesteps=2, seed=3, batch_size=4)
    before = index.attribute(queries)
    index.save(tmp_path / "index")
    index.save(tmp_path / "index")  # overwriting an existing index is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    loaded = AttributionIndex.load(tmp_path / "index", model)
    assert loaded.config == index.config
    assert torch.equal(loaded.attribute(queries), before)
    assert before.shape == (2, 6) and bool((before >= 0).all())  # DAS scores are squares


@pytest.mark.parametrize("method", METHODS)
def test_training_image_ranks_itself_first(method):
    model = tiny_model()
    train = images(8, 11)
    index = AttributionIndex.build(model, train, method, proj_dim=64, timesteps=2)
    scores = index.attribute(train[[1, 4, 6]])
    top = scores.argmax(1).tolist()
    assert top == [1, 4, 6], scores


def test_dataset_input_uses_project_transform():
    model = tiny_model()
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    dataset = arrays_to_dataset(pixels, [0, 1, 0, 1], ["a", "b"])
    tensor = torch.from_numpy(pixels).float().div(255).mul(2).sub(1).unsqueeze(1)
    a = AttributionIndex.build(model, dataset, "trak", proj_dim=16, timesteps=1)
    b = AttributionIndex.build(model, tensor, "trak", proj_dim=16, timesteps=1)
    torch.testing.assert_close(a.tensors["train_features"], b.tensors["train_features"])


def test_bad_input_errors(tmp_path):
    model = tiny_model()
    train = images(4)
    with pytest.raises(ValueError, match="proj_dim"):
        AttributionIndex.build(model, train, "trak", proj_dim=10**7, timesteps=1)
    with pytest.raises(ValueError, match="shape"):
        AttributionIndex.build(model, images(4, size=16), "trak", proj_dim=8, timesteps=1)
    with pytest.raises(ValueError, match="empty"):
        AttributionIndex.build(model, train[:0], "trak", proj_dim=8, timesteps=1)
    with pytest.raises(ValueError, match="empty"):
        AttributionIndex.build(model, arrays_to_dataset(np.zeros((0, 8, 8), np.uint8), [], ["a"]), "trak", 8, 1)
    with pytest.raises(ValueError, match="method"):
        AttributionIndex.build(model, train, "influence", proj_dim=8, timesteps=1)
    with pytest.raises(ValueError, match="non-finite"):
        AttributionIndex.build(model, train * float("nan"), "trak", proj_dim=8, timesteps=1)
    with pytest.raises(ValueError, match="lie in"):
        AttributionIndex.build(model, train * 3, "trak", proj_dim=8, timesteps=1)
    with pytest.raises(ValueError, match="timestep"):
        AttributionIndex.build(model, train, "trak", proj_dim=8, timesteps=[0.5, 1.5])
    with pytest.raises(TypeError, match="Dataset"):
        AttributionIndex.build(model, train.numpy(), "trak", proj_dim=8, timesteps=1)
    index = AttributionIndex.build(model, train, "trak", proj_dim=8, timesteps=1)
    with pytest.raises(ValueError, match="differs"):
        index.attribute(train, score_model=tiny_model(seed=1))
    with pytest.raises(ValueError, match="shape"):
        index.attribute(images(2, size=16))
    index.save(tmp_path / "idx")
    with pytest.raises(ValueError, match="score model"):
        AttributionIndex.load(tmp_path / "idx").attribute(train)
    with pytest.raises(FileNotFoundError):
        AttributionIndex.load(tmp_path / "missing")
