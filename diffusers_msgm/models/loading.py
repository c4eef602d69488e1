"""Load a :class:`ScoreModel` from whatever a user points at: our pipeline or model dirs, or stock diffusers ones.

Folders are checked first (``file_checks.py``): pickle-only weights are refused unless ``allow_pickle=True``,
corrupt safetensors and configs with unknown or missing fields raise a ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
from typing import Any

from ..hub import resolve_pretrained_dir
from .conversion import score_model_from_diffusers_pipeline
from .file_checks import check_score_model_dir, read_json
from .score_model import ScoreModel


def load_score_model(pretrained_model_name_or_path: str | os.PathLike, allow_pickle: bool = False, **hub_kwargs: Any) -> ScoreModel:
    """Load from a local directory or Hub repo id holding one of:

    * an ``MSGMPipeline`` (``model_index.json`` naming ``MSGMPipeline``) -> its ``score_model/``;
    * a ``ScoreModel`` (``config.json`` with ``_class_name: ScoreModel``);
    * a stock ``DDPMPipeline`` / ``DDIMPipeline`` / ``ScoreSdeVePipeline`` -> converted, see ``conversion.py``.

    Pickle (``.bin``) weights are refused unless ``allow_pickle=True`` (then read with ``weights_only=True``).
    """
    name = os.fspath(pretrained_model_name_or_path)
    local = resolve_pretrained_dir(name, **hub_kwargs)
    index_path, config_path = os.path.join(local, "model_index.json"), os.path.join(local, "config.json")
    use_safetensors = None if allow_pickle else True
    if os.path.isfile(index_path):
        index = read_json(index_path)
        if "score_model" in index:
            check_score_model_dir(os.path.join(local, "score_model"), allow_pickle=allow_pickle)
            return ScoreModel.from_pretrained(local, subfolder="score_model", use_safetensors=use_safetensors)
        return score_model_from_diffusers_pipeline(local, allow_pickle=allow_pickle)
    if os.path.isfile(config_path) and read_json(config_path).get("_class_name") == "ScoreModel":
        check_score_model_dir(local, allow_pickle=allow_pickle)
        return ScoreModel.from_pretrained(local, use_safetensors=use_safetensors)
    raise ValueError(
        f"`pretrained_model_name_or_path` {name!r} holds neither an MSGMPipeline, a ScoreModel nor a stock diffusers "
        "DDPM/ScoreSdeVe pipeline (no model_index.json, and config.json is not a ScoreModel's)"
    )
