"""``msgm demo``: the whole find-remove-verify loop on the embedded sklearn digits, on a laptop CPU.

1. pretrain a tiny VP score model on all ten digits (``train_score``);
2. MSGM fine-tune it to forget one digit (``unlearn``);
3. train a small digit classifier and sample both models with the same seeds;
4. report the share of generated images classified as the forgotten digit before and after, with grids.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .data import load_digits_dataset
from .image_utils import images_to_grid, save_image_atomic
from .metrics import ImageClassifier, train_classifier, undesirable_generation_rate
from .pipelines.pipeline_msgm import MSGMPipeline
from .training import train_score, unlearn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msgm demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="msgm-demo")
    p.add_argument("--forget", default="1", help="the digit to forget")
    p.add_argument("--variant", default="obtuse", choices=["orthogonal", "orthogonal_cosine", "obtuse",
                                                           "obtuse_official"])
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--pretrain_steps", type=int, default=2000)
    p.add_argument("--unlearn_steps", type=int, default=300)
    p.add_argument("--forget_weight", type=float, default=0.1)
    p.add_argument("--forget_every", type=int, default=1)
    p.add_argument("--num_images", type=int, default=256, help="images sampled from each model")
    p.add_argument("--num_inference_steps", type=int, default=100)
    p.add_argument("--classifier_epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse models already in --output_dir")
    return p


def _trained(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _sample(path: str, n: int, steps: int, seed: int) -> torch.Tensor:
    pipe = MSGMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type="pt").images
    return out * 2 - 1  # the classifier reads [-1, 1]


def _classifier(args, out_dir: str) -> tuple[ImageClassifier, float]:
    path = os.path.join(out_dir, "classifier")
    if args.reuse and os.path.isfile(os.path.join(path, "config.json")):
        clf = ImageClassifier.from_pretrained(path)
        return clf, json.load(open(os.path.join(path, "metrics.json")))["test_accuracy"]
    clf, metrics = train_classifier(load_digits_dataset("train"), load_digits_dataset("test"),
                                    resolution=args.resolution, channels=1, epochs=args.classifier_epochs,
                                    seed=args.seed)
    clf.save_pretrained(path)
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return clf, metrics["test_accuracy"]


def run_demo(args: argparse.Namespace) -> dict:
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    original, moderated = os.path.join(out, "original"), os.path.join(out, "moderated")
    timings = {}
    common = ["--dataset_name", "digits", "--resolution", str(args.resolution), "--seed", str(args.seed),
              "--validation_steps", "0", "--logger", "none", "--num_validation_images", "64",
              "--validation_inference_steps", str(args.num_inference_steps)]
    start = time.perf_counter()
    if not (args.reuse and _trained(original)):
        train_score.main(train_score.parse_args(common + [
            "--output_dir", original, "--max_train_steps", str(args.pretrain_steps), "--learning_rate", "1e-3",
            "--lr_warmup_steps", "100", "--lr_scheduler", "cosine", "--checkpointing_steps",
            str(max(args.pretrain_steps // 2, 1)), "--checkpoints_total_limit", "1"]))
    timings["pretrain_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    if not (args.reuse and _trained(moderated)):
        unlearn.main(unlearn.parse_args(common + [
            "--output_dir", moderated, "--pretrained_model_name_or_path", original, "--forget_labels", args.forget,
            "--variant", args.variant, "--forget_weight", str(args.forget_weight), "--forget_every",
            str(args.forget_every), "--max_train_steps", str(args.unlearn_steps), "--learning_rate", "2e-4",
            "--checkpointing_steps", str(max(args.unlearn_steps, 1)), "--checkpoints_total_limit", "1"]))
    timings["unlearn_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    clf, accuracy = _classifier(args, out)
    forget_id = int(args.forget)
    report = {"forgotten_digit": forget_id, "variant": args.variant, "classifier_test_accuracy": accuracy,
              "num_images": args.num_images, "num_inference_steps": args.num_inference_steps, "seed": args.seed,
              "pretrain_steps": args.pretrain_steps, "unlearn_steps": args.unlearn_steps}
    for name, path in (("before", original), ("after", moderated)):
        images = _sample(path, args.num_images, args.num_inference_steps, args.seed)
        report[name] = undesirable_generation_rate(clf, images, [forget_id])
        grid = images_to_grid(((images[:64] + 1) / 2).permute(0, 2, 3, 1).numpy(), scale=4, padding=2)
        save_image_atomic(grid, os.path.join(out, f"{name}.png"))
    timings["evaluate_seconds"] = time.perf_counter() - start
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def summary(report: dict) -> str:
    b, a = report["before"], report["after"]
    return (f"digit {report['forgotten_digit']} share of {report['num_images']} samples: "
            f"before {b['ugr']:.1%} -> after {a['ugr']:.1%} (classifier test accuracy "
            f"{report['classifier_test_accuracy']:.1%}); class histogram before {b['class_histogram']}, "
            f"after {a['class_histogram']}; timings {report['timings']}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    report = run_demo(args)
    print(summary(report))
    print(f"grids: {os.path.join(args.output_dir, 'before.png')}, {os.path.join(args.output_dir, 'after.png')}")
    return report

