"""Crash-safe checkpoints and final pipeline directories.

* ``checkpoint-N`` directories are written as ``.checkpoint-N.tmp`` by ``accelerator.save_state`` and renamed
  when complete, so ``--resume_from_checkpoint latest`` never sees a partial one.
* the final pipeline is written to a temporary directory, moved into ``output_dir`` component by component with
  ``model_index.json`` removed first and put back last: a killed save never leaves a loadable half-pipeline.
* old checkpoints are pruned (``--checkpoints_total_limit``) only after the new one is complete, and a failed
  write (e.g. a full disk) removes its temporary directory and raises an ``OSError`` naming what was being
  saved; the previous checkpoints and pipeline stay intact. Temporary directories left by a killed run are
  removed by the next save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

from accelerate import Accelerator
from diffusers import DiffusionPipeline

from ..models.file_checks import check_weights_dir

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TEMP_CHECKPOINT_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")
TEMP_PIPELINE_RE = re.compile(r"^\.pipeline-")
INDEX_FILE = "model_index.json"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def checkpoint_step(path: str) -> int:
    """The step ``N`` of a ``checkpoint-N`` directory; a ``ValueError`` for any other name."""
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"--resume_from_checkpoint {path!r} is not a 'checkpoint-N' directory")
    return int(match.group(1))


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (None when there is none yet) or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", output_dir)
            return None
        check_weights_dir(checkpoints[-1][1], allow_pickle=True)
        return checkpoints[-1][1]
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(candidate):
            checkpoint_step(candidate)
            check_weights_dir(candidate, allow_pickle=True)  # accelerate's optimizer / RNG files are pickles
            return candidate
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint directory")


def _remove_stale_temporaries(output_dir: str, pattern: re.Pattern) -> None:
    """Remove temporary directories a killed save left behind (they are never loadable)."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if pattern.match(name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _discard(path: str) -> None:
    """Remove a checkpoint directory: renamed away first (atomic), so a kill mid-removal leaves no partial
    ``checkpoint-N`` that resuming could pick up."""
    doomed = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _write_failed(err: OSError, what: str, intact: str) -> OSError:
    return OSError(err.errno, f"could not write {what}: {err.strerror or err} ({intact})")


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """``accelerator.save_state`` into ``checkpoint-{step}`` atomically; keep at most ``total_limit`` of them.

    Older checkpoints are pruned only after the new one is in place, so a crash never leaves fewer complete ones.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        _remove_stale_temporaries(output_dir, TEMP_CHECKPOINT_RE)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(err, final, "the previous checkpoints are intact") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            _discard(final)
        os.replace(tmp, final)
        logger.info("saved state to %s", final)
        if total_limit is not None:
            existing = [c for c in list_checkpoints(output_dir) if c[0] != step]
            for _, path in existing[: max(0, len(existing) - (total_limit - 1))]:
                logger.info("removing old checkpoint %s", path)
                _discard(path)
    accelerator.wait_for_everyone()
    return final


def save_pipeline_atomic(pipeline: DiffusionPipeline, output_dir: str, extra_files: dict[str, str] | None = None) -> None:
    """``pipeline.save_pretrained`` into ``output_dir`` so that the directory is loadable only when complete."""
    os.makedirs(output_dir, exist_ok=True)
    _remove_stale_temporaries(output_dir, TEMP_PIPELINE_RE)
    tmp = tempfile.mkdtemp(prefix=".pipeline-", dir=output_dir)
    try:
        try:
            pipeline.save_pretrained(tmp, safe_serialization=True)
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
        except OSError as err:
            intact = "the pipeline already there is intact" if os.path.exists(os.path.join(output_dir, INDEX_FILE)) \
                else "nothing loadable was written"
            raise _write_failed(err, f"the pipeline in {output_dir}", intact) from err
        index = os.path.join(output_dir, INDEX_FILE)
        if os.path.exists(index):
            os.remove(index)  # the old pipeline stops being loadable before its parts are replaced
        for name in sorted(os.listdir(tmp)):
            if name == INDEX_FILE:
                continue
            dst = os.path.join(output_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, name), dst)
        os.replace(os.path.join(tmp, INDEX_FILE), index)  # last: now the pipeline is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
