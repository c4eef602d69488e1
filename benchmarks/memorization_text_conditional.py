"""Wen et al. (ICLR 2024) memorization detection / explanation / mitigation on a tiny text-to-digit model.

A pixel-space UNet2DConditionModel (8x8 sklearn digits) is trained with a frozen, randomly initialised tiny
CLIPTextModel (``diffusers_msgm.audit.tiny_text``) and 10% caption dropout. Captions of ordinary images are drawn
afresh at every step from a grammar ("a {adj} {noun} {digit}"); ``--n_memorized`` images are instead duplicated
``--duplicates`` times, each with its own fixed caption starting with a unique made-up word (e.g. "zorvak a neat
digit three"): the setting in which Stable Diffusion memorizes. Then:

* detection: d_t of the memorized captions (positives) vs ``--n_normal_prompts`` grammar captions (negatives):
  AUC and TPR at 1% FPR, for the mean over steps and for the first step only;
* explanation: how often the unique word gets the largest token significance;
* inference mitigation (prompt-embedding optimisation) and training mitigation (a second model trained with the
  per-sample filter; its detection is evaluated on the first step only, to save time): similarity of the
  memorized captions' generations to the memorized image, before and after, and the digit accuracy of the
  generations (a logistic-regression judge on the 8x8 digits).

    python benchmarks/memorization_text_conditional.py [--train_steps 900] [--skip_train_mitigation]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_malloc_env, machine  # noqa: E402
from _memorization_text_report import write_outputs  # noqa: E402

from diffusers_msgm.audit.text_conditional import (  # noqa: E402
    TextConditionalComponents,
    detect_text_memorization,
    encode_prompts,
    initial_latents,
    token_significance,
)
from diffusers_msgm.audit.text_conditional_mitigation import (  # noqa: E402
    generate_from_embeds,
    mitigate_prompt_embeds,
    per_sample_text_magnitude,
    text_conditional_ddpm_loss,
)
from diffusers_msgm.audit.tiny_text import build_tiny_text_stack  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "memorization_text_conditional"
ADJECTIVES = ["small", "large", "thin", "bold", "neat", "messy"]
NOUNS = ["digit", "number", "numeral", "figure"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYLLABLES = ["zor", "vak", "mil", "teb", "qua", "rin", "dox", "pel", "gan", "sul", "vex", "tor"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--normal_per_class", type=int, default=30)
    p.add_argument("--n_memorized", type=int, default=20)
    p.add_argument("--duplicates", type=int, default=20)
    p.add_argument("--n_normal_prompts", type=int, default=120)
    p.add_argument("--train_steps", type=int, default=900)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.995, help="the evaluated weights are an EMA (with warm-up)")
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--mitigation_quantile", type=float, default=0.5,
                   help="inference threshold: this quantile of the normal prompts' first-step d")
    p.add_argument("--train_threshold_quantile", type=float, default=0.5,
                   help="training threshold: this quantile of per-sample d of normal training samples (baseline)")
    p.add_argument("--skip_train_mitigation", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks", f"{NAME}.md"))
    p.add_argument("--figure_prefix", default=os.path.join(ROOT, "docs", "images", NAME))
    return p.parse_args()


def build_data(args, rng: np.random.Generator):
    """Images in [-1, 1] (N, 1, 8, 8), labels, which are memorized, and their fixed captions."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 8.0 - 1.0).astype(np.float32)
    labels = bunch.target
    order = rng.permutation(len(labels))
    per_class = [order[labels[order] == c] for c in range(10)]
    rounds = -(-args.n_memorized // 10)  # memorized images: round-robin over the classes
    memorized = [per_class[c][j] for j in range(rounds) for c in range(10)][: args.n_memorized]
    normal = [i for c in range(10) for i in per_class[c][rounds: rounds + args.normal_per_class]]
    tags = set()
    while len(tags) < len(memorized):
        tags.add("".join(rng.choice(SYLLABLES, 2)))
    # the unique word comes first: with CLIP's causal attention no grammar caption then shares a prefix (and
    # thus identical conditional embeddings) with a memorized caption
    captions = [f"{tag} a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {DIGITS[labels[i]]}"
                for i, tag in zip(memorized, sorted(tags))]
    return images, labels, np.array(normal), np.array(memorized), captions


def grammar_prompts(label: int) -> list[str]:
    return [f"a {a} {n} {DIGITS[label]}" for a in ADJECTIVES for n in NOUNS]


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)


def schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DDPMScheduler(**kw), DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class TrainingSet:
    """Per-step batches: the sample indices and their caption embeddings (grammar captions re-drawn each time)."""

    def __init__(self, parts, images, labels, normal, memorized, captions):
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.labels, self.normal, self.memorized = labels, normal, memorized
        self.grammar = torch.stack([encode_prompts(parts, grammar_prompts(c)) for c in range(10)])  # (10, G, L, D)
        self.memorized_embeds = encode_prompts(parts, captions)
        self.uncond = encode_prompts(parts, [""])

    def pool(self, duplicates: int) -> np.ndarray:
        """Sample ids; memorized ones are stored as -(k + 1) for the k-th memorized image, ``duplicates`` times."""
        return np.concatenate([self.normal, np.repeat(-(np.arange(len(self.memorized)) + 1), duplicates)])

    def batch(self, ids: np.ndarray, rng: np.random.Generator, dropout: float):
        index = np.where(ids >= 0, ids, self.memorized[np.maximum(-ids - 1, 0)])
        embeds = []
        for sid, i in zip(ids, index):
            if sid >= 0:
                g = self.grammar[self.labels[i]]
                embeds.append(g[rng.integers(len(g))])
            else:
                embeds.append(self.memorized_embeds[-sid - 1])
        embeds = torch.stack(embeds)
        drop = torch.from_numpy(rng.random(len(ids)) < dropout)
        embeds = torch.where(drop.view(-1, 1, 1), self.uncond.expand_as(embeds), embeds)
        return self.images[index], embeds


def train(args, data: TrainingSet, ddpm, threshold: float | None, seed: int):
    torch.manual_seed(seed)
    unet = make_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    pool = data.pool(args.duplicates)
    kept = {"normal": [0, 0], "memorized": [0, 0]}
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    start = time.perf_counter()
    for step in range(args.train_steps):
        ids = rng.choice(pool, args.batch_size, replace=False)
        x0, embeds = data.batch(ids, rng, args.caption_dropout)
        out = text_conditional_ddpm_loss(unet, x0, embeds, data.uncond, ddpm, threshold=threshold, generator=gen)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        for name, mask in (("normal", ids >= 0), ("memorized", ids < 0)):
            kept[name][0] += int(out.keep[torch.from_numpy(mask)].sum())
            kept[name][1] += int(mask.sum())
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}: loss {out.loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    return unet.eval(), {k: v[0] / max(v[1], 1) for k, v in kept.items()}, time.perf_counter() - start


@torch.no_grad()
def training_magnitudes(unet, data: TrainingSet, ddpm, rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample d at random t for every distinct normal sample and every memorized one (x 8 draws)."""
    out = {}
    for name, ids in (("normal", data.normal), ("memorized", np.repeat(-(np.arange(len(data.memorized)) + 1), 8))):
        x0, embeds = data.batch(ids, rng, 0.0)
        t = torch.from_numpy(rng.integers(0, 1000, len(ids)))
        x_t = ddpm.add_noise(x0, torch.randn_like(x0), t)
        eps_c = unet(x_t, t, encoder_hidden_states=embeds).sample
        eps_u = unet(x_t, t, encoder_hidden_states=data.uncond.expand_as(embeds)).sample
        out[name] = per_sample_text_magnitude(eps_c, eps_u).numpy()
    return out["normal"], out["memorized"]


def roc_metrics(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, tuple]:
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(tpr[fpr <= 0.01].max()), (fpr, tpr)


def similarity(gen: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Pearson correlation, RMS distance) of each generation (n, 64) with the target image (64,)."""
    g = gen - gen.mean(1, keepdims=True)
    t = target - target.mean()
    corr = (g @ t) / (np.linalg.norm(g, axis=1) * np.linalg.norm(t) + 1e-8)
    return corr, np.sqrt(((gen - target) ** 2).mean(1))


def _generate(args, parts, prompt_embeds, seed: int) -> torch.Tensor:
    latents = initial_latents(parts, args.generations, torch.Generator().manual_seed(seed))
    return generate_from_embeds(parts, prompt_embeds, latents, args.inference_steps, args.guidance_scale).clamp(-1, 1)


def evaluate(args, parts, data: TrainingSet, images, labels, captions, normal_prompts, judge, mitigate_threshold,
             full: bool = True):
    """Detection (first step only unless ``full``), explanation and prompt mitigation (only if ``full``), and
    generations of the memorized prompts and of 20 normal prompts."""
    res: dict = {}
    m = len(captions)
    start = time.perf_counter()
    det = detect_text_memorization(parts, captions + normal_prompts, args.inference_steps, args.generations,
                                   args.guidance_scale, first_step_only=not full,
                                   generator=torch.Generator().manual_seed(args.seed + 1))
    res["detect_seconds"] = time.perf_counter() - start
    res["scores"] = {"first": det.first_step_score.numpy()}
    if full:
        res["scores"]["mean"] = det.score.numpy()
        res["trajectory"] = det.magnitudes.mean(1).numpy()
    res["roc"] = {k: roc_metrics(v[:m], v[m:]) for k, v in res["scores"].items()}
    if mitigate_threshold is None:
        mitigate_threshold = float(np.quantile(res["scores"]["first"][m:], args.mitigation_quantile))
    res["mitigate_threshold"] = mitigate_threshold
    top_is_tag, plain, mitigated, iters, d_after, grids = 0, [], [], [], [], []
    for k, caption in enumerate(captions):
        embeds = encode_prompts(parts, [caption])
        pair = [_generate(args, parts, embeds, 10_000 + k)]
        if full:
            sig = token_significance(parts, caption, args.generations, args.inference_steps,
                                     torch.Generator().manual_seed(args.seed + 2 + k))
            top_is_tag += int(int(sig.grad_norms.argmax()) == 0)
            latents = initial_latents(parts, args.generations, torch.Generator().manual_seed(10_000 + k))
            mit = mitigate_prompt_embeds(parts, latents, mitigate_threshold, prompt_embeds=embeds,
                                         num_inference_steps=args.inference_steps)
            iters.append(mit.num_iterations)
            d_after.append((mit.magnitudes[0], mit.magnitudes[-1]))
            pair.append(_generate(args, parts, mit.prompt_embeds, 10_000 + k))
            mitigated.append(pair[1].flatten(1).numpy())
        plain.append(pair[0].flatten(1).numpy())
        grids.append(pair)
    res["top_is_tag"] = top_is_tag / m
    flat = images.reshape(len(images), -1)
    res["nn_corr"] = np.array([similarity(flat[data.normal], flat[i])[0].max() for i in data.memorized])
    res["iterations"], res["d_before_after"], res["grids"] = np.array(iters), np.array(d_after), grids
    targets = images[data.memorized].reshape(m, -1)
    digit = labels[data.memorized]
    for name, gens in (("plain", plain), ("mitigated", mitigated)):
        if not gens:
            continue
        corr = np.stack([similarity(g, t)[0] for g, t in zip(gens, targets)])
        rms = np.stack([similarity(g, t)[1] for g, t in zip(gens, targets)])
        pred = np.stack([judge.predict(g) for g in gens])
        res[name] = {"corr": corr, "rms": rms, "acc": float((pred == digit[:, None]).mean())}
    correct = 0
    for k, prompt in enumerate(normal_prompts[:20]):
        gens = _generate(args, parts, encode_prompts(parts, [prompt]), 20_000 + k).flatten(1).numpy()
        correct += int((judge.predict(gens) == DIGITS.index(prompt.split()[-1])).sum())
    res["normal_acc"] = correct / (min(20, len(normal_prompts)) * args.generations)
    return res


def main() -> None:
    ensure_malloc_env()
    torch.set_num_threads(1)
    args = parse_args()
    wall = time.perf_counter()
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(args.seed)
    images, labels, normal, memorized, captions = build_data(args, rng)
    words = ADJECTIVES + NOUNS + DIGITS + ["a"] + [c.split()[0] for c in captions]
    tokenizer, text_encoder = build_tiny_text_stack(words, model_max_length=8, hidden_size=32, seed=args.seed)
    ddpm, ddim = schedulers()
    judge = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1), labels)
    probe = TextConditionalComponents(make_unet(), text_encoder, tokenizer, ddim)
    data = TrainingSet(probe, images, labels, normal, memorized, captions)
    all_normal = [p for c in range(10) for p in grammar_prompts(c)]
    normal_prompts = [all_normal[i] for i in rng.permutation(len(all_normal))[: args.n_normal_prompts]]
    print(f"{len(normal)} normal images, {len(memorized)} memorized x {args.duplicates}; training baseline", flush=True)
    unet, kept, train_seconds = train(args, data, ddpm, None, args.seed)
    base_parts = TextConditionalComponents(unet, text_encoder, tokenizer, ddim)
    base = evaluate(args, base_parts, data, images, labels, captions, normal_prompts, judge, None)
    base.update(train_seconds=train_seconds, kept=kept)
    print(f"baseline AUC {base['roc']['mean'][0]:.3f} (first step {base['roc']['first'][0]:.3f})", flush=True)
    d_normal, d_mem = training_magnitudes(unet, data, ddpm, np.random.default_rng(args.seed + 3))
    train_threshold = float(np.quantile(d_normal, args.train_threshold_quantile))
    filtered = None
    if not args.skip_train_mitigation:
        print(f"training with the per-sample filter, threshold {train_threshold:.4f}", flush=True)
        unet_f, kept_f, seconds_f = train(args, data, ddpm, train_threshold, args.seed)
        filtered = evaluate(args, TextConditionalComponents(unet_f, text_encoder, tokenizer, ddim), data, images,
                            labels, captions, normal_prompts, judge, base["mitigate_threshold"], full=False)
        filtered.update(train_seconds=seconds_f, kept=kept_f)
    write_outputs(args, base, filtered, (d_normal, d_mem, train_threshold), captions, images[memorized],
                  time.perf_counter() - wall, machine())


if __name__ == "__main__":
    main()
