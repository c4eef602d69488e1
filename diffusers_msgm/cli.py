"""``msgm``: command-line entry point.

    msgm demo                       # pretrain -> MSGM unlearn -> before/after grids on the embedded digits
    msgm sample --model DIR ...     # sample a (moderated) pipeline into a PNG grid
    msgm train  [train_score flags] # = accelerate launch training/train_score.py
    msgm unlearn [unlearn flags]    # = accelerate launch training/unlearn.py
    msgm evaluate --model DIR ...   # UGR, FID/KID, bits/dim -> report.json, report.md, sample grids
    msgm audit --before A --after B --forget ...  # UGR, memorisation, attribution mass: before vs after
"""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = ("demo", "sample", "train", "unlearn", "evaluate", "audit")


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msgm sample", description="Sample an MSGMPipeline (dir or Hub repo id).")
    p.add_argument("--model", required=True, help="MSGMPipeline dir / repo id, or a stock DDPM/ScoreSdeVe pipeline")
    p.add_argument("--output", default="samples.png", help="PNG grid to write")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--num_inference_steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predictor", default=None, choices=["euler_maruyama", "reverse_diffusion", "ode"])
    p.add_argument("--ode_solver", default=None, choices=["euler", "heun"])
    p.add_argument("--corrector", default=None, choices=["langevin", "none"])
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of each image, for viewing")
    p.add_argument("--padding", type=int, default=2, help="grey pixels between images")
    return p


def run_sample(argv: list[str]) -> str:
    import json
    import os

    import torch

    from .image_utils import images_to_grid, save_image_atomic
    from .pipelines.pipeline_msgm import MSGMPipeline
    from .schedulers.scheduling_moderated_score import ModeratedScoreScheduler

    args = sample_parser().parse_args(argv)
    if args.num_images < 1 or args.num_inference_steps < 1:
        raise SystemExit("msgm sample: --num_images and --num_inference_steps must be >= 1")
    index = os.path.join(args.model, "model_index.json")
    stock = os.path.isfile(index) and "score_model" not in json.load(open(index))
    pipe = MSGMPipeline.from_diffusers_pipeline(args.model) if stock else MSGMPipeline.from_pretrained(args.model)
    overrides = {k: getattr(args, k) for k in ("predictor", "ode_solver", "corrector") if getattr(args, k)}
    if overrides.get("corrector") == "none":
        overrides["corrector"] = None
    if overrides:
        pipe.scheduler = ModeratedScoreScheduler.from_config(pipe.scheduler.config, **overrides)
    images = pipe(batch_size=args.num_images, num_inference_steps=args.num_inference_steps,
                  generator=torch.Generator().manual_seed(args.seed)).images
    save_image_atomic(images_to_grid(images, scale=args.scale, padding=args.padding), args.output)
    print(f"wrote {args.num_images} samples to {args.output}")
    return args.output


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"msgm: unknown subcommand {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        return
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    elif command == "sample":
        run_sample(rest)
    elif command == "evaluate":
        from .cli_evaluate import main as evaluate_main

        evaluate_main(rest)
    elif command == "audit":
        from .audit.cli import main as audit_main

        audit_main(rest)
    elif command == "train":
        from .training import train_score

        train_score.main(train_score.parse_args(rest))
    else:
        from .training import unlearn

        unlearn.main(unlearn.parse_args(rest))


if __name__ == "__main__":
    main()
