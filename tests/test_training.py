"""End-to-end runs of the training scripts on tiny models (a few steps each)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusers_msgm import MSGMPipeline
from diffusers_msgm.training import train_score, unlearn
from diffusers_msgm.training.checkpointing import list_checkpoints

TINY = ["--dataset_name", "digits", "--resolution", "8", "--train_batch_size", "16", "--logger", "none",
        "--validation_steps", "0", "--num_validation_images", "4", "--validation_inference_steps", "2", "--seed", "0"]
MODEL = ["--block_out_channels", "8", "16"]


def pretrain(out, steps=4, extra=()):
    return train_score.main(train_score.parse_args(TINY + MODEL + ["--output_dir", str(out), "--max_train_steps", str(steps),
                                                           "--checkpointing_steps", "2", *extra]))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("original")
    pretrain(out)
    return out


def weights(path):
    return load_file(os.path.join(path, "score_model", "diffusion_pytorch_model.safetensors"))


def test_train_score_writes_a_loadable_pipeline_card_and_checkpoints(pretrained):
    assert [s for s, _ in list_checkpoints(pretrained)] == [2, 4]
    card = (pretrained / "README.md").read_text()
    assert "denoising score matching" in card and "training steps | 4" in card and "## Command" in card
    assert (pretrained / "samples" / "final.png").exists()
    pipe = MSGMPipeline.from_pretrained(pretrained)
    assert pipe.score_model.sample_shape == (1, 8, 8)
    assert not any(name.startswith(".") for name in os.listdir(pretrained))  # no temp dirs left


def test_exclude_classes_and_discrete_ddpm(tmp_path):
    info = pretrain(tmp_path, steps=2, extra=["--exclude_classes", "1", "7", "--discrete_ddpm"])
    card = (tmp_path / "README.md").read_text()
    assert "DDPM epsilon loss" in card and "1, 7 excluded" in card and info["global_step"] == 2
    assert MSGMPipeline.from_pretrained(tmp_path).score_model.config.prediction_type == "epsilon"


@pytest.mark.parametrize("extra", [[], ["--gradient_accumulation_steps", "2", "--random_flip"]],
                         ids=["plain", "accumulate-flip"])
def test_resume_continues_exactly(tmp_path, monkeypatch, extra):
    """Interrupt after the step-3 checkpoint, resume from 'latest': same weights and EMA as one uninterrupted run."""
    args = MODEL + ["--max_train_steps", "5", "--checkpointing_steps", "3", "--use_ema", *extra]
    full = train_score.main(train_score.parse_args(TINY + args + ["--output_dir", str(tmp_path / "full")]))

    import diffusers_msgm.training.trainer as trainer

    real_save = trainer.save_checkpoint

    def save_then_die(accelerator, output_dir, step, limit=None):
        path = real_save(accelerator, output_dir, step, limit)
        raise KeyboardInterrupt(f"killed after {path}")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_score.main(train_score.parse_args(TINY + args + ["--output_dir", str(tmp_path / "cut")]))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert not (tmp_path / "cut" / "model_index.json").exists()
    resumed = train_score.main(train_score.parse_args(
        TINY + args + ["--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"]))
    assert resumed["global_step"] == full["global_step"] == 5
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    cb = load_file(tmp_path / "cut" / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def _unlearn(pretrained, out, *extra):
    return unlearn.main(unlearn.parse_args(TINY + [
        "--pretrained_model_name_or_path", str(pretrained), "--output_dir", str(out), "--max_train_steps", "3",
        "--checkpointing_steps", "3", "--forget_every", "1", "--forget_weight", "0.5", *extra]))


@pytest.mark.parametrize("extra", [["--variant", "obtuse"], ["--variant", "orthogonal_cosine", "--mode", "retrain"],
                                   ["--variant", "orthogonal", "--discrete_ddpm"]],
                         ids=["finetune-obtuse", "retrain", "ddpm"])
def test_unlearn_end_to_end(pretrained, tmp_path, extra):
    info = _unlearn(pretrained, tmp_path, "--forget_labels", "1", *extra)
    assert info["forget_label_ids"] == [1] and info["global_step"] == 3
    card = (tmp_path / "README.md").read_text()
    assert "digits classes 1 (label ids [1])" in card and f"MSGM variant | {extra[1]}" in card
    assert f"base_model: {pretrained}" in card
    before, after = weights(pretrained), weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    MSGMPipeline.from_pretrained(tmp_path)(batch_size=1, num_inference_steps=2)


def test_unlearn_from_image_folders(pretrained, tmp_path):
    from PIL import Image

    for name, value in (("keep", 40), ("drop", 220)):
        os.makedirs(tmp_path / name)
        for i in range(20):
            Image.new("L", (8, 8), color=value + i).save(tmp_path / name / f"{i}.png")
    info = _unlearn(pretrained, tmp_path / "out", "--retain_dir", str(tmp_path / "keep"), "--forget_dir",
                    str(tmp_path / "drop"))
    assert "drop/" in info["concept"] and info["global_step"] == 3


def test_push_to_hub_then_load_by_repo_id(pretrained, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    calls = {}

    class Repo:
        repo_id = "me/digits-no-ones"

    def fake_create_repo(repo_id, exist_ok, private, token):
        calls["create"] = (repo_id, private)
        return Repo()

    def fake_upload_folder(repo_id, folder_path, commit_message, ignore_patterns, token):
        calls["upload"] = ignore_patterns
        shutil.copytree(folder_path, hub / repo_id, ignore=shutil.ignore_patterns("checkpoint-*", "logs", ".*"))

    monkeypatch.setattr("diffusers_msgm.hub.create_repo", fake_create_repo)
    monkeypatch.setattr("diffusers_msgm.hub.upload_folder", fake_upload_folder)
    info = _unlearn(pretrained, tmp_path / "out", "--forget_labels", "1", "--push_to_hub", "--hub_model_id",
                    "me/digits-no-ones", "--hub_private_repo")
    assert info["repo_id"] == "me/digits-no-ones" and calls["create"] == ("me/digits-no-ones", True)
    assert "checkpoint-*/*" in calls["upload"]
    pushed = hub / "me/digits-no-ones"
    assert "me/digits-no-ones" in (pushed / "README.md").read_text()
    monkeypatch.setattr("diffusers_msgm.hub.snapshot_download", lambda repo_id, **kw: str(hub / repo_id))
    a = MSGMPipeline.from_pretrained("me/digits-no-ones")
    b = MSGMPipeline.from_pretrained(tmp_path / "out")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(a(batch_size=2, num_inference_steps=3, generator=gen(), output_type="pt").images,
                       b(batch_size=2, num_inference_steps=3, generator=gen(), output_type="pt").images)


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (["--forget_labels", "42"], ValueError, "out of range"),
        (["--forget_labels", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"], ValueError, "retain set would be empty"),
        (["--forget_labels", "1", "--resolution", "16"], ValueError, "does not match the model's sample_size"),
        (["--forget_labels", "1", "--resume_from_checkpoint", "checkpoint-77"], ValueError, "no such checkpoint"),
        (["--forget_labels", "one"], ValueError, "unknown class name"),
        ([], ValueError, "say what to forget"),
    ],
)
def test_unlearn_bad_input(pretrained, tmp_path, extra, error, match):
    args = [a for a in TINY if a not in ("--resolution", "8")] + (["--resolution", "8"] if "--resolution" not in extra else [])
    with pytest.raises(error, match=match):
        unlearn.main(unlearn.parse_args(args + ["--pretrained_model_name_or_path", str(pretrained), "--output_dir",
                                                str(tmp_path), *extra]))
    assert not (tmp_path / "model_index.json").exists()


def test_unknown_variant_and_empty_forget_folder(pretrained, tmp_path):
    with pytest.raises(SystemExit):
        unlearn.parse_args(["--pretrained_model_name_or_path", "x", "--forget_labels", "1", "--variant", "square"])
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "keep")
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "keep" / "a.png")
    with pytest.raises(ValueError, match="no images|empty"):
        _unlearn(pretrained, tmp_path / "out", "--retain_dir", str(tmp_path / "keep"), "--forget_dir",
                 str(tmp_path / "empty"))


def test_non_finite_loss_stops_with_the_step_and_a_checkpoint(pretrained, tmp_path, monkeypatch):
    from diffusers_msgm.losses import MSGMLoss

    real_call = MSGMLoss.__call__

    def nan_at_micro_step_2(self, model, x_retain, x_forget, step=0, **kw):
        out = real_call(self, model, x_retain, x_forget, step=step, **kw)
        if step == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MSGMLoss, "__call__", nan_at_micro_step_2)
    with pytest.raises(FloatingPointError, match="training step 3") as err:
        _unlearn(pretrained, tmp_path, "--forget_labels", "1")
    assert "checkpoint-2" in str(err.value) and (tmp_path / "checkpoint-2").is_dir()
    assert not (tmp_path / "model_index.json").exists()
