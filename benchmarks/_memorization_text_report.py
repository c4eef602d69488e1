"""Markdown table and figures of ``benchmarks/memorization_text_conditional.py``."""

from __future__ import annotations

import os
import sys

import numpy as np
from _common import save_figure, write_report


def _copy_rate(res: dict, name: str) -> float:
    """Share of generations correlating with their memorized image more than any other training image does."""
    return float((res[name]["corr"] > res["nn_corr"][:, None]).mean())


def _row(label: str, res: dict, name: str) -> str:
    r = res[name]
    return (f"| {label} | {r['corr'].mean():.3f} | {np.median(r['corr']):.3f} | {_copy_rate(res, name):.1%} | "
            f"{r['rms'].mean():.3f} | {r['acc']:.1%} |")


def _command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:])


def _savefig(fig, path: str) -> None:
    save_figure(fig, path, bbox_inches="tight")


def _figures(args, base, filtered, train_d, memorized_images) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = args.n_memorized
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    for res, tag in ((base, "baseline"), (filtered, "filter-trained")):
        if res is None:
            continue
        for key, style in (("mean", "-"), ("first", "--")):
            if key not in res["roc"]:
                continue
            auc, _, (fpr, tpr) = res["roc"][key]
            ax[0].plot(fpr, tpr, style, label=f"{tag}, {key}-step d (AUC {auc:.3f})")
    ax[0].set(xscale="log", xlim=(1e-3, 1), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax[0].legend(fontsize=7)
    s = base["scores"]["mean"]
    bins = np.linspace(0, s.max() * 1.05, 40)
    ax[1].hist(s[m:], bins, alpha=0.6, label="normal prompts")
    ax[1].hist(s[:m], bins, alpha=0.6, label="memorized prompts")
    ax[1].set(xlabel="mean d_t", title="baseline detection score")
    ax[1].legend(fontsize=8)
    traj = base["trajectory"]
    ax[2].plot(traj[m:].mean(0), label="normal prompts")
    ax[2].plot(traj[:m].mean(0), label="memorized prompts")
    ax[2].set(xlabel="sampling step", ylabel="d_t", title="d_t along the DDIM trajectory (baseline)")
    ax[2].legend(fontsize=8)
    d_normal, d_mem, thr = train_d
    bins = np.linspace(0, max(d_normal.max(), d_mem.max()) * 1.05, 40)
    ax[3].hist(d_normal, bins, alpha=0.6, label="normal samples")
    ax[3].hist(d_mem, bins, alpha=0.6, label="memorized samples")
    ax[3].axvline(thr, color="k", ls=":", label=f"train threshold {thr:.3f}")
    ax[3].set(xlabel="per-sample d at random t", title="training-time d (baseline model)")
    ax[3].legend(fontsize=8)
    curves = f"{args.figure_prefix}.png"
    _savefig(fig, curves)
    plt.close(fig)

    rows = min(8, m)
    columns = [("plain", base["grids"], 0), ("prompt-mitigated", base["grids"], 1)]
    if filtered is not None:
        columns.append(("filter-trained", filtered["grids"], 0))
    n = args.generations
    fig, ax = plt.subplots(rows, 1 + n * len(columns), figsize=(1.0 * (1 + n * len(columns)), 1.05 * rows),
                           squeeze=False)
    for r in range(rows):
        ax[r, 0].imshow(memorized_images[r], cmap="gray", vmin=-1, vmax=1)
        for c, (_, grids, which) in enumerate(columns):
            for g in range(n):
                ax[r, 1 + c * n + g].imshow(grids[r][which][g, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    for a in ax.flat:
        a.set_xticks([])
        a.set_yticks([])
    ax[0, 0].set_title("memorized", fontsize=8)
    for c, (label, _, _) in enumerate(columns):
        ax[0, 1 + c * n].set_title(label, fontsize=8, loc="left")
    samples = f"{args.figure_prefix}_samples.png"
    _savefig(fig, samples)
    plt.close(fig)
    return curves, samples


def write_outputs(args, base, filtered, train_d, captions, memorized_images, wall: float, machine: str) -> None:
    curves, samples = _figures(args, base, filtered, train_d, memorized_images)
    m = args.n_memorized
    docs = os.path.dirname(os.path.abspath(args.output))
    lines = [
        "# Memorization in a text-conditional model (Wen et al., ICLR 2024)",
        "",
        f"Command: `{_command()}`  ",
        f"Machine: {machine}, shared with other jobs. Wall time: {wall:.0f} s (baseline training "
        f"{base['train_seconds']:.0f} s, detection of {m + args.n_normal_prompts} prompts {base['detect_seconds']:.0f} s"
        + (f", filter-trained model {filtered['train_seconds']:.0f} s" if filtered else "") + ").",
        "",
        "## Setting",
        "",
        f"Pixel-space `UNet2DConditionModel` (32, 64; cross-attention at 4x4) on 8x8 sklearn digits, frozen random "
        f"tiny `CLIPTextModel` (2 layers, width 32, word-level tokenizer, max length 8), DDPM scaled-linear betas "
        f"(SD's), {args.train_steps} AdamW steps (lr {args.learning_rate}, batch {args.batch_size}, EMA {args.ema_decay}), caption dropout "
        f"{args.caption_dropout}. Training set: {args.normal_per_class} images per digit with a grammar caption "
        f"re-drawn every step (\"a {{adjective}} {{noun}} {{digit}}\", 240 captions) plus {m} memorized images, "
        f"each duplicated {args.duplicates} times with one fixed caption starting with a unique made-up word "
        f"(e.g. \"{captions[0]}\"). Detection: DDIM {args.inference_steps} steps, {args.generations} generations "
        f"per prompt, guidance {args.guidance_scale}; positives = the {m} memorized captions, negatives = "
        f"{args.n_normal_prompts} grammar captions. Seed {args.seed}.",
        "",
        "## Detection",
        "",
        "| model | score | AUC | TPR@1%FPR | mean score, memorized | mean score, normal |",
        "|---|---|---|---|---|---|",
    ]
    for res, tag in ((base, "baseline"), (filtered, "filter-trained")):
        if res is None:
            continue
        for key, label in (("mean", f"d_t mean over {args.inference_steps} steps"), ("first", "first-step d_T")):
            if key not in res["roc"]:
                continue
            auc, tpr, _ = res["roc"][key]
            s = res["scores"][key]
            lines.append(f"| {tag} | {label} | {auc:.3f} | {tpr:.3f} | {s[:m].mean():.4f} | {s[m:].mean():.4f} |")
    lines += [
        "",
        "## Explanation",
        "",
        f"Token significance (first-step gradient norms, BOS skipped, {args.generations} generations): the unique "
        f"made-up word is the most significant token for {base['top_is_tag']:.0%} of the {m} memorized captions "
        f"(chance: 1/5).",
        "",
        "## Mitigation",
        "",
        f"Similarity of the memorized captions' generations ({args.generations} seeds each, same starting noise "
        "in every row) to their memorized training image: Pearson correlation of the pixels, the share of "
        "*copies* (correlation above that of the memorized image's nearest other training image), RMS distance "
        "in [-1, 1], and the share of generations a logistic-regression digit judge reads as the caption's digit.",
        "",
        "| generations | mean corr. | median corr. | copies | RMS distance | caption digit |",
        "|---|---|---|---|---|---|",
        _row("baseline, plain", base, "plain"),
        _row("baseline, inference mitigation", base, "mitigated"),
    ]
    if filtered is not None:
        lines.append(_row("filter-trained, plain", filtered, "plain"))
    acc = f"{base['normal_acc']:.1%} (baseline)"
    if filtered is not None:
        acc += f", {filtered['normal_acc']:.1%} (filter-trained)"
    lines += ["", f"Normal prompts (20 captions x {args.generations} seeds, no mitigation): caption digit {acc}."]
    d = base["d_before_after"]
    lines += [
        "",
        f"Inference mitigation: threshold {base['mitigate_threshold']:.4f} (the {args.mitigation_quantile:.0%} "
        f"quantile of the normal prompts' first-step d_T), AdamW lr 0.05, <= 10 iterations: first-step d_T "
        f"{d[:, 0].mean():.4f} -> {d[:, 1].mean():.4f} on average, {base['iterations'].mean():.1f} iterations, "
        f"{(d[:, 1] <= base['mitigate_threshold']).mean():.0%} of prompts reached the threshold.",
        "",
    ]
    d_normal, d_mem, thr = train_d
    lines.append(
        f"Training-time d of the baseline model at random t: normal samples mean {d_normal.mean():.4f}, memorized "
        f"samples mean {d_mem.mean():.4f}; training threshold {thr:.4f} = the "
        f"{args.train_threshold_quantile:.0%} quantile of the normal samples' d (calibrated on the baseline run).")
    if filtered is not None:
        lines.append(
            f"With it, the filter kept {filtered['kept']['normal']:.1%} of normal and {filtered['kept']['memorized']:.1%}"
            f" of memorized samples over training.")
    else:
        lines.append("Training-time mitigation was skipped in this run (`--skip_train_mitigation`).")
    lines += ["", f"![curves](../images/{os.path.basename(curves)})", "",
              f"Rows: memorized image, then {args.generations} generations per column group (same noise).", "",
              f"![samples](../images/{os.path.basename(samples)})", ""]
    write_report(os.path.join(docs, os.path.basename(args.output)), "\n".join(lines))
    print("\n".join(lines))
