"""The end of a training run: pipeline + model card on disk (atomically), sample grid, optional Hub push."""

from __future__ import annotations

import argparse

from accelerate import Accelerator
from huggingface_hub import ModelCard

from ..hub import COMMUNITY_PIPELINE_FILE, COMMUNITY_PIPELINE_SOURCE, push_folder_to_hub
from ..pipelines.pipeline_msgm import MSGMPipeline
from .checkpointing import save_pipeline_atomic
from .trainer import final_sample_grid

HUB_IGNORE = ["checkpoint-*/*", ".checkpoint-*/*", ".pipeline-*/*", "logs/*"]


def export_pipeline(args: argparse.Namespace, accelerator: Accelerator, pipeline: MSGMPipeline, card: ModelCard) -> dict:
    """Save ``pipeline``, ``card`` (``README.md``) and the community entry file (``pipeline.py``, for diffusers'
    ``custom_pipeline=``) into ``--output_dir`` on the main process; push when ``--push_to_hub``."""
    info: dict = {"output_dir": args.output_dir}
    if accelerator.is_main_process:
        save_pipeline_atomic(pipeline, args.output_dir,
                             {"README.md": str(card), COMMUNITY_PIPELINE_FILE: COMMUNITY_PIPELINE_SOURCE})
        info["samples"] = final_sample_grid(args, pipeline)
        if args.push_to_hub:
            info["repo_id"] = push_folder_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token,
                                                 private=args.hub_private_repo, ignore_patterns=HUB_IGNORE)
    accelerator.wait_for_everyone()
    return info

