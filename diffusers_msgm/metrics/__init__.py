"""Evaluation metrics: the image classifier and the undesirable-generation rate (UGR)."""

from .classifier import ImageClassifier, images_to_tensor, predict, random_shift, train_classifier
from .ugr import undesirable_generation_rate

__all__ = [
    "ImageClassifier",
    "images_to_tensor",
    "predict",
    "random_shift",
    "train_classifier",
    "undesirable_generation_rate",
]

from .fid import MIN_SAMPLES, classifier_fid_kid, frechet_distance, kernel_inception_distance  # noqa: E402

__all__ += ["MIN_SAMPLES", "classifier_fid_kid", "frechet_distance", "kernel_inception_distance"]
