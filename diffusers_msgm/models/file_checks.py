"""Checks a model folder must pass before diffusers reads it.

They refuse what would otherwise load silently wrong or unsafely: pickle-only weights (unless
``allow_pickle=True``), truncated or corrupt safetensors files, and ``config.json`` files with unknown (e.g.
misspelt) or missing fields.
"""

from __future__ import annotations

import inspect
import json
import os

from safetensors import safe_open

from .score_model import ScoreModel

#: weight files that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: config keys every diffusers config may carry besides the ``__init__`` arguments.
CONFIG_METADATA_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def read_json(path: str) -> dict:
    """Parse a JSON file; invalid JSON is a ``ValueError`` naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def check_weights_dir(folder: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Refuse a model folder whose weights are pickle-only (unless ``allow_pickle``) or whose safetensors are corrupt.

    With ``allow_pickle=True`` diffusers loads ``.bin`` files with ``torch.load(weights_only=True)``, which refuses
    pickles that would build arbitrary objects.
    """
    folder = os.fspath(folder)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    safetensors_files = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not safetensors_files and not allow_pickle:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}) and no .safetensors file; loading a pickle "
            "can run arbitrary code, so it is refused. Pass allow_pickle=True (--allow_pickle) to load it with "
            "torch.load(weights_only=True), or convert the weights to safetensors."
        )
    for name in safetensors_files:
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError)
            raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt): {err}") from err


def check_score_model_config(config_path: str | os.PathLike) -> dict:
    """Read a ScoreModel ``config.json`` and refuse unknown or missing fields (a misspelt ``sde_type`` would
    otherwise be ignored and the default VP SDE used). Returns the parsed config."""
    config_path = os.fspath(config_path)
    config = read_json(config_path)
    if config.get("_class_name") != "ScoreModel":
        raise ValueError(f"{config_path} is not a ScoreModel config (_class_name={config.get('_class_name')!r})")
    expected = [p for p in inspect.signature(ScoreModel.__init__).parameters if p != "self"]
    unknown = sorted(k for k in config if k not in expected and k not in CONFIG_METADATA_KEYS)
    missing = [k for k in expected if k not in config]
    if unknown or missing:
        raise ValueError(
            f"{config_path} does not match ScoreModel's fields: "
            + "; ".join(part for part in (f"unknown {unknown}" if unknown else "",
                                          f"missing {missing}" if missing else "") if part)
            + f" (expected exactly {expected})"
        )
    return config


def check_score_model_dir(folder: str | os.PathLike, allow_pickle: bool = False) -> None:
    """:func:`check_score_model_config` on ``folder/config.json`` and :func:`check_weights_dir` on ``folder``."""
    config_path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{os.fspath(folder)} has no config.json: it is not a saved ScoreModel")
    check_score_model_config(config_path)
    check_weights_dir(folder, allow_pickle=allow_pickle)
