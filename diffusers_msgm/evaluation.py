"""Evaluate (moderated) score pipelines: undesirable-generation rate, classifier-feature FID/KID and bits/dim.

One :class:`EvaluationSetup` (held-out data split into retained / forgotten classes, the classifier, the seeds)
is shared by every model evaluated, so that the numbers of different models are comparable: the same prior
noise (``seed``), sampler and NFE for sampling, the same reference images for FID/KID, and the same dequantised
test images and Hutchinson probes for bits/dim.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import ImageTransform, load_image_dataset
from .data.splits import resolve_label_ids
from .image_utils import images_to_grid, save_image_atomic
from .metrics.classifier import ImageClassifier, train_classifier
from .metrics.fid import MIN_SAMPLES, classifier_fid_kid
from .metrics.likelihood import bits_per_dim
from .metrics.ugr import undesirable_generation_rate


@dataclass
class EvaluationSetup:
    """Everything that must be identical across the models of one comparison."""

    dataset: str
    forget_ids: list[int]
    class_names: list[str] | None
    classifier: ImageClassifier
    classifier_accuracy: float | None
    reference: torch.Tensor  # held-out real retained-class images, [-1, 1]
    bpd_retained: torch.Tensor
    bpd_forgotten: torch.Tensor
    resolution: int
    channels: int
    num_images: int = 256
    num_inference_steps: int = 100
    seed: int = 0
    bpd_kwargs: dict[str, Any] = field(default_factory=dict)
    kid_subsets: int = 50
    kid_subset_size: int = 200

    def describe(self) -> dict[str, Any]:
        names = [self.class_names[i] for i in self.forget_ids] if self.class_names else self.forget_ids
        return {"dataset": self.dataset, "forget_ids": self.forget_ids, "forget_names": names,
                "classifier_test_accuracy": self.classifier_accuracy, "reference_images": len(self.reference),
                "bpd_images": [len(self.bpd_retained), len(self.bpd_forgotten)], "resolution": self.resolution,
                "num_images": self.num_images, "num_inference_steps": self.num_inference_steps, "seed": self.seed,
                "bpd": self.bpd_kwargs, "kid": [self.kid_subsets, self.kid_subset_size]}


def dataset_tensors(dataset: Any, resolution: int, channels: int, image_column: str = "image",
                    label_column: str = "label") -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled image Dataset as ``([-1, 1] images (N, C, R, R), labels (N,))``."""
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} not in the dataset's columns {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    transform = ImageTransform(resolution, channels)
    images = torch.stack([transform(im) for im in dataset[image_column]])
    return images, torch.as_tensor(np.asarray(dataset[label_column]), dtype=torch.long)


def prepare_evaluation(
    dataset: str,
    forget: list[str],
    resolution: int,
    channels: int = 1,
    classifier: str | ImageClassifier | None = None,
    classifier_epochs: int | None = None,
    eval_split: str = "test",
    train_split: str = "train",
    data_root: str | None = None,
    num_images: int = 256,
    num_inference_steps: int = 100,
    seed: int = 0,
    num_ref: int = 2000,
    bpd_images: int = 64,
    bpd_kwargs: dict[str, Any] | None = None,
) -> EvaluationSetup:
    """Load the held-out split, resolve ``forget`` (ids or class names) and load or train the classifier.

    ``classifier``: an :class:`ImageClassifier` or its directory; ``None`` trains one on ``train_split``
    (``classifier_epochs``; its test accuracy on ``eval_split`` is reported).
    """
    if num_images < MIN_SAMPLES:
        raise ValueError(f"num_images must be >= {MIN_SAMPLES} (MIN_SAMPLES) for FID/KID, got {num_images}")
    if num_inference_steps < 1 or bpd_images < 0:
        raise ValueError("num_inference_steps must be >= 1 and bpd_images >= 0")
    test = load_image_dataset(dataset, split=eval_split, data_root=data_root)
    forget_ids = resolve_label_ids(test, "label", forget, arg_name="forget")
    names = getattr(test.features.get("label"), "names", None)
    accuracy = None
    if classifier is None:
        train = load_image_dataset(dataset, split=train_split, data_root=data_root)
        classifier, metrics = train_classifier(train, test, resolution=resolution, channels=channels,
                                               epochs=classifier_epochs, seed=seed)
        accuracy = metrics["test_accuracy"]
    elif not isinstance(classifier, ImageClassifier):
        path = str(classifier)
        classifier = ImageClassifier.from_pretrained(path)
        metrics_file = os.path.join(path, "metrics.json")
        if os.path.isfile(metrics_file):
            accuracy = json.load(open(metrics_file)).get("test_accuracy")
    if classifier.config.resolution != resolution or classifier.config.in_channels != channels:
        raise ValueError(
            f"the classifier reads {classifier.config.in_channels}x{classifier.config.resolution}x"
            f"{classifier.config.resolution} images but the models generate {channels}x{resolution}x{resolution}; "
            "train or pass a classifier at the models' resolution"
        )
    x, y = dataset_tensors(test, resolution, channels)
    forgotten = torch.isin(y, torch.tensor(forget_ids))
    gen = torch.Generator().manual_seed(seed)
    retained_x, forgotten_x = x[~forgotten], x[forgotten]
    if len(retained_x) < MIN_SAMPLES:
        raise ValueError(f"only {len(retained_x)} held-out retained images; FID needs >= {MIN_SAMPLES}")
    reference = retained_x[torch.randperm(len(retained_x), generator=gen)[:num_ref]]
    bpd_r = retained_x[torch.randperm(len(retained_x), generator=gen)[:bpd_images]]
    bpd_f = forgotten_x[torch.randperm(len(forgotten_x), generator=gen)[:bpd_images]]
    return EvaluationSetup(dataset=str(dataset), forget_ids=forget_ids, class_names=names, classifier=classifier,
                           classifier_accuracy=accuracy, reference=reference, bpd_retained=bpd_r,
                           bpd_forgotten=bpd_f, resolution=resolution, channels=channels, num_images=num_images,
                           num_inference_steps=num_inference_steps, seed=seed, bpd_kwargs=dict(bpd_kwargs or {}))


def sample_images(pipeline: Any, setup: EvaluationSetup, batch_size: int = 256) -> tuple[torch.Tensor, float]:
    """``setup.num_images`` samples in [-1, 1] (prior noise from ``setup.seed``) and the sampling seconds."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(setup.seed)
    start, parts = time.perf_counter(), []
    for offset in range(0, setup.num_images, batch_size):
        n = min(batch_size, setup.num_images - offset)
        out = pipeline(batch_size=n, num_inference_steps=setup.num_inference_steps, generator=generator,
                       output_type="pt").images
        parts.append(out * 2 - 1)
    return torch.cat(parts), time.perf_counter() - start


def evaluate_pipeline(pipeline: Any, setup: EvaluationSetup) -> dict[str, Any]:
    """UGR, FID/KID against the retained reference, and bits/dim on retained vs forgotten held-out images."""
    c, h, w = pipeline.score_model.sample_shape
    if (c, h, w) != (setup.channels, setup.resolution, setup.resolution):
        raise ValueError(f"the pipeline generates {c}x{h}x{w} images but the evaluation is set up for "
                         f"{setup.channels}x{setup.resolution}x{setup.resolution}")
    images, seconds = sample_images(pipeline, setup)
    ugr = undesirable_generation_rate(setup.classifier, images, setup.forget_ids)
    quality = classifier_fid_kid(setup.classifier, images, setup.reference, subsets=setup.kid_subsets,
                                 subset_size=setup.kid_subset_size, seed=setup.seed)
    result: dict[str, Any] = {"ugr": ugr["ugr"], "class_histogram": ugr["class_histogram"], "fid": quality["fid"],
                              "kid": quality["kid"], "kid_std": quality["kid_std"],
                              "sampling_seconds": round(seconds, 2), "images": images}
    if len(setup.bpd_retained) and len(setup.bpd_forgotten):
        start = time.perf_counter()
        model = pipeline.score_model.eval()
        for name, data in (("bpd_retained", setup.bpd_retained), ("bpd_forgotten", setup.bpd_forgotten)):
            out = bits_per_dim(model, data, seed=setup.seed, **setup.bpd_kwargs)
            result[name], result[name + "_std"] = out["bpd"], out["bpd_std"]
        result["bpd_seconds"] = round(time.perf_counter() - start, 2)
    return result


def save_grid(images: torch.Tensor, path: str, n: int = 64) -> None:
    """The first ``n`` images of a [-1, 1] batch as a PNG grid (written atomically)."""
    grid = ((images[:n] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    save_image_atomic(images_to_grid(grid, scale=max(1, 64 // images.shape[-1]), padding=2), path)


def report_markdown(results: dict[str, dict[str, Any]], setup: EvaluationSetup, command: str) -> str:
    """A markdown table of the results of several models under one setup."""
    info = setup.describe()
    lines = ["# MSGM evaluation", "", f"Command: `{command}`", "",
             f"- Dataset `{info['dataset']}`, forgotten classes {info['forget_ids']} ({info['forget_names']})",
             f"- Classifier test accuracy: {info['classifier_test_accuracy']}",
             f"- {info['num_images']} samples per model, {info['num_inference_steps']} sampler steps, seed "
             f"{info['seed']}; FID/KID on the classifier's features against {info['reference_images']} held-out "
             "retained-class images (classifier-feature FID, not Inception)",
             f"- Bits/dim: {info['bpd_images'][0]} retained / {info['bpd_images'][1]} forgotten held-out images, "
             f"probability-flow ODE {info['bpd'] or '(rk45 defaults)'}", "",
             "| model | UGR | FID | KID | bpd retained | bpd forgotten |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        bpd = [f"{r[k]:.3f}" if k in r else "—" for k in ("bpd_retained", "bpd_forgotten")]
        lines.append(f"| {name} | {r['ugr']:.3f} | {r['fid']:.2f} | {r['kid']:.4g} | {bpd[0]} | {bpd[1]} |")
    return "\n".join(lines) + "\n"


def write_json_atomic(data: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
