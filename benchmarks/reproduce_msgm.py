"""Reproduce MSGM's central claim: gold-standard retraining vs MSGM, on one dataset and one forgotten class.

Trains, with the project's accelerate scripts (in-process, CPU or whatever accelerate picks):

1. ``original``      — ``train_score`` on all classes, ``--pretrain_steps``;
2. ``gold standard`` — ``train_score --exclude_classes FORGET`` (machine-unlearning gold standard: re-trained
   without the forgotten class), ``--pretrain_steps``;
3. ``MSGM fine-tune (<variant>)`` — ``unlearn`` from (1) for each variant in ``--variants``, ``--finetune_steps``;
4. ``MSGM re-trained`` — ``unlearn --mode retrain`` from scratch, ``--pretrain_steps``, variant ``--retrain_variant``;

then evaluates every model under one :class:`~diffusers_msgm.evaluation.EvaluationSetup` (same sampler, NFE, sample
count, prior-noise seed; FID/KID on the UGR classifier's features against held-out retained-class images; bits/dim
by the probability-flow ODE on held-out retained vs forgotten images), and writes a markdown table, a JSON file,
a bar plot and a sample grid.

    python benchmarks/reproduce_msgm.py --dataset fashion_mnist --forget Trouser --resolution 16

``--smoke`` shrinks everything to a CI-sized run (a test runs it on digits).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from _common import ensure_malloc_env, machine, save_figure, write_report  # noqa: E402

from diffusers_msgm.data import load_image_dataset  # noqa: E402
from diffusers_msgm.evaluation import (  # noqa: E402
    evaluate_pipeline,
    prepare_evaluation,
    write_json_atomic,
)
from diffusers_msgm.image_utils import images_to_grid, save_image_atomic  # noqa: E402
from diffusers_msgm.losses import FORGET_VARIANTS  # noqa: E402
from diffusers_msgm.metrics.classifier import train_classifier  # noqa: E402
from diffusers_msgm.pipelines import MSGMPipeline  # noqa: E402
from diffusers_msgm.training import train_score, unlearn  # noqa: E402

SMOKE = dict(pretrain_steps=30, finetune_steps=3, num_images=50, num_inference_steps=4, bpd_images=4,
             bpd_solver="euler", bpd_steps=3, num_ref=60, classifier_epochs=1, batch_size=16, kid_subset_size=20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits, fashion_mnist, or a labelled dataset dir / Hub name")
    p.add_argument("--data_root", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--forget", nargs="+", default=["1"], help="class ids or names to forget")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--output_dir", default="reproduce-msgm", help="models, classifier, results.json")
    p.add_argument("--report", default=None, help="markdown table (default docs/benchmarks/reproduce_msgm_<dataset>.md)")
    p.add_argument("--figure", default=None, help="bar plot (default docs/images/reproduce_msgm_<dataset>.png)")
    p.add_argument("--pretrain_steps", type=int, default=3000, help="original, gold standard, MSGM re-trained")
    p.add_argument("--finetune_steps", type=int, default=150, help="each MSGM fine-tune")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="pretraining / re-training")
    p.add_argument("--finetune_learning_rate", type=float, default=5e-4)
    p.add_argument("--variants", nargs="+", default=list(FORGET_VARIANTS), choices=FORGET_VARIANTS)
    p.add_argument("--retrain_variant", default="obtuse", choices=FORGET_VARIANTS)
    p.add_argument("--forget_weight", type=float, default=0.1)
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--num_inference_steps", type=int, default=100, help="Euler-Maruyama steps = NFE")
    p.add_argument("--num_ref", type=int, default=2000)
    p.add_argument("--bpd_images", type=int, default=64, help="held-out images per group for bits/dim")
    p.add_argument("--bpd_solver", default="heun", choices=["rk45", "heun", "euler"])
    p.add_argument("--bpd_steps", type=int, default=50, help="fixed-step bpd solver steps")
    p.add_argument("--classifier_epochs", type=int, default=None)
    p.add_argument("--kid_subset_size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse models already in --output_dir")
    p.add_argument("--smoke", action="store_true", help="CI-sized settings: " + str(SMOKE))
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    name = os.path.basename(str(args.dataset).rstrip("/"))
    args.report = args.report or f"docs/benchmarks/reproduce_msgm_{name}.md"
    args.figure = args.figure or f"docs/images/reproduce_msgm_{name}.png"
    for flag in ("pretrain_steps", "finetune_steps", "num_inference_steps", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    return args


def _done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _card_seconds(path: str) -> float | None:
    """The "training seconds" fact of a reused model's card (None when absent)."""
    card = os.path.join(path, "README.md")
    found = re.search(r"training seconds\W+([0-9.]+)", open(card).read()) if os.path.isfile(card) else None
    return float(found.group(1)) if found else None


def train_models(args: argparse.Namespace) -> dict[str, dict]:
    """Train (or reuse) every model; returns {name: {"path", "steps", "seconds"}}."""
    common = ["--dataset_name", str(args.dataset), "--resolution", str(args.resolution), "--seed", str(args.seed),
              "--train_batch_size", str(args.batch_size), "--validation_steps", "0", "--logger", "none",
              "--num_validation_images", "16", "--validation_inference_steps", "20", "--checkpoints_total_limit", "1"]
    if args.data_root:
        common += ["--data_root", args.data_root]
    out, models = args.output_dir, {}

    def run(name: str, script, flags: list[str], steps: int) -> None:
        path = os.path.join(out, name.replace(" ", "_").replace("(", "").replace(")", ""))
        seconds = _card_seconds(path) if args.reuse and _done(path) else None
        if not (args.reuse and _done(path)):
            print(f"[{time.strftime('%H:%M:%S')}] training {name}: {steps} steps", flush=True)
            result = script.main(script.parse_args(common + ["--output_dir", path, "--max_train_steps", str(steps),
                                                              "--checkpointing_steps", str(steps)] + flags))
            seconds = round(result["seconds"], 1)
        models[name] = {"path": path, "steps": steps, "seconds": seconds}

    pretrain = ["--learning_rate", str(args.learning_rate), "--lr_warmup_steps", str(min(100, args.pretrain_steps // 10)),
                "--lr_scheduler", "cosine"]
    run("original", train_score, pretrain, args.pretrain_steps)
    run("gold standard", train_score, pretrain + ["--exclude_classes", *args.forget], args.pretrain_steps)
    msgm = ["--forget_labels", *args.forget, "--forget_weight", str(args.forget_weight), "--forget_every", "1",
            "--forget_batch_size", str(max(args.batch_size // 4, 1))]
    for variant in args.variants:
        run(f"MSGM fine-tune ({variant})", unlearn,
            msgm + ["--pretrained_model_name_or_path", models["original"]["path"], "--variant", variant,
                    "--learning_rate", str(args.finetune_learning_rate)], args.finetune_steps)
    run(f"MSGM re-trained ({args.retrain_variant})", unlearn,
        msgm + pretrain + ["--pretrained_model_name_or_path", models["original"]["path"], "--mode", "retrain",
                           "--variant", args.retrain_variant], args.pretrain_steps)
    return models


def classifier_for(args: argparse.Namespace) -> str:
    path = os.path.join(args.output_dir, "classifier")
    if args.reuse and os.path.isfile(os.path.join(path, "config.json")):
        return path
    train = load_image_dataset(args.dataset, "train", data_root=args.data_root)
    test = load_image_dataset(args.dataset, "test", data_root=args.data_root)
    clf, metrics = train_classifier(train, test, resolution=args.resolution, channels=1,
                                    epochs=args.classifier_epochs, seed=args.seed)
    clf.save_pretrained(path)
    write_json_atomic(metrics, os.path.join(path, "metrics.json"))
    print(f"classifier: test accuracy {metrics['test_accuracy']:.4f} ({metrics['train_seconds']:.0f} s)", flush=True)
    return path


def plot(results: dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = ["#777777", "#1f77b4"] + ["#d62728"] * (len(names) - 2)
    panels = [("ugr", "undesirable-generation rate"), ("fid", "FID (classifier features), retained classes")]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(range(len(names)), [results[n][key] for n in names], color=colors)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    axes[1].set_yscale("log")  # a collapsed model's FID is 10x the others'
    axes[1].set_title("FID (classifier features, log scale), retained classes", fontsize=10)
    if all("bpd_retained" in results[n] for n in names):
        xs = torch.arange(len(names)).float()
        axes[2].bar(xs - 0.2, [results[n]["bpd_retained"] for n in names], 0.4, label="retained test images")
        axes[2].bar(xs + 0.2, [results[n]["bpd_forgotten"] for n in names], 0.4, label="forgotten test images")
        axes[2].set_title("bits/dim (lower = more likely)", fontsize=10)
        axes[2].set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        axes[2].legend(fontsize=8)
        axes[2].axhline(0, color="k", lw=0.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    command = "python benchmarks/reproduce_msgm.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start_all = time.perf_counter()
    models = train_models(args)
    clf = classifier_for(args)
    bpd_kwargs = {"solver": args.bpd_solver, "num_steps": args.bpd_steps, "eps": 1e-3}
    setup = prepare_evaluation(args.dataset, args.forget, args.resolution, classifier=clf, data_root=args.data_root,
                               num_images=args.num_images, num_inference_steps=args.num_inference_steps,
                               seed=args.seed, num_ref=args.num_ref, bpd_images=args.bpd_images, bpd_kwargs=bpd_kwargs)
    setup.kid_subset_size = args.kid_subset_size
    results, grids = {}, []
    for name, info in models.items():
        pipe = MSGMPipeline.from_pretrained(info["path"])
        r = evaluate_pipeline(pipe, setup)
        grids.append(((r.pop("images")[:16] + 1) / 2).clamp(0, 1))
        results[name] = {**r, "train_steps": info["steps"], "train_seconds": info["seconds"]}
        print(f"[{time.strftime('%H:%M:%S')}] {name:32s} UGR {r['ugr']:.3f} FID {r['fid']:.2f} "
              f"bpd {r.get('bpd_retained', float('nan')):.3f}/{r.get('bpd_forgotten', float('nan')):.3f}", flush=True)
    total = time.perf_counter() - start_all
    write_json_atomic({"setup": setup.describe(), "results": results, "command": command, "seconds": total},
                      os.path.join(args.output_dir, "results.json"))
    grid_path = args.figure.replace(".png", "_samples.png")
    save_image_atomic(images_to_grid(torch.cat(grids).permute(0, 2, 3, 1).numpy(), nrow=16,
                                     scale=max(1, 32 // args.resolution), padding=2), grid_path)
    plot(results, args.figure, f"{args.dataset}: forgetting {setup.describe()['forget_names']}")
    write_report(args.report, report(args, setup, results, command, total, grid_path))
    print(open(args.report).read())
    return results


def report(args, setup, results, command, total, grid_path) -> str:
    info = setup.describe()
    orig, gold = results["original"], results["gold standard"]
    lines = [
        f"# Reproduction: MSGM vs the gold standard on `{args.dataset}`, forgetting {info['forget_names']}", "",
        f"Command: `MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 {command}`", "",
        f"- Machine: {machine()}; total wall time {total / 60:.1f} min",
        f"- Models: tiny UNet2DModel (32, 64, 64), VP SDE, {args.resolution}x{args.resolution}, batch "
        f"{args.batch_size}; pretraining / gold standard / MSGM re-training {args.pretrain_steps} steps at lr "
        f"{args.learning_rate} (cosine); MSGM fine-tunes {args.finetune_steps} steps at lr "
        f"{args.finetune_learning_rate}, forget weight {args.forget_weight} every step, forget batch "
        f"{max(args.batch_size // 4, 1)}",
        f"- Evaluation: {info['num_images']} samples per model, Euler-Maruyama {info['num_inference_steps']} steps "
        f"(NFE), prior-noise seed {info['seed']}; UGR by an ImageClassifier (test accuracy "
        f"{info['classifier_test_accuracy']}); FID/KID on its penultimate features against {info['reference_images']} "
        f"held-out retained-class images (classifier-feature FID: Inception weights are not available offline); "
        f"bits/dim by the probability-flow ODE ({info['bpd']}, Rademacher Hutchinson, uniform dequantisation) on "
        f"{info['bpd_images'][0]} retained and {info['bpd_images'][1]} forgotten held-out images",
    ]
    if args.reuse:
        lines += ["- `--reuse`: models already in the output folder were not retrained; their train seconds are the "
                  "\"training seconds\" of their model cards (total wall time counts this run only)", ""]
    else:
        lines += [""]
    lines += [
        "| model | train steps | train s | UGR | FID | KID | bpd retained | bpd forgotten | bpd gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        gap = r.get("bpd_forgotten", float("nan")) - r.get("bpd_retained", float("nan"))
        sec = "—" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {name} | {r['train_steps']} | {sec} | {r['ugr']:.3f} | {r['fid']:.2f} | {r['kid']:.3g} | "
                     f"{r.get('bpd_retained', float('nan')):.3f} | {r.get('bpd_forgotten', float('nan')):.3f} | "
                     f"{gap:+.3f} |")
    lines += ["", "## Against the targets", ""]
    for name, r in results.items():
        if not name.startswith("MSGM"):
            continue
        ugr_ok = r["ugr"] <= gold["ugr"] / 5
        fid_ratio = r["fid"] / orig["fid"]
        cost = r["train_steps"] / args.pretrain_steps
        lines.append(f"- {name}: UGR {r['ugr']:.3f} vs gold standard {gold['ugr']:.3f} -> "
                     f"{'meets' if ugr_ok else 'misses'} UGR <= 1/5 of gold; retained FID {fid_ratio:.2f}x the "
                     f"original's -> {'within' if fid_ratio <= 1.10 else 'outside'} 10%; cost {cost:.1%} of "
                     "pretraining steps")
    lines += ["", f"![metrics]({os.path.relpath(args.figure, os.path.dirname(args.report))})", "",
              f"![samples]({os.path.relpath(grid_path, os.path.dirname(args.report))})", "",
              "Sample rows (16 each, same prior noise): " + ", ".join(results) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ensure_malloc_env()
    main()
