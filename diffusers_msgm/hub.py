"""The network boundary: turn a local directory or a Hub repo id into a local directory, and push one.

Plain ``DiffusionPipeline.from_pretrained(repo_id)`` refuses pipelines whose components live in a pip package
(diffusers#6563: it looks for ``<component>/<module>.py`` files in the repo). ``MSGMPipeline.from_pretrained``
downloads the snapshot first and loads from the local copy, which goes through the code path that works; and
:func:`register_with_diffusers_loader` (run when ``diffusers_msgm`` is imported) lists our component modules in
diffusers' table of loadable libraries, so that after ``import diffusers_msgm``

    DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=repo_id, trust_remote_code=True)

works too: the training export writes the community entry file as ``pipeline.py`` next to the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from huggingface_hub import create_repo, snapshot_download, upload_folder

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")

#: modules named in the ``model_index.json`` of our pipelines, with the diffusers base class of their component.
COMPONENT_MODULES = {
    "diffusers_msgm.models.score_model": "ModelMixin",
    "diffusers_msgm.schedulers.scheduling_moderated_score": "SchedulerMixin",
}
#: file name diffusers' ``custom_pipeline=<repo id>`` fetches from a repo, and what the export writes there: the
#: same re-export as the repository's ``pipelines/msgm_pipeline.py``.
COMMUNITY_PIPELINE_FILE = "pipeline.py"
COMMUNITY_PIPELINE_SOURCE = (
    "# Community-pipeline entry file: DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=repo_id,\n"
    "# trust_remote_code=True) after `pip install diffusers-msgm` and `import diffusers_msgm`.\n"
    "from diffusers_msgm.pipelines.pipeline_msgm import MSGMPipeline\n\n"
    '__all__ = ["MSGMPipeline"]\n'
)


def register_with_diffusers_loader() -> bool:
    """Add :data:`COMPONENT_MODULES` to diffusers' ``LOADABLE_CLASSES`` (diffusers#6563); False if diffusers has
    no such table (then only ``MSGMPipeline.from_pretrained`` loads repo ids)."""
    try:
        from diffusers.pipelines import pipeline_loading_utils
    except ImportError:
        return False
    table = getattr(pipeline_loading_utils, "LOADABLE_CLASSES", None)
    if not isinstance(table, dict):
        return False
    for module, base_class in COMPONENT_MODULES.items():
        table.setdefault(module, {base_class: ["save_pretrained", "from_pretrained"]})
    return True


def pop_hub_kwargs(kwargs: dict) -> dict:
    """Remove and return the keyword arguments that concern downloading (they are not pipeline arguments)."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def looks_like_a_path(name: str) -> bool:
    """True for names that cannot be a Hub repo id ('owner/name'): absolute, ``./``, ``~``, or several slashes."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def resolve_pretrained_dir(
    name_or_path: str | os.PathLike, allow_patterns: Sequence[str] | None = None, **hub_kwargs: Any
) -> str:
    """Return ``name_or_path`` if it is a local directory, else download the Hub snapshot and return its path."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"`pretrained_model_name_or_path` {name_or_path!r} is a file; expected a directory or a repo id")
    if looks_like_a_path(name_or_path):
        raise ValueError(f"`pretrained_model_name_or_path` {name_or_path!r}: no such directory (and it is not a Hub "
                         "repo id, which has the form 'name' or 'owner/name')")
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
