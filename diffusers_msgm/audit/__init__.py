"""Audit a trained diffusion model: find memorised training data, attribute samples to training images, and
verify an unlearning.

* :mod:`.p_laplace`: the p-Laplacian of log p_t from the score (divergence-theorem flux, Hutchinson trace).
* :mod:`.memorization`: memorisation scores of training images (Brokman et al., SSVM 2025).
* :mod:`.attribution`: TRAK / D-TRAK / DAS training-data attribution (:class:`AttributionIndex`), with the
  per-sample gradient features of :mod:`.gradient_features` and the seeded projection of :mod:`.projection`.
* :mod:`.text_conditional`: text-conditional noise magnitude of Wen et al. (ICLR 2024): detection, token
  explanation and inference-time mitigation (:mod:`.text_conditional_mitigation`).
* :mod:`.verify`: the before/after report of ``msgm audit`` (UGR, memorisation, attribution mass).
"""

from .attribution import AttributionIndex
from .memorization import memorization_scores
from .p_laplace import hutchinson_laplacian, p_laplace_flux, resolve_score_fn, sphere_directions
from .text_conditional import TextConditionalComponents, detect_text_memorization, token_significance
from .text_conditional_mitigation import (
    generate_from_embeds,
    mitigate_prompt_embeds,
    per_sample_text_magnitude,
    text_conditional_ddpm_loss,
    wen_filtered_loss,
)
from .verify import AuditSettings, attribution_mass, audit_unlearning

__all__ = [
    "AttributionIndex",
    "AuditSettings",
    "TextConditionalComponents",
    "attribution_mass",
    "audit_unlearning",
    "detect_text_memorization",
    "generate_from_embeds",
    "hutchinson_laplacian",
    "memorization_scores",
    "mitigate_prompt_embeds",
    "p_laplace_flux",
    "per_sample_text_magnitude",
    "resolve_score_fn",
    "sphere_directions",
    "text_conditional_ddpm_loss",
    "token_significance",
    "wen_filtered_loss",
]
