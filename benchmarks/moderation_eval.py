"""Quality and forgetting of MSGM moderations: UGR and classifier-feature FID/KID, plus an inpainting check.

For one dataset and one forgotten class, sample ``--num_images`` images (Euler-Maruyama, ``--steps`` steps, seed
``--seed``) from the original model with no moderation, with ExemplarModeration (orthogonal / obtuse at several
strengths, ``--num_exemplars`` training images of the forgotten class in model space), with ClassifierModeration
(a NoiseAwareClassifier trained on the training split; ``forget`` / ``retain`` objectives at several scales), and
from the MSGM fine-tuned model. Reports the undesirable-generation rate (UGR, by the ImageClassifier), FID / KID
on the ImageClassifier's penultimate features against held-out real test images of the retained classes, and the
sampling seconds of each run. Then inpaints the centre square of held-out test images of retained and forgotten
classes with the original and the MSGM model (same seed) and reports the MSE on the masked region and the UGR of
the inpainted images, with a before/after figure.

    python benchmarks/moderation_eval.py --dataset digits
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_malloc_env, machine, write_report  # noqa: E402

ensure_malloc_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusers_msgm.data import ImageTransform, load_digits_dataset, load_fashion_mnist_dataset  # noqa: E402
from diffusers_msgm.data.splits import resolve_label_ids  # noqa: E402
from diffusers_msgm.image_utils import images_to_grid, save_image_atomic  # noqa: E402
from diffusers_msgm.metrics import ImageClassifier, classifier_fid_kid, predict, undesirable_generation_rate  # noqa: E402
from diffusers_msgm.moderation_exemplar import (  # noqa: E402
    ClassifierModeration,
    ExemplarModeration,
    train_noise_aware_classifier,
)
from diffusers_msgm.pipelines import MSGMInpaintPipeline, MSGMPipeline  # noqa: E402

DEFAULTS = {
    "digits": dict(original="msgm-demo/original", moderated="msgm-demo/moderated", classifier="msgm-demo/classifier",
                   forget="1", resolution=8),
    "fashion_mnist": dict(original="/tmp/fmnist-eval/original", moderated="/tmp/fmnist-eval/moderated",
                          classifier="/tmp/fmnist-eval/classifier", forget="Trouser", resolution=16),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="digits")
    p.add_argument("--original"), p.add_argument("--moderated"), p.add_argument("--classifier")
    p.add_argument("--forget"), p.add_argument("--resolution", type=int)
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_exemplars", type=int, default=100)
    p.add_argument("--strengths", default="0.5,1,2")
    p.add_argument("--scales", default="1,3")
    p.add_argument("--objectives", default="forget,retain")
    p.add_argument("--nac_steps", type=int, default=1500, help="NoiseAwareClassifier training steps")
    p.add_argument("--nac_train_max", type=int, default=10000, help="at most this many training images for it")
    p.add_argument("--num_ref", type=int, default=2000, help="at most this many real retained test images")
    p.add_argument("--num_inpaint", type=int, default=64, help="test images per group (retained / forgotten)")
    p.add_argument("--kid_subsets", type=int, default=50)
    p.add_argument("--kid_subset_size", type=int, default=200)
    p.add_argument("--output", help="markdown report (default docs/benchmarks/moderation_eval_<dataset>.md)")
    p.add_argument("--figure", help="inpainting figure (default docs/images/moderation_eval_<dataset>_inpaint.png)")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.output = args.output or f"docs/benchmarks/moderation_eval_{args.dataset}.md"
    args.figure = args.figure or f"docs/images/moderation_eval_{args.dataset}_inpaint.png"
    return args


def load_split(dataset: str, split: str):
    return load_digits_dataset(split) if dataset == "digits" else load_fashion_mnist_dataset(split)


def to_tensors(ds, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (model space, centered data) and labels."""
    tf = ImageTransform(resolution, 1)
    images = torch.stack([tf(im) for im in ds["image"]])
    return images, torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)


def fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/moderation_eval.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t_all = time.perf_counter()
    train_ds, test_ds = load_split(args.dataset, "train"), load_split(args.dataset, "test")
    forget_id = resolve_label_ids(train_ds, "label", args.forget)[0]
    class_names = train_ds.features["label"].names
    x_train, y_train = to_tensors(train_ds, args.resolution)
    x_test, y_test = to_tensors(test_ds, args.resolution)
    gen = torch.Generator().manual_seed(args.seed)

    clf = ImageClassifier.from_pretrained(args.classifier).eval()
    ref = x_test[y_test != forget_id]
    ref = ref[torch.randperm(len(ref), generator=gen)[: args.num_ref]]
    forget_train = x_train[y_train == forget_id]
    exemplars = forget_train[torch.randperm(len(forget_train), generator=gen)[: args.num_exemplars]]

    pipe = MSGMPipeline.from_pretrained(args.original)
    pipe.set_progress_bar_config(disable=True)
    mod_pipe = MSGMPipeline.from_pretrained(args.moderated)
    mod_pipe.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    nac_idx = torch.randperm(len(x_train), generator=gen)[: args.nac_train_max]
    nac = train_noise_aware_classifier(x_train[nac_idx], y_train[nac_idx], pipe.scheduler, steps=args.nac_steps,
                                       seed=args.seed, num_classes=len(class_names))
    nac_seconds = time.perf_counter() - start
    # accuracy of the noise-aware classifier on the test split at a few noise levels
    nac_acc = {}
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed + 1)
        for t in (0.01, 0.3, 0.6, 0.9):
            tt = torch.full((len(x_test),), t)
            mean, std = pipe.scheduler.sde.marginal_prob(x_test, tt)
            noisy = mean + std * torch.randn(x_test.shape, generator=g)
            nac_acc[t] = float((nac(noisy, tt).argmax(1) == y_test).float().mean())

    kid_kw = dict(subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed)
    rows = []

    def evaluate(name: str, images: torch.Tensor, seconds: float | None) -> None:
        ugr = undesirable_generation_rate(clf, images, [forget_id])
        q = classifier_fid_kid(clf, images, ref, **kid_kw)
        rows.append(dict(name=name, ugr=ugr["ugr"], hist=ugr["class_histogram"], fid=q["fid"], kid=q["kid"],
                         kid_std=q["kid_std"], seconds=seconds, n=len(images)))
        print(f"{name:40s} UGR {ugr['ugr']:.3f} FID {q['fid']:.3f} KID {q['kid']:.4f} "
              f"s {seconds if seconds is None else round(seconds, 1)} ({time.strftime('%H:%M:%S')})", flush=True)

    # floor: real retained training images vs the reference
    real_retain = x_train[y_train != forget_id]
    evaluate("real retained train images (floor)",
             real_retain[torch.randperm(len(real_retain), generator=gen)[: args.num_images]], None)

    def sample(p: MSGMPipeline, moderation=None) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = p(batch_size=args.num_images, num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(args.seed), output_type="pt", moderation=moderation).images
        return out * 2 - 1, time.perf_counter() - start

    evaluate("original, no moderation", *sample(pipe))
    evaluate("MSGM fine-tuned model (obtuse)", *sample(mod_pipe))
    for mode in ("orthogonal", "obtuse"):
        for s in [float(v) for v in args.strengths.split(",")]:
            m = ExemplarModeration(exemplars, pipe.scheduler, mode=mode, strength=s)
            evaluate(f"original + Exemplar {mode}, strength {s:g}", *sample(pipe, m))
    for objective in args.objectives.split(","):
        for sc in [float(v) for v in args.scales.split(",")]:
            m = ClassifierModeration(nac, [forget_id], scale=sc, objective=objective)
            evaluate(f"original + Classifier {objective}, scale {sc:g}", *sample(pipe, m))

    # ---- inpainting
    res = args.resolution
    half = res // 4
    mask = torch.ones(1, 1, res, res)
    mask[..., res // 2 - half: res // 2 + half, res // 2 - half: res // 2 + half] = 0  # 0 = inpainted centre
    hole = mask[0, 0] == 0
    groups = {}
    for group, sel in (("retained", y_test != forget_id), ("forgotten", y_test == forget_id)):
        xs, ys = x_test[sel], y_test[sel]
        idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(args.seed))[: args.num_inpaint]
        groups[group] = (xs[idx], ys[idx])
    inpaint_rows, figure_rows = [], {}
    for model_name, path in (("original", args.original), ("MSGM", args.moderated)):
        ip = MSGMInpaintPipeline.from_pretrained(path)
        ip.set_progress_bar_config(disable=True)
        for group, (xs, ys) in groups.items():
            start = time.perf_counter()
            out = ip(image=(xs + 1) / 2, mask_image=mask, num_inference_steps=args.steps,
                     generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
            seconds = time.perf_counter() - start
            mse = float(((out - (xs + 1) / 2)[..., hole] ** 2).mean())
            imgs = out * 2 - 1
            ugr = undesirable_generation_rate(clf, imgs, [forget_id])["ugr"]
            acc = float((predict(clf, imgs) == ys).float().mean())
            inpaint_rows.append(dict(model=model_name, group=group, n=len(xs), mse=mse, ugr=ugr, acc=acc,
                                     seconds=seconds))
            figure_rows[(model_name, group)] = out[:8]
            print(f"inpaint {model_name} {group}: MSE {mse:.4f} UGR {ugr:.3f} acc {acc:.3f} s {seconds:.1f}",
                  flush=True)
    # real (unmasked) images: UGR / accuracy of the classifier on the inputs themselves
    real_ugr = {g: undesirable_generation_rate(clf, xs, [forget_id])["ugr"] for g, (xs, _) in groups.items()}
    masked_ugr = {g: undesirable_generation_rate(clf, torch.where(mask.bool(), xs, torch.zeros_like(xs)),
                                                 [forget_id])["ugr"] for g, (xs, _) in groups.items()}

    # figure: per group rows = real, masked input, original inpaint, MSGM inpaint
    tiles = []
    for group, (xs, _) in groups.items():
        real01 = (xs[:8] + 1) / 2
        tiles += [real01, real01 * mask + 0.5 * (1 - mask), figure_rows[("original", group)],
                  figure_rows[("MSGM", group)]]
    grid_in = torch.cat(tiles).permute(0, 2, 3, 1).clamp(0, 1).numpy()
    os.makedirs(os.path.dirname(args.figure), exist_ok=True)
    save_image_atomic(images_to_grid(grid_in, nrow=8, scale=max(1, 64 // res), padding=2), args.figure)

    total = time.perf_counter() - t_all
    fname = class_names[forget_id]
    lines = [
        f"# Moderation evaluation: {args.dataset}, forgetting class {forget_id} ({fname!r})", "",
        "Generated by `benchmarks/moderation_eval.py` (UGR by the ImageClassifier; FID / KID on its "
        f"{clf.config.feature_dim}-D penultimate features, i.e. *classifier-feature* FID/KID, not Inception; the features are not normalised, so the "
        "magnitudes are only comparable within one table).", "",
        f"Command: `MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 {command}`", "",
        f"- Machine: {machine()}",
        f"- Models: original `{args.original}`, MSGM fine-tuned `{args.moderated}`, classifier `{args.classifier}`",
        f"- Resolution {args.resolution}; {args.num_images} samples per run, {args.steps} Euler-Maruyama steps, "
        f"generator seed {args.seed} (the same prior noise for every run)",
        f"- Reference: {len(ref)} held-out real test images of the retained classes; KID: {args.kid_subsets} "
        f"subsets of min({args.kid_subset_size}, n) samples, cubic polynomial kernel, unbiased MMD^2",
        f"- Exemplars: {len(exemplars)} training images of class {forget_id}, model space",
        f"- NoiseAwareClassifier: {args.nac_steps} steps on {len(nac_idx)} training images "
        f"({nac_seconds:.1f} s); test accuracy at t = " + ", ".join(f"{t}: {a:.3f}" for t, a in nac_acc.items()),
        f"- Total wall time {total:.0f} s", "",
        "| run | UGR | FID | KID (mean ± std over subsets) | sampling s |", "|---|---|---|---|---|",
    ]
    for r in rows:
        sec = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['name']} | {r['ugr']:.3f} | {r['fid']:.1f} | {r['kid']:.4g} ± "
                     f"{r['kid_std']:.3g} | {sec} |")
    lines += ["", "Class histograms (classifier predictions, classes 0..K-1):", ""]
    lines += [f"- {r['name']}: {r['hist']}" for r in rows]
    lines += [
        "", "## Inpainting", "",
        f"Held-out test images, centre {2 * half}x{2 * half} square inpainted (mask 1 = keep outside the square), "
        f"{args.steps} steps, seed {args.seed}. MSE in [0, 1] pixel units over the inpainted square only. "
        "UGR: share classified as the forgotten class; accuracy: share classified as the true label.", "",
        f"Classifier on the unmasked real inputs: UGR retained {real_ugr['retained']:.3f}, forgotten "
        f"{real_ugr['forgotten']:.3f}; with the square set to 0 (grey): retained {masked_ugr['retained']:.3f}, "
        f"forgotten {masked_ugr['forgotten']:.3f}.", "",
        "| model | test images | n | MSE (hole) | UGR | accuracy | seconds |", "|---|---|---|---|---|---|---|",
    ]
    for r in inpaint_rows:
        lines.append(f"| {r['model']} | {r['group']} | {r['n']} | {r['mse']:.4f} | {r['ugr']:.3f} | "
                     f"{r['acc']:.3f} | {r['seconds']:.1f} |")
    lines += ["", f"![inpainting]({os.path.relpath(args.figure, os.path.dirname(args.output))})", "",
              "Figure rows (8 images each): retained real, masked input, original-model inpaint, MSGM inpaint; "
              "then the same for the forgotten class.", ""]
    write_report(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
