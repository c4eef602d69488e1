"""Wen et al. text-conditional memorization audit: detection, explanation, mitigation, the tiny text stack."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from diffusers_msgm.audit.text_conditional import (
    TextConditionalComponents,
    detect_text_memorization,
    empty_prompt_embeds,
    encode_prompts,
    initial_latents,
    token_significance,
)
from diffusers_msgm.audit.text_conditional_mitigation import (
    generate_from_embeds,
    mitigate_prompt_embeds,
    text_conditional_ddpm_loss,
    wen_filtered_loss,
)
from diffusers_msgm.audit.tiny_text import build_tiny_text_stack, build_word_tokenizer

WORDS = "a digit three four small big zorvak".split()
DIM = 16


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=DIM,
                                attention_head_dim=4, norm_num_groups=4)


def ddim() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def text_stack():
    return build_tiny_text_stack(WORDS, model_max_length=8, hidden_size=DIM)


@pytest.fixture()
def parts(text_stack):
    tokenizer, text_encoder = text_stack
    return TextConditionalComponents(make_unet(), text_encoder, tokenizer, ddim())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FirstTokensUNet(torch.nn.Module):
    """eps = x + W mean(e[:, :2]): sees BOS and the first word only, so d = ||W (m_text - m_empty)||."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=DIM, in_channels=1, sample_size=4)
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(DIM, 16, bias=False)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        return (sample + self.proj(encoder_hidden_states[:, :2].mean(1)).view(-1, 1, 4, 4),)


# ---------------------------------------------------------------- detection
def test_magnitude_is_zero_when_the_unet_ignores_the_text(parts):
    prompts = ["a digit three", "small big four zorvak"]
    before = detect_text_memorization(parts, prompts, num_inference_steps=3, num_generations=2, generator=gen())
    assert (before.score > 1e-3).all()  # random cross-attention: the text changes the prediction
    for module in parts.unet.modules():
        if hasattr(module, "attn2"):  # zero the cross-attention output projection: eps no longer depends on e
            torch.nn.init.zeros_(module.attn2.to_out[0].weight)
            torch.nn.init.zeros_(module.attn2.to_out[0].bias)
    after = detect_text_memorization(parts, prompts, num_inference_steps=3, num_generations=2, generator=gen())
    assert torch.allclose(after.magnitudes, torch.zeros_like(after.magnitudes), atol=1e-6)


def test_first_step_and_multi_step_variants(parts):
    prompts = ["a digit three", "big four", "zorvak"]
    full = detect_text_memorization(parts, prompts, num_inference_steps=4, num_generations=3, generator=gen(1))
    first = detect_text_memorization(parts, prompts, num_inference_steps=4, num_generations=3, generator=gen(1),
                                     first_step_only=True, batch_size=2)
    assert full.magnitudes.shape == (3, 3, 4) and first.magnitudes.shape == (3, 3, 1)
    assert full.score.shape == full.first_step_score.shape == (3,)
    torch.testing.assert_close(full.score, full.magnitudes.mean(dim=(1, 2)))
    # same noise (drawn up front, independent of batch_size): identical first-step values
    torch.testing.assert_close(first.first_step_score, full.first_step_score, rtol=1e-5, atol=1e-6)
    # d_T equals ||eps(x_T, e_p) - eps(x_T, e_empty)|| computed by hand
    latents = initial_latents(parts, 9, gen(1))[:3]  # generations of the first prompt
    t = parts.scheduler.timesteps[0]
    with torch.no_grad():
        e = encode_prompts(parts, ["a digit three"]).expand(3, -1, -1)
        u = empty_prompt_embeds(parts).expand(3, -1, -1)
        d = (parts.unet(latents, t, e).sample - parts.unet(latents, t, u).sample).flatten(1).norm(dim=1)
    torch.testing.assert_close(full.magnitudes[0, :, 0], d, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- explanation
def test_token_significance_closed_form_and_unseen_tokens(text_stack):
    tokenizer, text_encoder = text_stack
    unet = FirstTokensUNet()
    parts = TextConditionalComponents(unet, text_encoder, tokenizer, ddim())
    sig = token_significance(parts, "small digit three zorvak", num_generations=2, num_inference_steps=5)
    assert sig.tokens == ["small", "digit", "three", "zorvak"]  # BOS (and EOS) skipped
    assert sig.grad_norms.shape == (4,)
    assert torch.all(sig.grad_norms[1:] == 0)  # positions the UNet cannot see
    # d = ||W (m_c - m_u)||, m = mean of positions 0, 1: grad wrt position 1 = W^T u / 2, u the unit direction
    e, u = encode_prompts(parts, ["small digit three zorvak"])[0], empty_prompt_embeds(parts)[0]
    direction = unet.proj(e[:2].mean(0) - u[:2].mean(0)).detach()
    expected = (unet.proj.weight.T @ (direction / direction.norm())).norm() / 2
    torch.testing.assert_close(sig.grad_norms[0], expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sig.relative, torch.tensor([1.0, 0, 0, 0]))
    assert sig.magnitude == pytest.approx(float(direction.norm()), rel=1e-4)


# ---------------------------------------------------------------- inference mitigation
def test_prompt_mitigation_lowers_the_magnitude_or_stops_at_max_iterations(parts):
    latents = initial_latents(parts, 2, gen(3))
    first = mitigate_prompt_embeds(parts, latents, threshold=1e6, prompt="small digit zorvak", num_inference_steps=5)
    assert first.num_iterations == 0 and first.converged  # already below: nothing to do
    torch.testing.assert_close(first.prompt_embeds, encode_prompts(parts, ["small digit zorvak"]))
    target = 0.7 * first.magnitudes[0]
    out = mitigate_prompt_embeds(parts, latents, threshold=target, prompt="small digit zorvak", num_inference_steps=5)
    assert out.num_iterations <= 10 and len(out.magnitudes) == out.num_iterations + 1
    assert out.converged == (out.magnitudes[-1] <= target)
    assert out.converged or out.num_iterations == 10
    assert out.magnitudes[-1] < out.magnitudes[0]
    assert all(p.grad is None for p in parts.unet.parameters())  # the UNet is left alone
    images = generate_from_embeds(parts, out.prompt_embeds, latents, num_inference_steps=3, guidance_scale=3.0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


# ---------------------------------------------------------------- training mitigation
def test_filter_drops_exactly_the_samples_at_or_above_threshold():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = wen_filtered_loss(loss, torch.tensor([0.5, 2.0, 1.9, 3.0]), threshold=2.0)
    assert out.keep.tolist() == [True, False, True, False]
    assert out.loss.item() == pytest.approx(2.0)  # mean of 1 and 3
    none = wen_filtered_loss(loss, torch.full((4,), 5.0), threshold=2.0)
    assert none.loss.item() == 0.0 and not none.keep.any()
    none.loss.backward()  # still differentiable, with zero gradient
    assert torch.all(loss.grad == 0)


def test_ddpm_loss_filter_keeps_caption_dropped_rows(parts):
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    uncond = empty_prompt_embeds(parts)
    embeds = torch.cat([encode_prompts(parts, ["a digit three", "big zorvak"]), uncond, uncond])
    plain = text_conditional_ddpm_loss(parts.unet, x0, embeds, uncond, ddpm, generator=gen(4))
    assert plain.keep.all() and plain.magnitude is None
    out = text_conditional_ddpm_loss(parts.unet, x0, embeds, uncond, ddpm, threshold=1e-3, generator=gen(4))
    torch.testing.assert_close(out.per_sample_loss, plain.per_sample_loss)  # same noise and t
    assert out.magnitude[2:].abs().max() < 1e-6 and (out.magnitude[:2] > 1e-3).all()
    assert out.keep.tolist() == [False, False, True, True]
    torch.testing.assert_close(out.loss, plain.per_sample_loss[2:].mean())


# ---------------------------------------------------------------- tiny text stack and SD-shaped pipelines
def test_tokenizer_and_text_encoder_round_trip(text_stack, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer, text_encoder = text_stack
    tokenizer.save_pretrained(tmp_path / "tok")
    text_encoder.save_pretrained(tmp_path / "te")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "tok")
    te2 = CLIPTextModel.from_pretrained(tmp_path / "te")
    prompt = "A small digit three, zorvak"
    ids = tokenizer(prompt, padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok2(prompt, padding="max_length", max_length=8, return_tensors="pt").input_ids[0].tolist()
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["<|startoftext|>", "a", "small", "digit", "three",
                                                               "<unk>", "zorvak", "<|endoftext|>"]  # case folded
    assert tok2.model_max_length == 8 and ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(ids)[0], te2(ids)[0])


def test_stable_diffusion_shaped_pipeline(text_stack, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tokenizer, text_encoder = text_stack
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=1,
                        norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=make_unet(),
                                   scheduler=ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scores = detect_text_memorization(pipe, ["a digit three"], num_inference_steps=2, num_generations=2,
                                      generator=gen())
    assert scores.magnitudes.shape == (1, 2, 2)
    latents = initial_latents(pipe, 1, gen())
    mit = mitigate_prompt_embeds(pipe, latents, threshold=1e-3, prompt="a digit three", max_iterations=2,
                                 num_inference_steps=2)
    assert mit.num_iterations == 2
    ours = generate_from_embeds(pipe, mit.prompt_embeds, latents, num_inference_steps=2, guidance_scale=2.0)
    theirs = pipe(prompt_embeds=mit.prompt_embeds, negative_prompt_embeds=empty_prompt_embeds(pipe),
                  latents=latents, num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=1e-4, atol=1e-5)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    again = detect_text_memorization(loaded, ["a digit three"], num_inference_steps=2, num_generations=2,
                                     generator=gen())
    torch.testing.assert_close(again.magnitudes, scores.magnitudes)


# ---------------------------------------------------------------- bad input
def test_errors(parts, text_stack):
    tokenizer, text_encoder = text_stack
    with pytest.raises(ValueError, match="model_max_length"):
        detect_text_memorization(parts, ["a digit three four small big zorvak a"], num_inference_steps=2)
    with pytest.raises(TypeError, match="text-conditional"):
        TextConditionalComponents(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                              norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                              up_block_types=("UpBlock2D",) * 2), text_encoder, tokenizer, ddim())
    with pytest.raises(TypeError, match="lacks"):
        detect_text_memorization(SimpleNamespace(unet=parts.unet), ["a"])
    with pytest.raises(TypeError, match="list of strings"):
        detect_text_memorization(parts, "a digit three")
    latents = initial_latents(parts, 1, gen())
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            mitigate_prompt_embeds(parts, latents, threshold=bad, prompt="a digit")
        with pytest.raises(ValueError, match="threshold"):
            wen_filtered_loss(torch.ones(2), torch.ones(2), threshold=bad)
    with pytest.raises(ValueError, match="exactly one"):
        mitigate_prompt_embeds(parts, latents, threshold=1.0)
    with pytest.raises(ValueError, match="latents"):
        mitigate_prompt_embeds(parts, torch.zeros(1, 3, 8, 8), threshold=1.0, prompt="a digit")
    with pytest.raises(ValueError, match="num_generations"):
        detect_text_memorization(parts, ["a"], num_generations=0)
    with pytest.raises(ValueError, match="model_max_length"):
        build_word_tokenizer(["a"], model_max_length=2)
    ddpm = DDPMScheduler()
    embeds = encode_prompts(parts, ["a", "digit"])
    with pytest.raises(ValueError, match="uncond_embeds"):
        text_conditional_ddpm_loss(parts.unet, torch.zeros(2, 1, 8, 8), embeds, embeds, ddpm, threshold=1.0)
    with pytest.raises(ValueError, match="prompt_embeds"):
        text_conditional_ddpm_loss(parts.unet, torch.zeros(3, 1, 8, 8), embeds, embeds[:1], ddpm)
