"""The user's road through the Hub, with the network boundary replaced by a local folder.

An MSGM fine-tune is pushed (``--push_to_hub``: ``create_repo`` + ``upload_folder`` copy into ``hub/<repo id>``),
then loaded three ways -- ``MSGMPipeline.from_pretrained(repo_id)``, ``DiffusionPipeline.from_pretrained(repo_id,
custom_pipeline=..., trust_remote_code=True)`` and the local output folder -- and sampled with one seed. Only the
functions that talk to the Hub are replaced (in ``diffusers_msgm.hub`` and where diffusers imported them:
``model_info``, ``hf_hub_download``, ``snapshot_download``, revision resolution); everything diffusers decides
from the repo's file list (allowed files, custom components, the custom pipeline file) runs as for a real repo.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub.errors import EntryNotFoundError

from diffusers_msgm import MSGMPipeline
from diffusers_msgm.hub import COMMUNITY_PIPELINE_SOURCE
from diffusers_msgm.training import train_score, unlearn

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "me/digits-no-ones"
SECRET = "hf_do_not_publish_me"
DATA = ["--dataset_name", "digits", "--resolution", "8", "--train_batch_size", "16", "--logger", "none",
        "--validation_steps", "0", "--num_validation_images", "2", "--validation_inference_steps", "2", "--seed", "0"]


class FakeHub:
    """A folder per repo id, served through the signatures of the huggingface_hub functions diffusers calls."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def repo(self, repo_id: str) -> Path:
        if not (self.root / repo_id).is_dir():
            raise FileNotFoundError(f"{repo_id} is not on the fake hub")
        return self.root / repo_id

    def files(self, repo_id: str) -> list[str]:
        root = self.repo(repo_id)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    # -- upload side (diffusers_msgm.hub)
    def create_repo(self, repo_id, exist_ok=False, private=False, token=None):
        self.calls.append(("create_repo", repo_id, private, token))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None, token=None):
        self.calls.append(("upload_folder", repo_id, tuple(ignore_patterns or ())))
        for path in Path(folder_path).rglob("*"):
            rel = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or ()):
                (self.root / repo_id / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, self.root / repo_id / rel)

    # -- download side (diffusers_msgm.hub and diffusers)
    def model_info(self, repo_id, revision=None, token=None, **kwargs):
        self.calls.append(("model_info", repo_id))
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in self.files(repo_id)], sha="0" * 40)

    def hf_hub_download(self, repo_id, filename, subfolder=None, **kwargs):
        self.calls.append(("hf_hub_download", repo_id, filename))
        path = self.repo(repo_id) / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)

    def snapshot_download(self, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        """Copy the allowed files into a cache snapshot (so a file diffusers did not ask for is really absent)."""
        self.calls.append(("snapshot_download", repo_id))
        snapshot = self.root.parent / "cache" / repo_id.replace("/", "--")
        for rel in self.files(repo_id):
            allowed = allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)
            if allowed and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or ()):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.root / repo_id / rel, snapshot / rel)
        return str(snapshot)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import diffusers.pipelines.pipeline_utils as pipeline_utils
        import diffusers.utils.dynamic_modules_utils as dynamic_modules

        for name in ("create_repo", "upload_folder", "snapshot_download"):
            mp.setattr(f"diffusers_msgm.hub.{name}", getattr(self, name))
        for name in ("model_info", "hf_hub_download", "snapshot_download"):
            mp.setattr(pipeline_utils, name, getattr(self, name))
        for name in ("model_info", "hf_hub_download"):
            mp.setattr(dynamic_modules, name, getattr(self, name))
        mp.setattr(pipeline_utils, "_resolve_revision", lambda name, revision=None, **kwargs: revision)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Pretrain 2 steps, MSGM-fine-tune 2 steps (forget digit 1) and push."""
    root = tmp_path_factory.mktemp("hub-road")
    hub = FakeHub(root / "hub")
    base, out = root / "base", root / "moderated"
    train_score.main(train_score.parse_args(DATA + ["--block_out_channels", "8", "16", "--output_dir", str(base),
                                                    "--max_train_steps", "2", "--checkpointing_steps", "2"]))
    command = DATA + ["--pretrained_model_name_or_path", str(base), "--forget_labels", "1", "--variant", "obtuse",
                      "--forget_weight", "0.5", "--forget_every", "1", "--max_train_steps", "2",
                      "--checkpointing_steps", "2", "--output_dir", str(out), "--push_to_hub",
                      "--hub_model_id", REPO_ID, "--hub_token", SECRET]
    with pytest.MonkeyPatch.context() as mp:
        hub.install(mp)
        info = unlearn.main(unlearn.parse_args(command))
    return SimpleNamespace(hub=hub, base=base, out=out, info=info, command=command)


def samples(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="pt").images


def test_push_uploads_the_pipeline_card_and_entry_file_but_no_checkpoints_or_secrets(pushed):
    assert pushed.info["repo_id"] == REPO_ID
    assert ("create_repo", REPO_ID, False, SECRET) in pushed.hub.calls  # the token goes to the Hub API only
    files = pushed.hub.files(REPO_ID)
    assert {"model_index.json", "README.md", "pipeline.py", "score_model/config.json",
            "score_model/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(files)
    assert not [f for f in files if f.startswith(("checkpoint-", ".", "logs/"))], files
    assert (pushed.hub.root / REPO_ID / "pipeline.py").read_text() == COMMUNITY_PIPELINE_SOURCE
    entry = (REPO_ROOT / "pipelines" / "msgm_pipeline.py").read_text()
    import_line = "from diffusers_msgm.pipelines.pipeline_msgm import MSGMPipeline"
    assert import_line in entry and import_line in COMMUNITY_PIPELINE_SOURCE  # one class, two entry files


def test_model_card_lists_base_concept_variant_metrics_and_the_exact_command(pushed):
    card = (pushed.hub.root / REPO_ID / "README.md").read_text()
    assert f"base_model: {pushed.base}" in card
    assert "| forgotten concept | digits classes 1 (label ids [1]) |" in card
    assert "| MSGM variant | obtuse |" in card
    assert "## Metrics" in card and "| final training loss |" in card and "| final forget loss |" in card
    command_line = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert command_line.startswith("msgm unlearn ")
    shown = command_line.split()
    hidden = ["'***'" if word == SECRET else word for word in pushed.command]
    assert shown[2:] == hidden, "the card's command must be the one that ran, with the token redacted"
    assert SECRET not in card
    assert f'MSGMPipeline.from_pretrained("{REPO_ID}")' in card


def test_three_roads_give_identical_samples(pushed, monkeypatch):
    monkeypatch.chdir(pushed.out.parent)  # no local folder named like the repo id
    pushed.hub.install(monkeypatch)
    local = samples(MSGMPipeline.from_pretrained(pushed.out))
    by_repo_id = samples(MSGMPipeline.from_pretrained(REPO_ID))
    pushed.hub.calls.clear()
    via_diffusers = DiffusionPipeline.from_pretrained(REPO_ID, custom_pipeline=REPO_ID, trust_remote_code=True)
    assert type(via_diffusers).__name__ == "MSGMPipeline"
    assert ("model_info", REPO_ID) in pushed.hub.calls and ("hf_hub_download", REPO_ID, "pipeline.py") in pushed.hub.calls
    via_entry_file = DiffusionPipeline.from_pretrained(
        REPO_ID, custom_pipeline=str(REPO_ROOT / "pipelines" / "msgm_pipeline.py"), trust_remote_code=True)
    assert local.shape == (3, 1, 8, 8)
    for other in (by_repo_id, samples(via_diffusers), samples(via_entry_file)):
        assert torch.equal(local, other)

