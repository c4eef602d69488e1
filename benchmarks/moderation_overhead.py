"""Seconds per sampling step: plain vs with inference-time moderation (exemplars, a direction).

Same tiny UNet2DModel (32, 64, 64), same batch; one step = score-model forward + ``scheduler.step`` (the
moderation hook runs inside ``step``). The hook alone is timed too. Writes docs/benchmarks/moderation_overhead.md.

    python benchmarks/moderation_overhead.py [--resolution 16] [--batch_size 64] [--num_exemplars 100] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_malloc_env, machine, time_rounds, tiny_unet, write_report  # noqa: E402

from diffusers_msgm import DirectionModeration, ExemplarModeration, ModeratedScoreScheduler, ScoreModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stepper:
    """One predictor step per call, walking a long time grid (re-set when it runs out)."""

    def __init__(self, model: ScoreModel, x: torch.Tensor, moderation=None, grid: int = 1000):
        self.model, self.x, self.grid = model, x, grid
        self.scheduler = ModeratedScoreScheduler.from_score_model(model, moderation=moderation, denoise_final=False)
        self.gen = torch.Generator().manual_seed(0)
        self.i = grid

    @torch.no_grad()
    def __call__(self) -> None:
        if self.i >= self.grid:
            self.scheduler.set_timesteps(self.grid)
            self.i = 0
        t = self.scheduler.timesteps[self.i]
        score = self.model(self.x, t.expand(self.x.shape[0])).score
        self.scheduler.step(score, t, self.x, generator=self.gen)  # the input is kept: every call costs the same
        self.i += 1


def main() -> None:
    ensure_malloc_env()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_exemplars", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks", "moderation_overhead.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    res, bs, n_ex = args.resolution, args.batch_size, args.num_exemplars
    unet = tiny_unet(res)
    model = ScoreModel.from_unet(unet).eval()
    x = torch.randn(bs, 1, res, res)
    exemplars = torch.rand(n_ex, 1, res, res) * 2 - 1
    exemplar_obtuse = ExemplarModeration(exemplars, model, mode="obtuse")
    exemplar_orth = ExemplarModeration(exemplars, model, mode="orthogonal")
    exemplar_10x = ExemplarModeration(exemplars.repeat(10, 1, 1, 1), model, mode="obtuse")
    direction = DirectionModeration(exemplars[:1], mode="obtuse")
    t_mid = torch.full((bs,), 0.5)
    with torch.no_grad():
        score = model(x, t_mid).score

    methods = {
        "plain step": Stepper(model, x),
        "DirectionModeration (obtuse)": Stepper(model, x, direction),
        f"ExemplarModeration obtuse, {n_ex} exemplars": Stepper(model, x, exemplar_obtuse),
        f"ExemplarModeration orthogonal, {n_ex} exemplars": Stepper(model, x, exemplar_orth),
        f"ExemplarModeration obtuse, {10 * n_ex} exemplars": Stepper(model, x, exemplar_10x),
        f"hook alone: ExemplarModeration, {n_ex} exemplars": lambda: exemplar_obtuse(score, x, t_mid),
        f"hook alone: ExemplarModeration, {10 * n_ex} exemplars": lambda: exemplar_10x(score, x, t_mid),
    }
    times = time_rounds(methods, args.steps, args.rounds)
    base = times["plain step"]
    lines = ["# Inference-time moderation cost", "",
             f"Tiny UNet2DModel (32, 64, 64), {res}x{res}, batch {bs}, Euler-Maruyama step; median of {args.rounds} "
             f"rounds x {args.steps} steps, methods interleaved. Machine: {machine()}.", "",
             f"Command: `python benchmarks/moderation_overhead.py --resolution {res} --batch_size {bs} "
             f"--num_exemplars {n_ex} --steps {args.steps} --rounds {args.rounds}`", "",
             "| method | ms/step | / plain step |", "|---|---|---|"]
    for name, sec in times.items():
        lines.append(f"| {name} | {1000 * sec:.3f} | {sec / base:.3f} |")
    lines += ["", "ExemplarModeration computes the softmax weights with one (batch x D) @ (D x N) matmul and the "
              "weighted exemplar mean with a second, in float64 (CPU/CUDA), so its cost grows with N x D."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.output, text)


if __name__ == "__main__":
    main()
