"""``msgm audit``: verify an unlearning — UGR, memorisation and attribution mass, before vs after.

    msgm audit --before msgm-demo/original --after msgm-demo/moderated --dataset digits --forget 1 \\
        --output_dir msgm-audit
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..evaluation import prepare_evaluation, write_json_atomic
from .verify import AuditSettings, audit_markdown, audit_unlearning


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msgm audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the original pipeline (dir or Hub repo id)")
    p.add_argument("--after", required=True, help="the moderated pipeline (dir or Hub repo id)")
    p.add_argument("--dataset", default="digits", help="digits, fashion_mnist, a labelled dataset dir or Hub name")
    p.add_argument("--data_root", default=None)
    p.add_argument("--forget", nargs="+", required=True, help="forgotten class ids or names")
    p.add_argument("--classifier", default=None, help="ImageClassifier dir (default: train one)")
    p.add_argument("--classifier_epochs", type=int, default=None)
    p.add_argument("--num_images", type=int, default=128)
    p.add_argument("--num_inference_steps", type=int, default=100)
    p.add_argument("--num_ref", type=int, default=1000)
    d = AuditSettings()
    p.add_argument("--memorization_images", type=int, default=d.memorization_images)
    p.add_argument("--memorization_t", type=float, default=d.memorization_t)
    p.add_argument("--memorization_directions", type=int, default=d.memorization_directions)
    p.add_argument("--attribution_train_images", type=int, default=d.attribution_train_images)
    p.add_argument("--attribution_queries", type=int, default=d.attribution_queries)
    p.add_argument("--attribution_method", default=d.attribution_method, choices=["trak", "d-trak", "das"])
    p.add_argument("--attribution_proj_dim", type=int, default=d.attribution_proj_dim)
    p.add_argument("--attribution_timesteps", type=int, default=d.attribution_timesteps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="msgm-audit")
    return p


def main(argv: list[str] | None = None) -> dict:
    from ..pipelines.pipeline_msgm import MSGMPipeline

    args = build_parser().parse_args(argv)
    settings = AuditSettings(**{k: getattr(args, k) for k in AuditSettings.__dataclass_fields__})
    settings.validate(args.num_images)
    pipelines = {"before": MSGMPipeline.from_pretrained(args.before), "after": MSGMPipeline.from_pretrained(args.after)}
    shapes = {name: p.score_model.sample_shape for name, p in pipelines.items()}
    if shapes["before"] != shapes["after"]:
        raise SystemExit(f"msgm audit: --before and --after generate different image shapes {shapes}")
    channels, resolution, _ = shapes["before"]
    setup = prepare_evaluation(args.dataset, args.forget, resolution, channels, classifier=args.classifier,
                               classifier_epochs=args.classifier_epochs, data_root=args.data_root,
                               num_images=args.num_images, num_inference_steps=args.num_inference_steps,
                               seed=args.seed, num_ref=args.num_ref, bpd_images=0)
    report = audit_unlearning(pipelines, setup, data_root=args.data_root, settings=settings)
    command = "msgm audit " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))
    report["command"] = command
    os.makedirs(args.output_dir, exist_ok=True)
    write_json_atomic(report, os.path.join(args.output_dir, "audit.json"))
    text = audit_markdown(report, command)
    tmp = os.path.join(args.output_dir, f".audit.md.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.output_dir, "audit.md"))
    print(text)
    return report
