"""Evaluation metrics: the image classifier, the undesirable-generation rate (UGR), FID/KID and bits/dim."""

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

from .external import inception_fid, transformers_classifier  # noqa: E402
from .likelihood import bits_per_dim, dequantize, log_likelihood  # noqa: E402

__all__ += ["bits_per_dim", "dequantize", "inception_fid", "log_likelihood", "transformers_classifier"]
