"""Train a score model with denoising score matching (from scratch or continuing a checkpoint).

Makes the "original" model and the machine-unlearning gold standard (``--exclude_classes``: re-trained without
the undesirable data). Run as ``accelerate launch training/train_score.py ...`` or ``msgm train ...``.
"""

from __future__ import annotations

import argparse
import logging

from accelerate.utils import set_seed

from ..data import ImageTransform
from ..models.loading import load_score_model
from .args import add_data_args, add_model_args, add_training_args, parse_and_check
from .builders import (
    check_resolution,
    describe,
    make_pipeline,
    new_score_model,
    rewrap,
    scratch_shape,
    trainable_module_and_loss,
)
from .data import build_training_data
from .export import export_pipeline
from .model_card import build_model_card, command_line, training_metrics
from .trainer import make_accelerator, train

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="continue training this model (MSGMPipeline/ScoreModel dir, stock DDPM dir or repo id)")
    parser.add_argument("--allow_pickle", action="store_true", help="accept .bin weights (weights_only=True)")
    parser.add_argument("--exclude_classes", nargs="+", default=None,
                        help="label ids or class names left out of training (the gold-standard re-training)")
    add_data_args(parser)
    add_model_args(parser)
    add_training_args(parser, max_train_steps=2000, learning_rate=2e-4)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_and_check(build_parser(), argv)


def main(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    if args.pretrained_model_name_or_path:
        model = load_score_model(args.pretrained_model_name_or_path, allow_pickle=args.allow_pickle)
        resolution, channels = check_resolution(model, args)
    else:
        resolution, channels = scratch_shape(args)
        model = new_score_model(args, resolution, channels)
    accelerator.print(describe(model))
    transform = ImageTransform(resolution, channels=channels, center_crop=args.center_crop)
    data = build_training_data(args, transform, exclude=args.exclude_classes)
    module, loss, pipeline_fn = trainable_module_and_loss(model, args)

    def loss_fn(m, x, micro_step, generator):
        return loss(m, x, None, step=micro_step, generator=generator)

    result = train(args, accelerator, module, data, loss_fn, pipeline_fn, "train_score")
    final = rewrap(model, result.model) if args.discrete_ddpm else result.model
    facts = {
        "base model": args.pretrained_model_name_or_path or "trained from scratch",
        "objective": "DDPM epsilon loss" if args.discrete_ddpm else "denoising score matching",
        "SDE": f"{final.config.sde_type} ({final.sde})",
        "data": f"{args.dataset_name} ({len(data.retain)} training images)",
        "excluded concept": data.concept or "none",
        "training steps": result.global_step,
        "training seconds": round(result.seconds, 1),
        "batch size": args.train_batch_size,
        "EMA": args.use_ema,
    }
    card = build_model_card("Score model trained with diffusers-msgm", args.pretrained_model_name_or_path, facts,
                            metrics=training_metrics(result.last_logs), repo_id=args.hub_model_id,
                            command=command_line(getattr(args, "command_argv", None), "msgm train"))
    info = export_pipeline(args, accelerator, make_pipeline(final), card)
    accelerator.end_training()
    return {**info, "global_step": result.global_step, "seconds": result.seconds, "last_logs": result.last_logs}


if __name__ == "__main__":
    main(parse_args())
