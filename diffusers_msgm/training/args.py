"""Command-line flags shared by ``train_score.py`` and ``unlearn.py`` (names follow diffusers' training examples)."""

from __future__ import annotations

import argparse
import importlib.util
import os

from ..losses import FORGET_VARIANTS
from ..sde import SDE_TYPES


def default_logger() -> str:
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default="digits",
                   help="'digits' (sklearn, embedded), 'fashion_mnist' (Debian IDX files), a local dataset/image "
                        "folder, or a Hub dataset name")
    g.add_argument("--data_root", default=None, help="directory of the fashion_mnist IDX files")
    g.add_argument("--train_split", default="train")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--image_column", default="image")
    g.add_argument("--label_column", default="label")
    g.add_argument("--resolution", type=int, default=None,
                   help="training resolution; default: the model's sample_size (or 16 from scratch)")
    g.add_argument("--channels", type=int, default=None, choices=[1, 3], help="default: the model's, else 1")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true", help="horizontal flips, drawn from the per-step generator")
    g.add_argument("--dataloader_num_workers", type=int, default=0)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (from scratch)")
    g.add_argument("--sde", default="vp", choices=SDE_TYPES)
    g.add_argument("--discrete_ddpm", action="store_true",
                   help="train/unlearn in DDPM epsilon space with a DDPMScheduler (linear betas matching the VP SDE)")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction", "score"],
                   help="default: epsilon (vp, subvp), score (ve)")
    g.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    g.add_argument("--layers_per_block", type=int, default=1)
    g.add_argument("--attention", action="store_true", help="self-attention in the lowest-resolution blocks")
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument("--beta_min", type=float, default=0.1)
    g.add_argument("--beta_max", type=float, default=20.0)
    g.add_argument("--sigma_min", type=float, default=0.01)
    g.add_argument("--sigma_max", type=float, default=50.0)


def add_training_args(parser: argparse.ArgumentParser, max_train_steps: int, learning_rate: float) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="msgm-output")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=64)
    g.add_argument("--max_train_steps", type=int, default=max_train_steps, help="optimizer updates")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=learning_rate)
    g.add_argument("--lr_scheduler", default="constant",
                   help="diffusers.optimization.get_scheduler name: constant, constant_with_warmup, linear, cosine")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--sampling_eps", type=float, default=1e-5, help="smallest training time t ~ U(eps, 1)")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)
    g.add_argument("--ema_max_decay", type=float, default=0.999)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: accelerate config / launcher setting")

    g = parser.add_argument_group("checkpoints, logging, samples")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N directory or 'latest'")
    g.add_argument("--logger", default=default_logger(), choices=["tensorboard", "wandb", "none"])
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--validation_steps", type=int, default=500, help="save a sample grid every N steps (0: only at the end)")
    g.add_argument("--num_validation_images", type=int, default=16)
    g.add_argument("--validation_inference_steps", type=int, default=100)

    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_private_repo", action="store_true")


def add_unlearning_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("MSGM")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="MSGMPipeline/ScoreModel dir, or a stock DDPMPipeline/ScoreSdeVePipeline dir or Hub repo id")
    g.add_argument("--allow_pickle", action="store_true", help="accept .bin weights (loaded with weights_only=True)")
    g.add_argument("--mode", default="finetune", choices=["finetune", "retrain"])
    g.add_argument("--variant", default="orthogonal", choices=FORGET_VARIANTS)
    g.add_argument("--forget_weight", type=float, default=0.01)
    g.add_argument("--forget_every", type=int, default=4)
    g.add_argument("--forget_labels", nargs="+", default=None, help="label ids or class names to forget")
    g.add_argument("--forget_dir", default=None, help="folder of undesirable images (with --retain_dir)")
    g.add_argument("--retain_dir", default=None, help="folder of images to keep (with --forget_dir)")
    g.add_argument("--forget_batch_size", type=int, default=None, help="default: --train_batch_size")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values with a message naming the flag."""
    positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                "num_validation_images", "validation_inference_steps", "layers_per_block", "num_train_timesteps"]
    for name in positive:
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("learning_rate",):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.validation_steps < 0 or args.lr_warmup_steps < 0:
        raise ValueError("--validation_steps and --lr_warmup_steps must be >= 0")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if not 0 < args.sampling_eps < 1:
        raise ValueError(f"--sampling_eps must lie in (0, 1), got {args.sampling_eps}")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    if getattr(args, "discrete_ddpm", False) and getattr(args, "sde", "vp") != "vp":
        raise ValueError("--discrete_ddpm needs --sde vp")
    if hasattr(args, "forget_weight"):
        if not 0 <= args.forget_weight <= 1:
            raise ValueError(f"--forget_weight must lie in [0, 1], got {args.forget_weight}")
        if args.forget_every < 1:
            raise ValueError(f"--forget_every must be >= 1, got {args.forget_every}")
        folders = (args.forget_dir is not None, args.retain_dir is not None)
        if any(folders) and not all(folders):
            raise ValueError("--forget_dir and --retain_dir go together")
        if all(folders) and args.forget_labels:
            raise ValueError("give either --forget_labels or --forget_dir/--retain_dir, not both")
        if not any(folders) and not args.forget_labels:
            raise ValueError("say what to forget: --forget_labels (with --dataset_name) or --forget_dir/--retain_dir")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        candidate = os.path.join(args.output_dir, args.resume_from_checkpoint)
        if not os.path.isdir(candidate):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no such checkpoint directory")


def parse_and_check(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv`` when None) and refuse bad values."""
    args = parser.parse_args(argv)
    check_args(args)
    args.command_argv = None if argv is None else list(argv)  # for the model card's exact command
    return args
