"""The accelerate training loop shared by ``train_score.py`` and ``unlearn.py``.

Shape of diffusers' ``train_unconditional.py``: ``Accelerator`` with gradient accumulation and mixed precision,
``EMAModel`` (saved in safetensors through save/load-state hooks), ``save_state`` checkpoints and
``--resume_from_checkpoint latest`` (skipping the batches already seen), tracker logging, tqdm on the main
process and sample grids. Randomness (t, z, forget batches, flips) comes from a generator seeded per micro-step,
so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..image_utils import images_to_grid, save_image_atomic
from ..losses import MSGMLossOutput
from ..pipelines.pipeline_msgm import MSGMPipeline
from .checkpointing import checkpoint_step, resolve_resume_checkpoint, save_checkpoint
from .data import EpochShuffleSampler, TrainingData, step_generator

logger = logging.getLogger(__name__)

#: loss_fn(model, retain_batch, micro_step, generator) -> MSGMLossOutput
LossFn = Callable[[torch.nn.Module, torch.Tensor, int, torch.Generator], MSGMLossOutput]
#: make_pipeline(unwrapped_module) -> MSGMPipeline, used for sample grids
PipelineFn = Callable[[torch.nn.Module], object]


@dataclass
class TrainResult:
    global_step: int
    seconds: float
    model: torch.nn.Module  # unwrapped; EMA weights copied in when EMA is used
    last_logs: dict = field(default_factory=dict)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=project_config,
    )


def _tracker_config(args: argparse.Namespace) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def _random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def save_sample_grid(pipeline: MSGMPipeline, path: str, num_images: int, num_inference_steps: int, seed: int) -> None:
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=num_images, num_inference_steps=num_inference_steps,
                      generator=torch.Generator().manual_seed(seed), output_type="pil").images
    save_image_atomic(images_to_grid(images, scale=4, padding=2), path)


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: TrainingData,
    loss_fn: LossFn,
    make_pipeline: PipelineFn,
    run_name: str,
) -> TrainResult:
    """Optimise ``model`` with ``loss_fn`` on ``data.retain`` batches for ``args.max_train_steps`` updates."""
    model_cls = type(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    sampler = EpochShuffleSampler(len(data.retain), args.seed)
    loader = torch.utils.data.DataLoader(data.retain, batch_size=args.train_batch_size, sampler=sampler,
                                         num_workers=args.dataloader_num_workers, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"the training set has {len(data.retain)} images, fewer than --train_batch_size "
                         f"{args.train_batch_size}")
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=model_cls, model_config=model.config)

    def save_hook(models, weights, output_dir):
        if ema is not None and accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "ema"))

    def load_hook(models, input_dir):
        if ema is not None:
            with warnings.catch_warnings():  # diffusers' EMAModel.from_pretrained passes a path to from_config
                warnings.simplefilter("ignore", FutureWarning)
                loaded = EMAModel.from_pretrained(os.path.join(input_dir, "ema"), model_cls)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers(run_name, config=_tracker_config(args))

    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc=run_name,
                    disable=not accelerator.is_local_main_process)
    logs: dict = {}
    start = time.perf_counter()
    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= args.max_train_steps:
                break
            model.train()
            sampler.set_epoch(epoch)
            offset = skip_batches if epoch == first_epoch else 0
            epoch_loader = accelerator.skip_first_batches(loader, offset) if offset else loader
            for batch_index, x in enumerate(epoch_loader, start=offset):
                micro_step = epoch * len(loader) + batch_index
                generator = step_generator(args.seed, micro_step, accelerator.process_index)
                if args.random_flip:
                    x = _random_flip(x, generator)
                with accelerator.accumulate(model):
                    out = loss_fn(model, x, micro_step, generator)
                    bad = accelerator.gather(torch.tensor([float(not torch.isfinite(out.loss))], device=x.device))
                    if bool(bad.any()):
                        path = save_checkpoint(accelerator, args.output_dir, global_step, None)
                        raise FloatingPointError(
                            f"non-finite loss ({out.loss.item()}) at training step {global_step + 1} (micro-step "
                            f"{micro_step}); the last good state (step {global_step}) is saved in {path}. Lower "
                            "--learning_rate or --forget_weight, then --resume_from_checkpoint latest"
                        )
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(model.parameters())
                global_step += 1
                progress.update(1)
                logs = {"loss": out.loss.detach().item(), "retain_loss": out.retain_loss.item(),
                        "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                if out.forget_computed:
                    logs["forget_loss"] = out.forget_loss.item()
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    _validation_grid(args, accelerator, model, ema, make_pipeline, global_step)
                if global_step >= args.max_train_steps:
                    break
    finally:  # close the bar on errors too, so it is not printed again at exit
        progress.close()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(final.parameters())
    return TrainResult(global_step=global_step, seconds=seconds, model=final, last_logs=logs)


def _validation_grid(args, accelerator, model, ema, make_pipeline, step: int) -> None:
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
    try:
        unwrapped.eval()
        path = os.path.join(args.output_dir, "samples", f"step-{step:06d}.png")
        save_sample_grid(make_pipeline(unwrapped), path, args.num_validation_images, args.validation_inference_steps,
                         args.seed)
        logger.info("saved samples to %s", path)
    finally:
        if ema is not None:
            ema.restore(unwrapped.parameters())
        unwrapped.train()


def final_sample_grid(args: argparse.Namespace, pipeline: MSGMPipeline, name: str = "final.png") -> str | None:
    """Sample grid with the final (EMA) weights under ``samples/``."""
    path = os.path.join(args.output_dir, "samples", name)
    save_sample_grid(pipeline, path, args.num_validation_images, args.validation_inference_steps, args.seed)
    return path
