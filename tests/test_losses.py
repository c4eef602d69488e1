import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from helpers import tiny_unet

from diffusers_msgm import (
    FORGET_VARIANTS,
    DDPMMSGMLoss,
    MSGMLoss,
    ScoreModel,
    ScoreModelOutput,
    denoising_score_matching_loss,
    forget_term,
    msgm_forget_loss,
)
from diffusers_msgm.losses import ddpm_prediction_loss, perturb
from diffusers_msgm.sde import VPSDE


def test_forget_terms_on_fixed_tensors():
    eps_hat = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    z = torch.tensor([[[[2.0, 1.0], [-1.0, 3.0]]]])
    prod = torch.tensor([2.0, -2.0, -0.5, 0.0])
    cos = prod.sum() / (eps_hat.norm() * z.norm())
    torch.testing.assert_close(forget_term(eps_hat, z, "orthogonal"), (prod**2).mean().view(1))
    torch.testing.assert_close(forget_term(eps_hat, z, "orthogonal", reduce_mean=False), (prod**2).sum().view(1))
    torch.testing.assert_close(forget_term(eps_hat, z, "orthogonal_cosine"), (cos**2).view(1))
    torch.testing.assert_close(forget_term(eps_hat, z, "obtuse"), F.relu(cos).view(1))
    torch.testing.assert_close(forget_term(-eps_hat, z, "obtuse"), F.relu(-cos).view(1))
    torch.testing.assert_close(forget_term(eps_hat, z, "obtuse_official"), (-prod.mean()).view(1))
    with pytest.raises(ValueError, match="variant"):
        forget_term(eps_hat, z, "square")


def _model_and_data(seed=0):
    model = ScoreModel.from_unet(tiny_unet(seed=seed))
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g) * 0.9 + 0.05, torch.randn(
        4, 1, 8, 8, generator=g
    )


def test_dsm_loss_equals_its_formula():
    model, x0, t, z = _model_and_data()
    sde = model.sde
    mean, std = sde.marginal_prob(x0, t)
    s = model(mean + std * z, t).score
    expected = ((s * std + z) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(denoising_score_matching_loss(model, x0, sde, t=t, noise=z), expected)
    sum_form = ((s * std + z) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(denoising_score_matching_loss(model, x0, t=t, noise=z, reduce_mean=False), sum_form)
    g2 = sde.sde(x0, t)[1].flatten() ** 2
    weighted = (((s + z / std) ** 2).flatten(1).mean(1) * g2).mean()
    torch.testing.assert_close(denoising_score_matching_loss(model, x0, t=t, noise=z, likelihood_weighting=True), weighted)


def test_forget_loss_uses_eps_hat_of_the_score():
    model, x0, t, z = _model_and_data(1)
    mean, std = model.sde.marginal_prob(x0, t)
    eps_hat = -std * model(mean + std * z, t).score
    for variant in FORGET_VARIANTS:
        torch.testing.assert_close(
            msgm_forget_loss(model, x0, variant, t=t, noise=z), forget_term(eps_hat, z, variant).mean()
        )


def test_msgm_loss_mixes_and_skips():
    model, x_r, _, x_f = _model_and_data(2)
    loss = MSGMLoss(model.sde, "obtuse", forget_weight=0.25, forget_every=4)
    out = loss(model, x_r, x_f, step=8, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    retain = denoising_score_matching_loss(model, x_r, generator=g)
    forget = msgm_forget_loss(model, x_f, "obtuse", generator=g)
    assert out.forget_computed
    torch.testing.assert_close(out.loss, 0.75 * retain + 0.25 * forget)
    skipped = loss(model, x_r, x_f, step=9, generator=torch.Generator().manual_seed(5))
    assert not skipped.forget_computed and skipped.forget_loss.item() == 0.0
    torch.testing.assert_close(skipped.loss, 0.75 * retain)
    no_forget = loss(model, x_r, None, step=0, generator=torch.Generator().manual_seed(5))
    assert not no_forget.forget_computed


@pytest.mark.parametrize(
    "kwargs,match",
    [({"variant": "norm"}, "variant"), ({"forget_weight": 1.5}, "forget_weight"), ({"forget_every": 0}, "forget_every")],
)
def test_msgm_loss_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSGMLoss(VPSDE(), **kwargs)


class ConstantScore(torch.nn.Module):
    """A 'model' whose score is a free tensor: one gradient step shows where each loss pushes the score."""

    def __init__(self, init):
        super().__init__()
        self.value = torch.nn.Parameter(init.clone())
        self.sde = VPSDE()

    def forward(self, x, t, **_):
        return ScoreModelOutput(score=self.value)


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1)).mean().item()


@pytest.mark.parametrize("variant", FORGET_VARIANTS)
def test_one_step_moves_the_score_in_the_documented_direction(variant):
    g = torch.Generator().manual_seed(0)
    x_f, z = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.full((8,), 0.5)
    _, std = VPSDE().marginal_prob(x_f, t)
    toward = -z / std  # the true conditional score: points from x_t toward the undesirable x_0
    model = ConstantScore(toward + 0.5 * torch.randn(8, 1, 4, 4, generator=g) / std)
    before_cos, before_proj = _cos(model.value, toward), (model.value * z).detach()
    loss = msgm_forget_loss(model, x_f, variant, t=t, noise=z)
    loss.backward()
    with torch.no_grad():
        model.value -= 0.05 * model.value.grad / model.value.grad.norm()
    after_cos = _cos(model.value, toward)
    if variant == "obtuse":
        assert after_cos < before_cos  # turned away from the undesirable data
    elif variant == "obtuse_official":
        assert after_cos > before_cos  # the official sign pulls TOWARD the undesirable data
    elif variant == "orthogonal_cosine":
        assert abs(after_cos) < abs(before_cos)
    else:  # element-wise orthogonal: each s_i z_i shrinks toward 0
        assert (model.value * z).detach().abs().sum() < before_proj.abs().sum()


@pytest.mark.parametrize("variant,sign", [("obtuse", -1), ("obtuse_official", +1)])
def test_training_a_unet_on_the_forget_term(variant, sign):
    """A few Adam steps on one undesirable image: obtuse turns the score away, the official sign toward it."""
    torch.manual_seed(0)
    model = ScoreModel.from_unet(tiny_unet(seed=4))
    x_f = torch.rand(1, 1, 8, 8) * 2 - 1
    t = torch.full((16,), 0.3)
    z = torch.randn(16, 1, 8, 8)
    mean, std = model.sde.marginal_prob(x_f.expand(16, -1, -1, -1), t)
    x_t = mean + std * z

    def alignment():
        with torch.no_grad():
            return _cos(model(x_t, t).score, mean - x_t)

    start = alignment()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad()
        msgm_forget_loss(model, x_f.expand(16, -1, -1, -1), variant, t=t, noise=z).backward()
        opt.step()
    assert sign * (alignment() - start) > 0.2, (start, alignment())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_loss_in_epsilon_space(prediction_type):
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    ts = torch.tensor([3, 50, 97])

    class Oracle(torch.nn.Module):  # predicts the exact target, so eps_hat must equal the noise
        def forward(self, x_t, timesteps, **_):
            target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, timesteps)
            return type("Out", (), {"sample": target})()

    loss, eps_hat, z = ddpm_prediction_loss(Oracle(), x0, sched, timesteps=ts, noise=noise, return_eps=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)

    unet = tiny_unet()
    msgm = DDPMMSGMLoss(sched, "obtuse", forget_weight=0.5)
    out = msgm(unet, x0, x0, step=0, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert out.forget_computed and torch.isfinite(out.loss)
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_perturb_rejects_mismatched_noise():
    with pytest.raises(ValueError, match="noise"):
        perturb(torch.zeros(2, 1, 4, 4), VPSDE(), noise=torch.zeros(2, 1, 4, 5))


@pytest.mark.parametrize("loss_cls", ["continuous", "ddpm"])
def test_fused_forward_equals_two_passes(loss_cls):
    model, x_r, _, x_f = _model_and_data(3)
    if loss_cls == "continuous":
        make = lambda fuse: MSGMLoss(model.sde, "obtuse", 0.3, fuse_batches=fuse)  # noqa: E731
        target = model
    else:
        make = lambda fuse: DDPMMSGMLoss(DDPMScheduler(), "orthogonal", 0.3, fuse_batches=fuse)  # noqa: E731
        target = model.unet
    fused = make(True)(target, x_r, x_f[:2], generator=torch.Generator().manual_seed(0))
    split = make(False)(target, x_r, x_f[:2], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused.loss, split.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.forget_loss, split.forget_loss, rtol=1e-5, atol=1e-6)
