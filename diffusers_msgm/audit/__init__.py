"""Audit a trained diffusion model: find memorised training data and verify what it generates.

* :mod:`.p_laplace`: the p-Laplacian of log p_t from the score (divergence-theorem flux, Hutchinson trace).
* :mod:`.memorization`: memorisation scores of training images (Brokman et al., SSVM 2025).
"""

from .memorization import memorization_scores
from .p_laplace import hutchinson_laplacian, p_laplace_flux, resolve_score_fn, sphere_directions

__all__ = [
    "hutchinson_laplacian",
    "memorization_scores",
    "p_laplace_flux",
    "resolve_score_fn",
    "sphere_directions",
]
