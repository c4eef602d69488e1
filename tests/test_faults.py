"""Faults during an MSGM fine-tune (``unlearn.py``): SIGKILL at chosen and at random write events, a full disk.

A *tripwire* wraps the run's writes (safetensors / ``torch.save`` files, renames, directory removals) and its
training steps. The reference run records the sequence of these events; a forked copy of the run is then
SIGKILLed at one event -- a file write is first torn in half, as a kill in the middle of ``write`` leaves it.
After every kill: each ``checkpoint-N`` that resuming could pick is complete and equal to the reference's, the
output directory is loadable only if the whole pipeline is there, and ``--resume_from_checkpoint latest`` ends
with exactly the reference's weights. (``test_launch.py`` SIGKILLs a fresh ``python training/train_score.py``
process once; forking the test process here avoids re-importing torch for every kill point.)
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal

import accelerate.utils.other
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from diffusers_msgm import MSGMPipeline
from diffusers_msgm.losses import MSGMLoss
from diffusers_msgm.training import train_score, unlearn
from diffusers_msgm.training.checkpointing import list_checkpoints, save_pipeline_atomic

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked copy of the run")

DATA = ["--dataset_name", "digits", "--resolution", "8", "--train_batch_size", "16", "--logger", "none",
        "--validation_steps", "0", "--num_validation_images", "2", "--validation_inference_steps", "2", "--seed", "0"]
FINETUNE = ["--forget_labels", "1", "--variant", "obtuse", "--forget_weight", "0.5", "--forget_every", "1",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema"]
WEIGHTS = os.path.join("score_model", "diffusion_pytorch_model.safetensors")


class Tripwire:
    """Records the run's write events ``(kind, path relative to the output dir)``; SIGKILLs the process at event
    number ``kill_at`` or at the first event ``kill_when(kind, rel)`` accepts. A killed write is torn in half."""

    def __init__(self, output_dir, kill_at=None, kill_when=None):
        self.root, self.kill_at, self.kill_when = os.path.abspath(output_dir), kill_at, kill_when
        self.events: list[tuple[str, str]] = []

    def hit(self, kind: str, path) -> None:
        path = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else ""
        rel = os.path.relpath(path, self.root) if path.startswith(self.root) else os.path.basename(path)
        self.events.append((kind, rel))
        if len(self.events) == self.kill_at or (self.kill_when is not None and self.kill_when(kind, rel)):
            if kind == "write" and os.path.isfile(path):
                os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, setattr) -> None:
        """Wrap the write functions with ``setattr(owner, name, wrapper)`` (a monkeypatch, or plain in a child)."""
        real_st, real_acc_st = safetensors.torch.save_file, accelerate.utils.other.safe_save_file
        real_save, real_replace, real_rmtree, real_loss = torch.save, os.replace, shutil.rmtree, MSGMLoss.__call__

        def writer(real):
            def write(obj, f, *args, **kwargs):
                real(obj, f, *args, **kwargs)
                self.hit("write", f)
            return write

        def replace(src, dst, **kwargs):
            self.hit("rename", dst)
            real_replace(src, dst, **kwargs)

        def rmtree(path, *args, **kwargs):
            self.hit("remove", path)
            real_rmtree(path, *args, **kwargs)

        def loss(obj, model, x_retain, x_forget, step=0, **kwargs):
            self.hit("step", f"micro-step {step}")
            return real_loss(obj, model, x_retain, x_forget, step=step, **kwargs)

        setattr(safetensors.torch, "save_file", writer(real_st))
        setattr(accelerate.utils.other, "safe_save_file", writer(real_acc_st))
        setattr(torch, "save", writer(real_save))
        setattr(os, "replace", replace)
        setattr(shutil, "rmtree", rmtree)
        setattr(MSGMLoss, "__call__", loss)


def argv(base, out, *extra):
    return DATA + FINETUNE + ["--pretrained_model_name_or_path", str(base), "--output_dir", str(out), *extra]


def run_and_kill(args: list[str], out, kill_at=None, kill_when=None) -> None:
    """Run ``unlearn`` in a forked child that the tripwire SIGKILLs; fail if it was not killed."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            Tripwire(out, kill_at, kill_when).install(setattr)
            unlearn.main(unlearn.parse_args(args))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child not killed: status {status}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here (reference, killed children, resumes) on one thread: bit-equality across processes needs the
    same reduction order, and a forked child does not inherit a multi-threaded pool reliably."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_score.main(train_score.parse_args(DATA + ["--block_out_channels", "8", "16", "--output_dir", str(out),
                                                    "--max_train_steps", "2", "--checkpointing_steps", "2"]))
    return out


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The uninterrupted fine-tune, with its write events and checkpoint contents."""
    out = tmp_path_factory.mktemp("reference")
    wire = Tripwire(out)
    with pytest.MonkeyPatch.context() as mp:
        wire.install(mp.setattr)
        unlearn.main(unlearn.parse_args(argv(base, out)))
    checkpoints = {step: _checkpoint_contents(path) for step, path in list_checkpoints(str(out))}
    return {"out": out, "events": wire.events, "weights": load_file(out / WEIGHTS), "checkpoints": checkpoints}


def _checkpoint_contents(path) -> dict:
    contents = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            contents[rel] = load_file(full) if name.endswith(".safetensors") else os.path.getsize(full)
    return contents


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_nothing_partial_is_loadable(out, reference) -> None:
    """Every checkpoint resuming could pick equals the reference's; the pipeline loads only when complete."""
    for step, path in list_checkpoints(str(out)):
        got, want = _checkpoint_contents(path), reference["checkpoints"][step]
        assert got.keys() == want.keys(), f"checkpoint-{step} is incomplete: {sorted(set(want) - set(got))}"
        for rel, value in want.items():
            assert _same_tensors(got[rel], value) if isinstance(value, dict) else got[rel] > 0, (step, rel)
    if (out / "model_index.json").exists():  # the index goes in last: the pipeline must be whole
        loaded = MSGMPipeline.from_pretrained(out)
        assert _same_tensors(loaded.score_model.state_dict(), reference["weights"])
    else:
        with pytest.raises((OSError, ValueError)):
            MSGMPipeline.from_pretrained(out)


def resume_and_compare(base, out, reference) -> None:
    info = unlearn.main(unlearn.parse_args(argv(base, out, "--resume_from_checkpoint", "latest")))
    assert info["global_step"] == 4
    assert _same_tensors(load_file(out / WEIGHTS), reference["weights"])
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary directories left behind"


TARGETED = {
    # a checkpoint file torn in the middle of its write
    "torn-checkpoint-write": lambda kind, rel: kind == "write" and rel.startswith(".checkpoint-4.tmp"),
    # the checkpoint is complete but not yet renamed into place
    "before-checkpoint-rename": lambda kind, rel: kind == "rename" and rel == "checkpoint-4",
    # mid-step: after the step-2 checkpoint, in the forward of micro-step 3
    "mid-training-step": lambda kind, rel: kind == "step" and rel == "micro-step 3",
    # the final pipeline: weights written into the temporary dir, torn
    "torn-pipeline-write": lambda kind, rel: kind == "write" and rel.startswith(".pipeline-"),
    # the final pipeline: components moved in, model_index.json not yet
    "before-pipeline-index": lambda kind, rel: kind == "rename" and rel == "model_index.json",
}


@pytest.mark.parametrize("point", sorted(set(TARGETED) - {"torn-checkpoint-write"}))  # that one: the limit test
def test_sigkill_at_a_chosen_point_then_resume(base, reference, tmp_path, point):
    out = tmp_path / "cut"
    run_and_kill(argv(base, out), out, kill_when=TARGETED[point])
    assert_nothing_partial_is_loadable(out, reference)
    resume_and_compare(base, out, reference)


@pytest.mark.parametrize("draw", range(2))
def test_sigkill_at_a_random_write_event_then_resume(base, reference, tmp_path, draw):
    """Event numbers drawn (seeded) from the reference run's own sequence of writes, renames, removals, steps."""
    events = reference["events"]
    kill_at = random.Random(1234 + draw).randint(1, len(events))
    out = tmp_path / "cut"
    print(f"killing at event {kill_at} of {len(events)}: {events[kill_at - 1]}")
    run_and_kill(argv(base, out), out, kill_at=kill_at)
    assert_nothing_partial_is_loadable(out, reference)
    resume_and_compare(base, out, reference)


def test_total_limit_keeps_the_old_checkpoint_until_the_new_one_is_complete(base, reference, tmp_path):
    out = tmp_path / "cut"
    args = argv(base, out, "--checkpoints_total_limit", "1")
    run_and_kill(args, out, kill_when=TARGETED["torn-checkpoint-write"])
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    assert_nothing_partial_is_loadable(out, reference)
    info = unlearn.main(unlearn.parse_args(args + ["--resume_from_checkpoint", "latest"]))
    assert info["global_step"] == 4 and [s for s, _ in list_checkpoints(str(out))] == [4]
    assert _same_tensors(load_file(out / WEIGHTS), reference["weights"])


def _disk_full_after_half(real, when):
    """A save function that, for paths ``when`` accepts, writes half the file and fails with ENOSPC."""

    def save(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        if when(os.fspath(path)):
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    return save


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(base, reference, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real = accelerate.utils.other.safe_save_file
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file",
                        _disk_full_after_half(real, lambda p: ".checkpoint-4.tmp" in p))
    with pytest.raises(OSError, match="checkpoint-4.*No space left on device.*previous checkpoints are intact") as err:
        unlearn.main(unlearn.parse_args(argv(base, out)))
    assert err.value.errno == errno.ENOSPC
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # no temp dir, no pipeline
    assert_nothing_partial_is_loadable(out, reference)
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", real)  # space freed: resume
    resume_and_compare(base, out, reference)


def test_disk_full_while_saving_the_pipeline_keeps_the_old_one(base, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    old, old_card = load_file(out / WEIGHTS), (out / "README.md").read_text()
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full_after_half(real, lambda p: "score_model" in p))
    pipe = MSGMPipeline.from_pretrained(base)
    with pytest.raises(OSError, match="No space left on device.*pipeline already there is intact"):
        save_pipeline_atomic(pipe, str(out), {"README.md": "new"})
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert (out / "README.md").read_text() == old_card
    assert _same_tensors(MSGMPipeline.from_pretrained(out).score_model.state_dict(), old)
