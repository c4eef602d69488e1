"""Verify an unlearning: one report on a model before and after MSGM, from the three audit angles.

1. **Generation** — undesirable-generation rate and classifier-feature FID of ``num_images`` samples (the shared
   :class:`~diffusers_msgm.evaluation.EvaluationSetup`: same seeds, sampler and NFE for both models).
2. **Memorisation** — p-Laplace memorisation scores (:func:`~diffusers_msgm.audit.memorization_scores`, p = 1:
   minus the mean cosine between the score and the outward normal of a small sphere around ``alpha_t x``) of
   forgotten vs retained training images. After MSGM the forgotten images should no longer sit at modes of p_t.
3. **Attribution** — an :class:`~diffusers_msgm.audit.attribution.AttributionIndex` per model over the same
   training subset (forgotten and retained images), queried with that model's own samples; the *attribution mass*
   on the forgotten images is ``sum_{i in forget} max(tau(q, i), 0) / sum_i max(tau(q, i), 0)``, averaged over
   queries. After MSGM the samples should owe less to the forgotten training images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data import load_image_dataset
from ..evaluation import EvaluationSetup, dataset_tensors, evaluate_pipeline
from .attribution import AttributionIndex
from .memorization import memorization_scores


@dataclass
class AuditSettings:
    """What :func:`audit_unlearning` computes and how much of it."""

    memorization_images: int = 64  # per group (forgotten / retained training images)
    memorization_t: float = 0.05  # best AUC in docs/benchmarks/memorization_p_laplace.md (0.01 is weak there)
    memorization_directions: int = 64
    attribution_train_images: int = 128
    attribution_queries: int = 32
    attribution_method: str = "d-trak"
    attribution_proj_dim: int = 256
    attribution_timesteps: int = 10
    seed: int = 0

    def validate(self, num_images: int) -> None:
        """Refuse counts below 1 and more attribution queries than generated samples."""
        for name in ("memorization_images", "memorization_directions", "attribution_train_images",
                     "attribution_queries", "attribution_proj_dim", "attribution_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attribution_queries > num_images:
            raise ValueError(f"attribution_queries ({self.attribution_queries}) must be <= num_images "
                             f"({num_images}): the queries are the generated samples")


def _subset(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return x[torch.randperm(len(x), generator=generator)[:n]]


def attribution_mass(scores: torch.Tensor, forget_mask: torch.Tensor) -> torch.Tensor:
    """Per query: the share of the positive attribution that falls on the training images in ``forget_mask``."""
    if scores.ndim != 2 or scores.shape[1] != forget_mask.numel():
        raise ValueError(f"scores must be (n_query, {forget_mask.numel()}), got {tuple(scores.shape)}")
    positive = scores.clamp_min(0).double()
    total = positive.sum(1).clamp_min(1e-300)
    return (positive[:, forget_mask].sum(1) / total).float()


def audit_unlearning(
    pipelines: dict[str, Any],
    setup: EvaluationSetup,
    train_split: str = "train",
    data_root: str | None = None,
    settings: AuditSettings | None = None,
) -> dict[str, Any]:
    """Generation, memorisation and attribution numbers for each pipeline (``{"before": p0, "after": p1}``)."""
    settings = settings or AuditSettings()
    settings.validate(setup.num_images)
    train = load_image_dataset(setup.dataset, split=train_split, data_root=data_root)
    x, y = dataset_tensors(train, setup.resolution, setup.channels)
    forgotten = torch.isin(y, torch.tensor(setup.forget_ids))
    if not bool(forgotten.any()) or bool(forgotten.all()):
        raise ValueError("the training split needs both forgotten and retained images for the audit")
    gen = torch.Generator().manual_seed(settings.seed)
    mem_forget = _subset(x[forgotten], settings.memorization_images, gen)
    mem_retain = _subset(x[~forgotten], settings.memorization_images, gen)
    n_forget = max(1, round(settings.attribution_train_images * float(forgotten.float().mean())))
    attr_train = torch.cat([_subset(x[forgotten], n_forget, gen),
                            _subset(x[~forgotten], settings.attribution_train_images - n_forget, gen)])
    attr_mask = torch.arange(len(attr_train)) < min(n_forget, int(forgotten.sum()))

    report: dict[str, Any] = {"settings": asdict(settings), "setup": setup.describe(),
                              "attribution_train": {"forgotten": int(attr_mask.sum()), "total": len(attr_train)},
                              "models": {}}
    for name, pipe in pipelines.items():
        model = pipe.score_model.eval()
        result = evaluate_pipeline(pipe, setup)
        samples = result.pop("images")
        mem = {}
        for group, images in (("forgotten", mem_forget), ("retained", mem_retain)):
            scores = memorization_scores(model, images, t=settings.memorization_t,
                                         n_directions=settings.memorization_directions,
                                         generator=torch.Generator().manual_seed(settings.seed))
            mem[group] = {"mean": float(scores.mean()), "std": float(scores.std()) if len(scores) > 1 else 0.0}
        index = AttributionIndex.build(model, attr_train, method=settings.attribution_method,
                                       proj_dim=settings.attribution_proj_dim, timesteps=settings.attribution_timesteps,
                                       seed=settings.seed)
        mass = attribution_mass(index.attribute(samples[: settings.attribution_queries]), attr_mask)
        report["models"][name] = {
            "ugr": result["ugr"], "fid": result["fid"], "class_histogram": result["class_histogram"],
            "memorization": mem,
            "attribution_mass_on_forgotten": {"mean": float(mass.mean()), "std": float(mass.std())},
            "attribution_mass_prior": float(attr_mask.float().mean()),
        }
    return report


def audit_markdown(report: dict[str, Any], command: str) -> str:
    s, models = report["settings"], report["models"]
    lines = ["# MSGM audit: before vs after", "", f"Command: `{command}`", "",
             f"- Forgotten classes {report['setup']['forget_ids']} ({report['setup']['forget_names']}); "
             f"{report['setup']['num_images']} samples per model, {report['setup']['num_inference_steps']} steps, "
             f"seed {report['setup']['seed']}",
             f"- Memorisation: p = 1 p-Laplace score (higher = more mode-like) at t = {s['memorization_t']}, "
             f"{s['memorization_directions']} directions, {s['memorization_images']} training images per group",
             f"- Attribution: {s['attribution_method']} (k = {s['attribution_proj_dim']}, "
             f"{s['attribution_timesteps']} timesteps) over {report['attribution_train']['total']} training images "
             f"({report['attribution_train']['forgotten']} forgotten), {s['attribution_queries']} generated queries "
             "per model; mass = share of positive attribution on forgotten images (its share of the training "
             "subset in the last column)", "",
             "| model | UGR | FID | memorisation forgotten | memorisation retained | attribution mass on forgotten "
             "| share of subset |", "|---|---|---|---|---|---|---|"]
    for name, r in models.items():
        m = r["memorization"]
        lines.append(f"| {name} | {r['ugr']:.3f} | {r['fid']:.2f} | {m['forgotten']['mean']:.3f} ± "
                     f"{m['forgotten']['std']:.3f} | {m['retained']['mean']:.3f} ± {m['retained']['std']:.3f} | "
                     f"{r['attribution_mass_on_forgotten']['mean']:.3f} ± {r['attribution_mass_on_forgotten']['std']:.3f}"
                     f" | {r['attribution_mass_prior']:.3f} |")
    return "\n".join(lines) + "\n"
