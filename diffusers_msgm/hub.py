"""The network boundary: turn a local directory or a Hub repo id into a local directory.

Plain ``DiffusionPipeline.from_pretrained(repo_id)`` refuses pipelines whose components live in a pip package
(diffusers#6563: it looks for ``<component>/<module>.py`` files in the repo). We download the snapshot first and
load from the local copy, which goes through the code path that works.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from huggingface_hub import create_repo, snapshot_download, upload_folder

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def pop_hub_kwargs(kwargs: dict) -> dict:
    """Remove and return the keyword arguments that concern downloading (they are not pipeline arguments)."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def resolve_pretrained_dir(
    name_or_path: str | os.PathLike, allow_patterns: Sequence[str] | None = None, **hub_kwargs
) -> str:
    """Return ``name_or_path`` if it is a local directory, else download the Hub snapshot and return its path."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"`pretrained_model_name_or_path` {name_or_path!r} is a file; expected a directory or a repo id")
    return snapshot_download(repo_id=name_or_path, allow_patterns=list(allow_patterns) if allow_patterns else None, **hub_kwargs)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    ignore_patterns: Sequence[str] | None = None,
    commit_message: str = "Upload moderated score model",
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (checkpoints and logs excluded by ``ignore_patterns``)."""
    repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns or []),
        token=token,
    )
    return repo_id
