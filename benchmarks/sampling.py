"""Sampling cost: MSGMPipeline vs diffusers' DDPMPipeline on the same UNet at equal NFE, and vs NFE bare forwards.

One UNet2DModel (32, 64, 64); ``MSGMPipeline`` wraps it in a VP ``ScoreModel`` (Euler-Maruyama, no corrector,
Tweedie denoising at the end), ``DDPMPipeline`` runs it with a ``DDPMScheduler`` at ``num_inference_steps = NFE``,
and the floor is ``NFE`` calls of ``unet(x, t)`` on the same batch. Whole pipeline calls (``output_type="pt"``, no
progress bar) are timed, interleaved round by round; medians are reported with the ratios. Writes
docs/benchmarks/sampling.md.

    python benchmarks/sampling.py [--resolution 16] [--batch_size 64] [--nfe 50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_malloc_env, machine, time_rounds, tiny_unet, write_report  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from diffusers_msgm import ScoreModel  # noqa: E402
from diffusers_msgm.training.builders import make_pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks", "sampling.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    unet = tiny_unet(args.resolution).eval()
    msgm = make_pipeline(ScoreModel.from_unet(unet, sde_type="vp"), corrector=None)
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    for pipe in (msgm, ddpm):
        pipe.set_progress_bar_config(disable=True)
    x = torch.randn(args.batch_size, 1, args.resolution, args.resolution)
    labels = torch.linspace(999, 0, args.nfe).round().long()

    @torch.no_grad()
    def bare() -> None:
        for t in labels:
            unet(x, t)

    def run_msgm() -> None:
        msgm(batch_size=args.batch_size, num_inference_steps=args.nfe, generator=torch.Generator().manual_seed(0),
             output_type="pt")

    def run_ddpm() -> None:
        ddpm(batch_size=args.batch_size, num_inference_steps=args.nfe, generator=torch.Generator().manual_seed(0),
             output_type="np")

    # NFE check: count UNet calls of each pipeline once
    calls = {"n": 0}
    hook = unet.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    nfe = {}
    for name, fn in (("MSGMPipeline", run_msgm), ("DDPMPipeline", run_ddpm), ("bare", bare)):
        calls["n"] = 0
        fn()
        nfe[name] = calls["n"]
    hook.remove()

    times = time_rounds({"bare UNet x NFE": bare, "DDPMPipeline": run_ddpm, "MSGMPipeline": run_msgm},
                        steps=1, rounds=args.rounds, warmup=1)
    base, ddpm_t = times["bare UNet x NFE"], times["DDPMPipeline"]
    lines = ["# Sampling cost: MSGMPipeline vs DDPMPipeline", "",
             f"Tiny UNet2DModel (32, 64, 64), {args.resolution}x{args.resolution}, batch {args.batch_size}, NFE "
             f"{args.nfe}; median of {args.rounds} interleaved rounds of one whole pipeline call. Machine: {machine()}.",
             "", f"Command: `MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 python "
             f"benchmarks/sampling.py --resolution {args.resolution} --batch_size {args.batch_size} --nfe {args.nfe} "
             f"--rounds {args.rounds}`", "",
             "| run | UNet calls | s / call | / bare UNet x NFE | / DDPMPipeline |", "|---|---|---|---|---|"]
    counted = {"bare UNet x NFE": nfe["bare"], "DDPMPipeline": nfe["DDPMPipeline"], "MSGMPipeline": nfe["MSGMPipeline"]}
    for name, sec in times.items():
        lines.append(f"| {name} | {counted[name]} | {sec:.3f} | {sec / base:.3f} | {sec / ddpm_t:.3f} |")
    lines += ["", "MSGMPipeline's extra work per step is the epsilon -> score conversion and the Euler-Maruyama "
              "update (a few element-wise ops on the batch); the goal is <= 1.05x DDPMPipeline."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.output, text)


if __name__ == "__main__":
    ensure_malloc_env()
    main()
