"""Training-data attribution for score models: TRAK, D-TRAK (Zheng et al. 2024) and DAS (Lin et al., ICLR 2025).

With projected train features Phi (N x k, rows phi_i; ``gradient_features``) and a query feature phi_q:

* TRAK / D-TRAK:  tau(q, i) = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i
* DAS:            tau(q, i) = ( phi_q^T (Phi^T Phi + lambda I)^-1 phi_i * r_i / (1 - h_i) )^2

where h_i = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i is the leverage of sample i and r_i its residual
mean_k sqrt(DSM loss at t_k) divided by the mean over the training set (the leave-one-out Newton step of
Pregibon 1981, mapped through the query's output gradient and squared: the size of the output change). TRAK and
D-TRAK scores are signed: positive means training on the sample is predicted to lower the query's loss (exact to
first order for TRAK's loss output; D-TRAK's output function is a proxy). DAS scores are >= 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .gradient_features import GradientFeaturizer, check_method

CONFIG_NAME = "attribution_config.json"
TENSORS_NAME = "attribution_index.safetensors"
FORMAT_VERSION = 1


def model_fingerprint(score_model) -> str:
    """SHA-256 of the trainable parameters (names, shapes and bytes): ties an index to the weights it was built on."""
    digest = hashlib.sha256()
    for name, param in score_model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def images_to_tensor(data: Any, score_model, image_column: str = "image", argument: str = "images") -> torch.Tensor:
    """A float tensor ``(N, C, H, W)`` in the model's data range from a tensor or a ``datasets.Dataset``.

    Tensors must already match ``score_model.sample_shape``; dataset images go through the project's
    :class:`~diffusers_msgm.data.ImageTransform` (resize, centre crop, scale to [-1, 1] or [0, 1]).
    """
    shape = tuple(score_model.sample_shape)
    low = -1.0 if score_model.config.centered_data else 0.0
    if isinstance(data, torch.Tensor):
        if data.ndim != 4 or not data.is_floating_point():
            raise ValueError(f"`{argument}` must be a float tensor (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise ValueError(f"`{argument}` is empty")
        if tuple(data.shape[1:]) != shape:
            raise ValueError(f"`{argument}` has images of shape {tuple(data.shape[1:])} but the model expects {shape}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError(f"`{argument}` has non-finite values (NaN or Inf)")
        if bool((data < low - 1e-3).any() | (data > 1.0 + 1e-3).any()):
            raise ValueError(f"`{argument}` values must lie in [{low:g}, 1], got [{data.min():.3g}, {data.max():.3g}]")
        return data.float()
    import datasets

    from ..data import ImageTransform

    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"`{argument}` must be a torch.Tensor or a datasets.Dataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"`{argument}` is an empty dataset")
    if image_column not in data.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of `{argument}`: {data.column_names}")
    if shape[1] != shape[2]:
        raise ValueError(f"datasets need a square model sample size, got {shape[1:]}")
    transform = ImageTransform(shape[1], channels=shape[0], normalize=bool(score_model.config.centered_data))
    return torch.stack([transform(image) for image in data[image_column]])


class AttributionIndex:
    """Projected gradient features of a training set and what is needed to score queries against them.

    Build with :meth:`build`, query with :meth:`attribute`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], score_model=None) -> None:
        self.config, self.tensors, self.score_model = config, tensors, score_model

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        score_model,
        train_dataset: Any,
        method: str = "d-trak",
        proj_dim: int = 1024,
        timesteps: int | list[float] = 10,
        *,
        seed: int = 0,
        damping: float | None = None,
        batch_size: int = 16,
        projection: str = "gaussian",
        image_column: str = "image",
    ) -> AttributionIndex:
        """Compute the training features and the kernel (Phi^T Phi + lambda I)^-1.

        Args:
            score_model: an unconditional :class:`~diffusers_msgm.ScoreModel`.
            train_dataset: float tensor ``(N, C, H, W)`` in [-1, 1] (``[0, 1]`` if the model's data is not
                centered) or a ``datasets.Dataset`` with an ``image_column``.
            method (`str`): ``"trak"``, ``"d-trak"`` or ``"das"`` (output functions: ``gradient_features``).
            proj_dim (`int`): k, at most the number of trainable parameters.
            timesteps: K (uniform bin midpoints of (0, T]) or an explicit list of continuous times.
            seed (`int`): seeds the projection and the fixed noise per timestep.
            damping (`float`, *optional*): lambda; default ``0.1 * trace(Phi^T Phi) / k``.
            batch_size (`int`): images per vmap call.
            projection (`str`): ``"gaussian"`` or ``"rademacher"``.
        """
        check_method(method)
        images = images_to_tensor(train_dataset, score_model, image_column, argument="train_dataset")
        featurizer = GradientFeaturizer(score_model, method, timesteps, proj_dim, seed=seed, projection=projection,
                                        batch_size=batch_size)
        features, residuals = featurizer.features(images)
        return cls.from_features(featurizer, features, residuals, damping)

    @classmethod
    def from_features(cls, featurizer: GradientFeaturizer, features: torch.Tensor, residuals: torch.Tensor,
                      damping: float | None = None) -> AttributionIndex:
        """An index from training features already computed by ``featurizer`` (e.g. to try several lambdas)."""
        if features.ndim != 2 or features.shape[1] != featurizer.projector.proj_dim:
            raise ValueError(f"`features` must have shape (N, {featurizer.projector.proj_dim}), got {tuple(features.shape)}")
        if residuals.shape != (features.shape[0],):
            raise ValueError(f"`residuals` must have shape ({features.shape[0]},), got {tuple(residuals.shape)}")
        phi = features.double()
        gram = phi.T @ phi
        if damping is None:
            damping = 0.1 * float(torch.diagonal(gram).mean())
        if not damping >= 0:
            raise ValueError(f"`damping` must be >= 0, got {damping}")
        kernel = gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype)
        preconditioned = torch.linalg.solve(kernel, phi.T).T  # rows: (Phi^T Phi + lambda I)^-1 phi_i
        leverage = (preconditioned * phi).sum(1)
        model = featurizer.model
        config = {
            "format_version": FORMAT_VERSION,
            "method": featurizer.method,
            "proj_dim": featurizer.projector.proj_dim,
            "timesteps": featurizer.times.tolist(),
            "seed": featurizer.seed,
            "damping": float(damping),
            "projection": featurizer.projector.config,
            "num_train": int(features.shape[0]),
            "sample_shape": list(model.sample_shape),
            "model_fingerprint": model_fingerprint(model),
        }
        tensors = {
            "train_features": features.float(),
            "preconditioned": preconditioned.float(),
            "residuals": residuals.float(),
            "leverage": leverage.float(),
        }
        return cls(config, tensors, model)

    # ------------------------------------------------------------------ queries
    @property
    def method(self) -> str:
        return self.config["method"]

    def _model(self, score_model):
        model = score_model if score_model is not None else self.score_model
        if model is None:
            raise ValueError("this index has no score model: pass `score_model` (the one the index was built on)")
        if model_fingerprint(model) != self.config["model_fingerprint"]:
            raise ValueError("`score_model` differs from the model the index was built on (parameter fingerprint)")
        return model

    def query_features(self, images: Any, score_model=None, image_column: str = "image") -> torch.Tensor:
        """Projected features ``(n_query, k)`` of query images (same output function, timesteps, noise, projection)."""
        model = self._model(score_model)
        queries = images_to_tensor(images, model, image_column, argument="images")
        projection = self.config["projection"]
        featurizer = GradientFeaturizer(model, self.method, self.config["timesteps"], self.config["proj_dim"],
                                        seed=self.config["seed"], projection=projection["kind"],
                                        block_size=projection["block_size"])
        return featurizer.features(queries)[0]

    def scores_from_features(self, query_features: torch.Tensor) -> torch.Tensor:
        """tau(q, i) of the module docstring, ``(n_query, n_train)``."""
        scores = query_features.double() @ self.tensors["preconditioned"].double().T
        if self.method == "das":
            residuals = self.tensors["residuals"].double()
            one_minus_h = (1 - self.tensors["leverage"].double()).clamp_min(1e-6)  # h < 1 whenever lambda > 0
            weight = residuals / residuals.mean().clamp_min(1e-12) / one_minus_h
            scores = (scores * weight).pow(2)
        return scores.float()

    def attribute(self, images: Any, score_model=None, image_column: str = "image") -> torch.Tensor:
        """Attribution scores ``(n_query, n_train)`` of query images against the training set."""
        return self.scores_from_features(self.query_features(images, score_model, image_column))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``attribution_config.json`` and ``attribution_index.safetensors`` to ``directory`` atomically."""
        directory = os.path.abspath(os.fspath(directory))
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".attribution-", dir=parent)
        old = None
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, os.path.join(tmp, TENSORS_NAME))
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(self.config, f, indent=2)
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix=".attribution-old-", dir=parent)
                os.replace(directory, os.path.join(old, "index"))
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, score_model=None) -> AttributionIndex:
        """Read an index written by :meth:`save`; ``score_model`` is needed later by :meth:`attribute`."""
        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported attribution index format {config.get('format_version')!r}")
        index = cls(config, load_file(os.path.join(directory, TENSORS_NAME)))
        if score_model is not None:
            index._model(score_model)
            index.score_model = score_model
        return index
