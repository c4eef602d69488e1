"""``msgm evaluate``: UGR, FID/KID and bits/dim of one or more pipelines, as JSON + markdown + image grids.

    msgm evaluate --model msgm-demo/original --model msgm-demo/moderated --dataset digits --forget 1 \\
        --output_dir msgm-eval
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .evaluation import evaluate_pipeline, prepare_evaluation, report_markdown, save_grid, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msgm evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="MSGMPipeline dir or Hub repo id; repeat to compare models (optionally NAME=PATH)")
    p.add_argument("--dataset", default="digits", help="digits, fashion_mnist, a labelled dataset dir or Hub name")
    p.add_argument("--data_root", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--eval_split", default="test")
    p.add_argument("--train_split", default="train", help="to train the classifier when --classifier is not given")
    p.add_argument("--forget", nargs="+", required=True, help="forgotten class ids or names")
    p.add_argument("--classifier", default=None, help="ImageClassifier dir (default: train one, saved in output_dir)")
    p.add_argument("--classifier_epochs", type=int, default=None)
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--num_inference_steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_ref", type=int, default=2000, help="held-out retained-class reference images for FID/KID")
    p.add_argument("--bpd_images", type=int, default=64, help="held-out images per group for bits/dim (0: skip)")
    p.add_argument("--bpd_solver", default="heun", choices=["rk45", "heun", "euler"])
    p.add_argument("--bpd_steps", type=int, default=50)
    p.add_argument("--output_dir", default="msgm-eval")
    return p


def _named_models(specs: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
        name = name or os.path.basename(path.rstrip("/")) or path
        if name in models:
            raise SystemExit(f"msgm evaluate: two --model entries are named {name!r}; use NAME=PATH")
        models[name] = path
    return models


def main(argv: list[str] | None = None) -> dict:
    from .pipelines.pipeline_msgm import MSGMPipeline

    args = build_parser().parse_args(argv)
    models = _named_models(args.model)
    pipelines = {name: MSGMPipeline.from_pretrained(path) for name, path in models.items()}
    shapes = {name: p.score_model.sample_shape for name, p in pipelines.items()}
    if len(set(shapes.values())) != 1:
        raise SystemExit(f"msgm evaluate: the models generate different image shapes {shapes}; compare like with like")
    channels, resolution, _ = next(iter(shapes.values()))
    setup = prepare_evaluation(
        args.dataset, args.forget, resolution=resolution, channels=channels, classifier=args.classifier,
        classifier_epochs=args.classifier_epochs, eval_split=args.eval_split, train_split=args.train_split,
        data_root=args.data_root, num_images=args.num_images, num_inference_steps=args.num_inference_steps,
        seed=args.seed, num_ref=args.num_ref, bpd_images=args.bpd_images,
        bpd_kwargs={"solver": args.bpd_solver, "num_steps": args.bpd_steps, "eps": 1e-3},
    )
    os.makedirs(args.output_dir, exist_ok=True)  # only once the inputs are known to be good
    if args.classifier is None:
        setup.classifier.save_pretrained(os.path.join(args.output_dir, "classifier"))
    results = {}
    for name, pipe in pipelines.items():
        r = evaluate_pipeline(pipe, setup)
        save_grid(r.pop("images"), os.path.join(args.output_dir, f"samples_{name}.png"))
        results[name] = {**r, "model": models[name]}
        print(f"{name}: UGR {r['ugr']:.3f}  FID {r['fid']:.2f}  KID {r['kid']:.4g}"
              + (f"  bpd {r['bpd_retained']:.3f} retained / {r['bpd_forgotten']:.3f} forgotten"
                 if "bpd_retained" in r else ""))
    command = "msgm evaluate " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))
    report = {"setup": setup.describe(), "results": results, "command": command}
    write_json_atomic(report, os.path.join(args.output_dir, "report.json"))
    text = report_markdown(results, setup, command)
    text += "\n" + "\n".join(f"![{n}](samples_{n}.png)" for n in results) + "\n"
    tmp = os.path.join(args.output_dir, f".report.md.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.output_dir, "report.md"))
    print(f"wrote {os.path.join(args.output_dir, 'report.md')} and report.json")
    return report
