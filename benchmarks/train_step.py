"""Seconds per training step: plain DSM vs MSGM fine-tuning vs the diffusers example's DDPM step.

Same tiny UNet2DModel, same retain batch, same optimizer (AdamW), measured in one run with the steps of each
method interleaved. Writes docs/benchmarks/train_step.md.

    python benchmarks/train_step.py [--resolution 16] [--batch_size 64] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_malloc_env, machine, time_rounds, tiny_unet, write_report  # noqa: E402

from diffusers_msgm import MSGMLoss, ScoreModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ensure_malloc_env()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks", "train_step.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    res, bs = args.resolution, args.batch_size
    unet = tiny_unet(res)
    model = ScoreModel.from_unet(unet)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(bs, 1, res, res) * 2 - 1
    x_forget = torch.rand(bs, 1, res, res) * 2 - 1
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ddpm_example_step():  # the body of diffusers' train_unconditional.py
        noise = torch.randn(x.shape)
        timesteps = torch.randint(0, 1000, (bs,)).long()
        noisy = ddpm.add_noise(x, noise, timesteps)
        update(F.mse_loss(unet(noisy, timesteps).sample, noise))

    dsm = MSGMLoss(model.sde, forget_weight=0.0)
    fused = MSGMLoss(model.sde, "obtuse", forget_weight=0.01, forget_every=1)
    unfused = MSGMLoss(model.sde, "obtuse", forget_weight=0.01, forget_every=1, fuse_batches=False)
    every4 = MSGMLoss(model.sde, "obtuse", forget_weight=0.01, forget_every=4)
    counter = [0]

    def every4_step():
        counter[0] += 1
        update(every4(model, x, x_forget, step=counter[0], generator=gen).loss)

    methods = [  # (name, step function, images through the network per step on average)
        ("diffusers example DDPM step", ddpm_example_step, bs),
        ("DSM (ours, no forget term)", lambda: update(dsm(model, x, None, generator=gen).loss), bs),
        ("MSGM, forget batch B/4, every step",
         lambda: update(fused(model, x, x_forget[: bs // 4], generator=gen).loss), bs + bs // 4),
        ("MSGM, forget batch B/2, every step",
         lambda: update(fused(model, x, x_forget[: bs // 2], generator=gen).loss), bs + bs // 2),
        ("MSGM, forget batch B, every step", lambda: update(fused(model, x, x_forget, generator=gen).loss), 2 * bs),
        ("MSGM, forget batch B, every step, two passes",
         lambda: update(unfused(model, x, x_forget, generator=gen).loss), 2 * bs),
        ("MSGM, forget batch B, every 4th step (official)", every4_step, bs + bs // 4),
    ]
    fns = {name: fn for name, fn, _ in methods}
    images = {name: n for name, _, n in methods}
    times = time_rounds(fns, args.steps, args.rounds)
    base = times["DSM (ours, no forget term)"]
    ref = times["diffusers example DDPM step"]
    lines = ["# Training-step cost", "",
             f"Tiny UNet2DModel (32, 64, 64), {res}x{res}, retain batch B = {bs}, AdamW; median of {args.rounds} "
             f"rounds x {args.steps} steps, methods interleaved. Machine: {machine()}.", "",
             f"Command: `python benchmarks/train_step.py --resolution {res} --batch_size {bs} --steps {args.steps} "
             f"--rounds {args.rounds}`", "",
             "| method | s/step | / DSM | / diffusers DDPM step | images per step | s per 1k images |",
             "|---|---|---|---|---|---|"]
    for name, sec in times.items():
        lines.append(f"| {name} | {sec:.4f} | {sec / base:.2f} | {sec / ref:.2f} | {images[name]} | "
                     f"{1000 * sec / images[name]:.3f} |")
    lines += ["", "The forget term adds a forward/backward over the undesirable batch: its cost per image is that of "
              "a DSM image. Retain and forget batches share one forward pass (`fuse_batches=True`)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.output, text)


if __name__ == "__main__":
    main()
