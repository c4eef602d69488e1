"""MSGM: moderate a pretrained score model so that it stops generating undesirable data.

Fine-tunes (``--mode finetune``) or re-trains from scratch (``--mode retrain``) with
``(1 - w) DSM(retain) + w L_forget(forget)``, where L_forget is one of the MSGM terms (``--variant``, see
``diffusers_msgm.losses``). Run as ``accelerate launch training/unlearn.py ...`` or ``msgm unlearn ...``.
"""

from __future__ import annotations

import argparse
import logging

from accelerate.utils import set_seed

from ..data import ImageTransform
from ..models.loading import load_score_model
from ..models.score_model import ScoreModel
from .args import add_data_args, add_training_args, add_unlearning_args, parse_and_check
from .builders import check_resolution, describe, make_pipeline, rewrap, trainable_module_and_loss
from .data import build_training_data, forget_batch
from .export import export_pipeline
from .model_card import build_model_card, command_line, training_metrics
from .trainer import make_accelerator, train

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_unlearning_args(parser)
    parser.add_argument("--discrete_ddpm", action="store_true",
                        help="MSGM in DDPM epsilon space on the UNet (VP epsilon / v models)")
    add_data_args(parser)
    add_training_args(parser, max_train_steps=200, learning_rate=1e-4)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_and_check(build_parser(), argv)


def main(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    base = load_score_model(args.pretrained_model_name_or_path, allow_pickle=args.allow_pickle)
    resolution, channels = check_resolution(base, args)
    model = ScoreModel.from_config(base.config) if args.mode == "retrain" else base
    accelerator.print(f"{args.mode}: {describe(model)}")
    transform = ImageTransform(resolution, channels=channels, center_crop=args.center_crop)
    data = build_training_data(args, transform, forget_labels=args.forget_labels)
    if data.forget is None or data.forget.shape[0] == 0:
        raise ValueError("the forget set is empty: check --forget_labels / --forget_dir")
    forget_images = data.forget.to(accelerator.device)
    forget_bs = args.forget_batch_size or args.train_batch_size
    module, loss, pipeline_fn = trainable_module_and_loss(model, args, args.variant, args.forget_weight,
                                                          args.forget_every)

    def loss_fn(m, x, micro_step, generator):
        x_forget = forget_batch(forget_images, forget_bs, generator).to(x.dtype)
        return loss(m, x, x_forget, step=micro_step, generator=generator)

    result = train(args, accelerator, module, data, loss_fn, pipeline_fn, "unlearn")
    final = rewrap(model, result.model) if args.discrete_ddpm else result.model
    facts = {
        "base model": args.pretrained_model_name_or_path,
        "forgotten concept": data.concept,
        "forget images": int(data.forget.shape[0]),
        "retain images": len(data.retain),
        "mode": args.mode,
        "MSGM variant": args.variant,
        "forget weight / every": f"{args.forget_weight} / {args.forget_every}",
        "space": "DDPM epsilon (discrete)" if args.discrete_ddpm else f"continuous {final.config.sde_type} SDE",
        "training steps": result.global_step,
        "training seconds": round(result.seconds, 1),
        "learning rate": args.learning_rate,
    }
    metrics = {**training_metrics(result.last_logs), **(getattr(args, "metrics", None) or {})}
    card = build_model_card(f"MSGM-moderated model: {data.concept} removed", args.pretrained_model_name_or_path,
                            facts, metrics=metrics, repo_id=args.hub_model_id,
                            command=command_line(getattr(args, "command_argv", None), "msgm unlearn"))
    info = export_pipeline(args, accelerator, make_pipeline(final), card)
    accelerator.end_training()
    return {**info, "global_step": result.global_step, "seconds": result.seconds, "last_logs": result.last_logs,
            "concept": data.concept, "forget_label_ids": data.forget_label_ids}


if __name__ == "__main__":
    main(parse_args())
