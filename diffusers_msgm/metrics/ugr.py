"""Undesirable-generation rate (UGR): the share of generated images a classifier puts in the forgotten classes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from ..data.splits import labels_to_ids
from .classifier import ImageClassifier, ImagesLike, images_to_tensor

LabelFn = Callable[[torch.Tensor], Any]


def _to_labels(output: Any, batch: int) -> tuple[torch.Tensor, int | None]:
    """Labels from a classifier output (2-D logits -> argmax, 1-D ints as is) and the logit width if known."""
    if hasattr(output, "logits"):
        output = output.logits
    output = torch.as_tensor(output).detach().cpu()
    if output.ndim == 2:
        labels, width = output.argmax(dim=1), output.shape[1]
    elif output.ndim == 1 and not torch.is_floating_point(output) and output.dtype != torch.bool:
        labels, width = output.long(), None
    else:
        raise ValueError(
            "the classifier must return 2-D logits (B, num_classes) or 1-D integer labels (B,), "
            f"got shape {tuple(output.shape)} dtype {output.dtype}"
        )
    if len(labels) != batch:
        raise ValueError(f"the classifier returned {len(labels)} predictions for a batch of {batch} images")
    return labels, width


def _check_ids(ids: list[int], num_classes: int) -> None:
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(
            f"forget_labels {bad} out of range for a classifier of {num_classes} classes (0..{num_classes - 1})"
        )


@torch.no_grad()
def undesirable_generation_rate(
    classifier_or_callable: Union[ImageClassifier, LabelFn],
    images: ImagesLike,
    forget_labels: Union[int, str, Sequence[Union[int, str]]],
    batch_size: int = 256,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """UGR = (images classified into ``forget_labels``) / (all images).

    ``classifier_or_callable`` is an :class:`ImageClassifier` or any callable mapping a [-1, 1] image batch
    ``(B, C, H, W)`` to logits ``(B, K)`` (argmax is taken) or integer labels ``(B,)``. ``images`` is a
    tensor in [-1, 1], an NHWC numpy array in [0, 1] or a list of PIL images. ``forget_labels`` are ids or
    class names (names need an ``ImageClassifier``). The number of classes is ``num_classes``, else the
    classifier's config, else the logit width; for a callable returning labels without ``num_classes`` the
    histogram is as long as the largest label or forget id seen. A callable that is an ``nn.Module`` is not
    switched to eval mode (an ``ImageClassifier`` is, for the call).

    Returns ``{"ugr": float, "class_histogram": list[int] (count per class), "n": int}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = classifier_or_callable if isinstance(classifier_or_callable, ImageClassifier) else None
    if model is None and not callable(classifier_or_callable):
        name = type(classifier_or_callable).__name__
        raise TypeError(f"classifier_or_callable must be an ImageClassifier or a callable, got {name}")
    if model is not None:
        num_classes = model.config.num_classes if num_classes is None else num_classes
        x = images_to_tensor(images, model.config.resolution, model.config.in_channels)
    else:
        x = images_to_tensor(images)
    if len(x) == 0:
        raise ValueError("images is empty: the UGR of no images is undefined")
    ids = labels_to_ids(forget_labels, model.config.class_names if model is not None else None, "forget_labels",
                        no_names_hint="the classifier has no class names")
    if num_classes is not None:
        _check_ids(ids, num_classes)

    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        parts, width = [], None
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            if model is not None:
                batch = batch.to(model.device, model.dtype)
            labels, width = _to_labels(classifier_or_callable(batch), len(batch))
            parts.append(labels)
    finally:
        if model is not None:
            model.train(was_training)
    labels = torch.cat(parts)
    low, high = int(labels.min()), int(labels.max())
    if num_classes is None and width is not None:
        num_classes = width
        _check_ids(ids, num_classes)
    if num_classes is None:  # a callable returning labels: size the histogram from what was seen
        if min(ids) < 0:
            raise ValueError(f"forget_labels must be non-negative label ids, got {ids}")
        num_classes = max(high, max(ids)) + 1
    if low < 0 or high >= num_classes:
        raise ValueError(f"the classifier predicted labels outside [0, {num_classes}): [{low}, {high}]")
    histogram = torch.bincount(labels, minlength=num_classes)
    n = len(labels)
    return {"ugr": int(histogram[ids].sum()) / n, "class_histogram": histogram.tolist(), "n": n}
