"""Does the p-Laplace flux find memorised training images? A tiny score model on sklearn digits with duplicates.

Training set: ``--n_duplicated`` digits each repeated ``--copies`` times (the "memorised" images) plus ``--n_unique``
digits seen once; ``--n_holdout`` further digits are never trained on. A ScoreModel (VP SDE, epsilon prediction,
the benchmarks' tiny UNet2DModel) is trained from scratch with the project's denoising score-matching loss
(AdamW, ``--steps`` steps of ``--batch_size``). Then ``memorization_scores`` (-flux of the learned score through the
sphere of radius ``radius_scale * sigma_t * sqrt(d)`` around alpha_t x) ranks all duplicated images against
``--n_eval_unique`` unique training images, for each (t, p, radius_scale) in ``--settings``, and we report the ROC
AUC (duplicated = positive) and the AUC for unique training vs held-out images. Baseline: the per-image DSM loss
at each t of ``--baseline_times`` (lower = more memorised), averaged over ``--n_directions`` noise draws (as many
model evaluations as one flux).

    python benchmarks/memorization_p_laplace.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_malloc_env, machine, save_figure, tiny_unet, train_dsm, write_report  # noqa: E402

ensure_malloc_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from diffusers_msgm import ScoreModel  # noqa: E402
from diffusers_msgm.audit import memorization_scores  # noqa: E402
from diffusers_msgm.data import ImageTransform, load_digits_dataset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_duplicated", type=int, default=30)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--n_unique", type=int, default=1000)
    p.add_argument("--n_holdout", type=int, default=100)
    p.add_argument("--n_eval_unique", type=int, default=150, help="unique training images scored (negatives)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n_directions", type=int, default=64)
    p.add_argument("--settings", default="0.01:1:1,0.05:1:1,0.1:1:1,0.1:2:1,0.1:1:0.5",
                   help="comma-separated t:p:radius_scale")
    p.add_argument("--baseline_times", default="0.01,0.1", help="t values of the DSM-loss baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="docs/benchmarks/memorization_p_laplace.md")
    p.add_argument("--figure", default="docs/images/memorization_p_laplace.png")
    args = p.parse_args(argv)
    args.settings = [tuple(float(v) for v in s.split(":")) for s in args.settings.split(",")]
    if any(len(s) != 3 for s in args.settings):
        raise ValueError("--settings must be comma-separated t:p:radius_scale triples")
    args.baseline_times = [float(v) for v in args.baseline_times.split(",") if v]
    return args


def build_splits(args):
    """(train set with duplicates, duplicated images, unique images, held-out images) in [-1, 1]."""
    data = load_digits_dataset("all")
    transform = ImageTransform(resolution=8, channels=1)
    images = torch.stack([transform(img) for img in data["image"]])
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_dup, n_uni = args.n_duplicated, args.n_unique
    if n_dup + n_uni + args.n_holdout > images.shape[0]:
        raise ValueError(f"only {images.shape[0]} digits available")
    dup, uni = images[order[:n_dup]], images[order[n_dup : n_dup + n_uni]]
    holdout = images[order[n_dup + n_uni : n_dup + n_uni + args.n_holdout]]
    train = torch.cat([dup.repeat(args.copies, 1, 1, 1), uni])
    return train, dup, uni, holdout


def train(args, train_set):
    torch.manual_seed(args.seed)
    model = ScoreModel.from_unet(tiny_unet(8), sde_type="vp", prediction_type="epsilon")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = train_dsm(model, train_set, opt, args.steps, args.batch_size,
                       torch.Generator().manual_seed(args.seed + 1), log_every=200)
    return model.eval(), float(np.mean(losses[-100:]))


@torch.no_grad()
def dsm_loss_per_image(model, images, t, n_draws, seed):
    """Mean over n_draws of ||sigma_t s(x_t, t) + z||^2 / d at fixed t (lower = fits the image better)."""
    gen, total = torch.Generator().manual_seed(seed), torch.zeros(images.shape[0])
    alpha, sigma = (float(c) for c in model.sde.marginal_coefficients(torch.tensor(t)))
    for _ in range(n_draws):
        z = torch.randn(images.shape, generator=gen)
        total += (sigma * model(alpha * images + sigma * z, t).score + z).flatten(1).pow(2).mean(1)
    return total / n_draws


def auc(pos, neg):
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(labels, np.r_[pos, neg])), labels, np.r_[pos, neg]


def plot(path, rows, best):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        fpr, tpr, _ = roc_curve(row["labels"], row["values"])
        ax_roc.plot(fpr, tpr, label=f"{row['name']} (AUC {row['auc']:.3f})")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set_xlabel("false-positive rate (unique images)"), ax_roc.set_ylabel("true-positive rate (duplicated)")
    ax_roc.set_title("ROC: duplicated vs unique training images", fontsize=10)
    ax_roc.legend(fontsize=7)
    bins = np.linspace(min(v.min() for v in best["groups"].values()), max(v.max() for v in best["groups"].values()), 40)
    for name, values in best["groups"].items():
        ax_hist.hist(values, bins=bins, alpha=0.5, density=True, label=f"{name} ({len(values)})")
    ax_hist.set_xlabel(f"memorization score, {best['name']}"), ax_hist.set_ylabel("density")
    ax_hist.set_title("score histogram (higher = more memorised)", fontsize=10)
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/memorization_p_laplace.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    train_set, dup, uni, holdout = build_splits(args)
    model, final_loss = train(args, train_set)
    train_seconds = time.perf_counter() - start
    print(f"trained {args.steps} steps in {train_seconds:.0f} s, final loss {final_loss:.4f}", flush=True)
    neg = uni[: args.n_eval_unique]
    rows = []
    for i, (t, p, scale) in enumerate(args.settings):
        tic = time.perf_counter()
        scores = memorization_scores(model, torch.cat([dup, neg, holdout]), t=t, p=p, radius_scale=scale,
                                     n_directions=args.n_directions, generator=torch.Generator().manual_seed(i))
        s_dup, s_uni, s_out = (v.numpy() for v in scores.split([dup.shape[0], neg.shape[0], holdout.shape[0]]))
        a, labels, values = auc(s_dup, s_uni)
        row = dict(name=f"flux t={t:g} p={p:g} r={scale:g}", auc=a, labels=labels, values=values,
                   auc_member=auc(s_uni, s_out)[0] if len(s_out) else float("nan"), seconds=time.perf_counter() - tic,
                   means=(s_dup.mean(), s_uni.mean(), s_out.mean() if len(s_out) else float("nan")),
                   groups={"duplicated": s_dup, "unique (trained once)": s_uni, "held out": s_out})
        rows.append(row)
        print(f"{row['name']}: AUC {a:.3f} (unique vs held-out {row['auc_member']:.3f}) in {row['seconds']:.0f} s",
              flush=True)
    baselines = []
    for t0 in args.baseline_times:
        tic = time.perf_counter()
        loss = -dsm_loss_per_image(model, torch.cat([dup, neg, holdout]), t0, args.n_directions, args.seed + 7)
        l_dup, l_uni, l_out = (v.numpy() for v in loss.split([dup.shape[0], neg.shape[0], holdout.shape[0]]))
        a, labels, values = auc(l_dup, l_uni)
        baselines.append(dict(name=f"baseline: -DSM loss t={t0:g}", t=t0, auc=a, labels=labels, values=values,
                              auc_member=auc(l_uni, l_out)[0] if len(l_out) else float("nan"),
                              seconds=time.perf_counter() - tic, means=(l_dup.mean(), l_uni.mean(), l_out.mean())))
        print(f"{baselines[-1]['name']}: AUC {a:.3f}", flush=True)
    best = max(rows, key=lambda r: r["auc"])
    plot(args.figure, rows + baselines, best)
    wall = time.perf_counter() - start
    lines = [
        "# Memorisation detection with the p-Laplace flux (digits, duplicated training images)",
        "",
        f"{args.n_duplicated} sklearn digits (8x8, [-1, 1]) repeated {args.copies} times each plus {args.n_unique} "
        f"digits seen once ({train_set.shape[0]} training images); ScoreModel (VP SDE, epsilon, tiny UNet2DModel "
        f"(32, 64, 64)) trained from scratch with the DSM loss: {args.steps} steps of {args.batch_size}, AdamW "
        f"lr {args.lr:g}, final loss (mean of last 100 steps) {final_loss:.4f}, training {train_seconds:.0f} s. "
        f"`memorization_scores` = -flux of the learned score through the sphere of radius "
        f"`radius_scale * sigma_t * sqrt(64)` around `alpha_t x`, {args.n_directions} directions per image. "
        f"AUC: duplicated ({args.n_duplicated}, positive) vs {neg.shape[0]} unique training images; membership "
        f"AUC: those unique training images vs {holdout.shape[0]} held-out digits (chance = 0.5).",
        "",
        f"Command: `{command.strip()}` (seed {args.seed}). Machine: {machine()}. Wall time: {wall:.0f} s "
        f"(1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: the cores are "
        "shared with other jobs).",
        "",
        "| scorer | t | p | radius_scale | AUC dup vs unique | AUC unique vs held-out | mean score dup / unique "
        "/ held-out | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, (t, p, scale) in zip(rows, args.settings):
        m = row["means"]
        lines.append(f"| -flux (memorization_scores) | {t:g} | {p:g} | {scale:g} | {row['auc']:.3f} | "
                     f"{row['auc_member']:.3f} | {m[0]:.3f} / {m[1]:.3f} / {m[2]:.3f} | {row['seconds']:.0f} |")
    for b in baselines:
        m = b["means"]
        lines.append(f"| baseline: -DSM loss per image | {b['t']:g} | - | - | {b['auc']:.3f} | "
                     f"{b['auc_member']:.3f} | {m[0]:.3f} / {m[1]:.3f} / {m[2]:.3f} | {b['seconds']:.0f} |")
    lines += ["", f"![ROC and score histogram]({os.path.relpath(args.figure, os.path.dirname(args.output))})", ""]
    write_report(args.output, "\n".join(lines))
    print("\n".join(lines))
    return rows, baselines


if __name__ == "__main__":
    main()
