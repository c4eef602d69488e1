"""Bridges to classifiers and feature extractors from other libraries.

* :func:`transformers_classifier` turns a transformers image-classification model (e.g. a ViT fine-tuned on
  MNIST/CIFAR from the Hub) into the ``[-1, 1] batch -> logits`` callable that
  :func:`~diffusers_msgm.metrics.undesirable_generation_rate` accepts.
* :func:`inception_fid` computes the standard Inception-v3 FID through torchmetrics (which downloads the
  Inception weights once; offline it works only when they are cached). Nothing here re-implements it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .classifier import ImagesLike, images_to_tensor


def _pair(size: Any) -> tuple[int, int] | None:
    """An image processor's ``size`` ({"height", "width"} / {"shortest_edge"} / int) as (H, W)."""
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"unsupported image processor size {size!r}")


def transformers_classifier(
    model: torch.nn.Module,
    image_processor: Any | None = None,
    image_size: int | tuple[int, int] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a transformers ``...ForImageClassification`` model as ``f(x in [-1, 1], (B, C, H, W)) -> logits``.

    The batch is mapped to [0, 1], grey images are repeated to the model's ``config.num_channels``, resized
    (bilinear) to ``image_size`` (else the processor's ``size``, else the model's ``config.image_size``) and
    normalised with ``image_mean``/``image_std`` (else the processor's, else no normalisation) — what the image
    processor would do, on tensors. The model is put in eval mode.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_labels"):
        raise TypeError(f"model must be a transformers image-classification model, got {type(model).__name__}")
    size = _pair(image_size) or _pair(getattr(image_processor, "size", None)) or _pair(getattr(config, "image_size", None))
    if size is None:
        raise ValueError("pass image_size: neither the image processor nor the model config gives one")
    mean = image_mean if image_mean is not None else getattr(image_processor, "image_mean", None)
    std = image_std if image_std is not None else getattr(image_processor, "image_std", None)
    channels = int(getattr(config, "num_channels", 3))
    model.eval()

    @torch.no_grad()
    def classify(x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2
        if x.shape[1] == 1 and channels == 3:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != channels:
            raise ValueError(f"images have {x.shape[1]} channels, the classifier expects {channels}")
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if mean is not None and std is not None:
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        param = next(model.parameters())
        return model(pixel_values=x.to(param.device, param.dtype)).logits.float().cpu()

    return classify


def inception_fid(images_a: ImagesLike, images_b: ImagesLike, batch_size: int = 64) -> float:
    """Standard Inception-v3 FID (torchmetrics ``FrechetInceptionDistance``, 2048-D pool features).

    Needs ``pip install torchmetrics[image]`` and the Inception weights (downloaded once by torch-fidelity; this
    fails offline unless they are cached). Grey images are repeated to RGB; torchmetrics resizes to 299.
    """
    if importlib.util.find_spec("torchmetrics") is None or importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(
            "inception_fid needs torchmetrics and torch-fidelity: pip install 'torchmetrics[image]' (the Inception "
            "weights are downloaded on first use). Offline, use classifier_fid_kid on an ImageClassifier instead."
        )
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True)
    for images, real in ((images_a, True), (images_b, False)):
        x = (images_to_tensor(images) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        for start in range(0, len(x), batch_size):
            metric.update(x[start : start + batch_size].clamp(0, 1), real=real)
    return float(metric.compute())
