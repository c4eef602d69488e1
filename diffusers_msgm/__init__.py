"""diffusers-msgm: find, remove and verify what a diffusion model should not generate (MSGM, ICCV 2025)."""

from .hub import register_with_diffusers_loader
from .losses import (
    FORGET_VARIANTS,
    DDPMMSGMLoss,
    MSGMLoss,
    MSGMLossOutput,
    ddpm_prediction_loss,
    denoising_score_matching_loss,
    forget_term,
    msgm_forget_loss,
)
from .models import ScoreModel, ScoreModelOutput, score_model_from_diffusers_pipeline
from .moderation import DirectionModeration, obtuse_projection, orthogonal_projection, project_score
from .moderation_exemplar import (
    ClassifierModeration,
    ExemplarModeration,
    NoiseAwareClassifier,
    train_noise_aware_classifier,
)
from .pipelines import MSGMInpaintPipeline, MSGMPipeline, MSGMReconstructionPipeline, MSGMReconstructionPipelineOutput
from .schedulers import ModeratedScoreScheduler, ModeratedScoreSchedulerOutput
from .sde import SDE, VESDE, VPSDE, SubVPSDE, get_sde

# lets DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=...) resolve our component modules (hub.py)
register_with_diffusers_loader()

__version__ = "0.1.0"

__all__ = [
    "ClassifierModeration",
    "ExemplarModeration",
    "MSGMInpaintPipeline",
    "MSGMReconstructionPipeline",
    "MSGMReconstructionPipelineOutput",
    "NoiseAwareClassifier",
    "train_noise_aware_classifier",
    "FORGET_VARIANTS",
    "SDE",
    "VESDE",
    "VPSDE",
    "DDPMMSGMLoss",
    "DirectionModeration",
    "MSGMLoss",
    "MSGMLossOutput",
    "MSGMPipeline",
    "ModeratedScoreScheduler",
    "ModeratedScoreSchedulerOutput",
    "ScoreModel",
    "ScoreModelOutput",
    "SubVPSDE",
    "ddpm_prediction_loss",
    "denoising_score_matching_loss",
    "forget_term",
    "get_sde",
    "msgm_forget_loss",
    "obtuse_projection",
    "orthogonal_projection",
    "project_score",
    "score_model_from_diffusers_pipeline",
]
