from .conversion import score_model_config_from_scheduler, score_model_from_diffusers_pipeline
from .loading import load_score_model
from .score_model import PREDICTION_TYPES, ScoreModel, ScoreModelOutput

__all__ = [
    "PREDICTION_TYPES",
    "ScoreModel",
    "ScoreModelOutput",
    "load_score_model",
    "score_model_config_from_scheduler",
    "score_model_from_diffusers_pipeline",
]
