"""Benchmark helpers: glibc malloc settings, machine description, timing rounds."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DModel

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def ensure_malloc_env() -> None:
    """Re-exec with the glibc malloc thresholds set (they must be in the environment at process start):
    without them small-model CPU inference runs up to 1.7x slower."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def time_rounds(fns: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median over ``rounds`` of the mean seconds per call; the functions are interleaved round by round so that
    drifts of the machine affect all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def write_report(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def tiny_unet(resolution: int, channels: int = 1) -> UNet2DModel:
    """The tiny UNet2DModel (32, 64, 64) every benchmark uses."""
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3, norm_num_groups=32)


def save_figure(fig, path: str, dpi: int = 110, **kwargs) -> None:
    """``fig.savefig`` to a temporary PNG next to ``path``, then rename: a figure on disk is always complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path[: -len(".png")] + ".tmp.png" if path.endswith(".png") else path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi, **kwargs)
    os.replace(tmp, path)


def train_dsm(model, images: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int, batch_size: int,
              generator: torch.Generator, log_every: int = 0) -> list[float]:
    """Minibatch denoising score matching on an in-memory image tensor; batches and noise come from ``generator``.
    Returns the loss of every step (printing a running mean every ``log_every`` steps when > 0)."""
    from diffusers_msgm.losses import denoising_score_matching_loss

    losses = []
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        loss = denoising_score_matching_loss(model, images[idx], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    return losses
