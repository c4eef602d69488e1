"""The end of a training run: pipeline + model card on disk (atomically), sample grid, optional Hub push."""

from __future__ import annotations

import argparse

from ..hub import push_folder_to_hub
from .checkpointing import save_pipeline_atomic
from .trainer import final_sample_grid

HUB_IGNORE = ["checkpoint-*/*", ".checkpoint-*/*", ".pipeline-*/*", "logs/*"]


def export_pipeline(args: argparse.Namespace, accelerator, pipeline, card) -> dict:
    """Save ``pipeline`` and ``card`` into ``--output_dir`` on the main process; push when ``--push_to_hub``."""
    info: dict = {"output_dir": args.output_dir}
    if accelerator.is_main_process:
        save_pipeline_atomic(pipeline, args.output_dir, {"README.md": str(card)})
        info["samples"] = final_sample_grid(args, pipeline)
        if args.push_to_hub:
            info["repo_id"] = push_folder_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token,
                                                 private=args.hub_private_repo, ignore_patterns=HUB_IGNORE)
    accelerator.wait_for_everyone()
    return info

