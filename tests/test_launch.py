"""The scripts as users run them: ``accelerate launch``, a real SIGKILL mid-run, and the ``msgm`` CLI."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from diffusers_msgm.training import train_score
from diffusers_msgm.training.checkpointing import list_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
DATA = ["--dataset_name", "digits", "--resolution", "8", "--train_batch_size", "16", "--logger", "none",
        "--validation_steps", "0", "--num_validation_images", "4", "--validation_inference_steps", "2", "--seed", "0"]
TINY = DATA + ["--block_out_channels", "8", "16"]


def test_accelerate_launch_pretrain_then_unlearn(tmp_path):
    launch = [os.path.join(BIN, "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"]
    subprocess.run(launch + [os.path.join(REPO, "training", "train_score.py"), *TINY, "--output_dir",
                             str(tmp_path / "orig"), "--max_train_steps", "3", "--checkpointing_steps", "3"],
                   check=True, env=ENV, cwd=tmp_path, timeout=300)
    subprocess.run(launch + [os.path.join(REPO, "training", "unlearn.py"), *DATA, "--output_dir",
                             str(tmp_path / "mod"), "--pretrained_model_name_or_path", str(tmp_path / "orig"),
                             "--forget_labels", "3", "--max_train_steps", "2", "--checkpointing_steps", "2"],
                   check=True, env=ENV, cwd=tmp_path, timeout=300)
    assert (tmp_path / "mod" / "model_index.json").exists()
    assert "digits classes 3" in (tmp_path / "mod" / "README.md").read_text()


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = TINY + ["--max_train_steps", "30", "--checkpointing_steps", "5", "--use_ema"]
    train_score.main(train_score.parse_args(args + ["--output_dir", str(tmp_path / "full")]))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "training", "train_score.py"), *args, "--output_dir",
                             str(cut)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(str(cut)) and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = [s for s, _ in list_checkpoints(str(cut))]
    assert steps and steps[-1] < 30, "the run should have been killed mid-way"
    assert not (cut / "model_index.json").exists()
    resumed = train_score.main(train_score.parse_args(args + ["--output_dir", str(cut), "--resume_from_checkpoint",
                                                              "latest"]))
    assert resumed["global_step"] == 30
    a = load_file(tmp_path / "full" / "score_model" / "diffusion_pytorch_model.safetensors")
    b = load_file(cut / "score_model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_msgm_cli_help_and_sample(tmp_path):
    out = subprocess.run([os.path.join(BIN, "msgm"), "--help"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and "msgm demo" in out.stdout
    bad = subprocess.run([os.path.join(BIN, "msgm"), "fly"], capture_output=True, text=True, env=ENV)
    assert bad.returncode != 0 and "unknown subcommand" in bad.stderr
    from diffusers_msgm.cli import main

    main(["train", *TINY, "--output_dir", str(tmp_path / "m"), "--max_train_steps", "2", "--checkpointing_steps", "2"])
    main(["sample", "--model", str(tmp_path / "m"), "--num_images", "4", "--num_inference_steps", "3", "--output",
          str(tmp_path / "grid.png"), "--predictor", "ode", "--ode_solver", "heun", "--scale", "2"])
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 of 8px x2, 2px gaps
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path / "m"), "--num_images", "0"])


def test_demo_smoke(tmp_path):
    from diffusers_msgm.demo import main as demo_main
    from diffusers_msgm.demo import summary

    report = demo_main(["--output_dir", str(tmp_path), "--pretrain_steps", "3", "--unlearn_steps", "2",
                        "--num_images", "16", "--num_inference_steps", "3", "--classifier_epochs", "1"])
    for name in ("before.png", "after.png", "report.json", "original/model_index.json",
                 "moderated/model_index.json", "classifier/config.json"):
        assert (tmp_path / name).exists(), name
    assert report["before"]["n"] == report["after"]["n"] == 16
    assert sum(report["after"]["class_histogram"]) == 16 and 0 <= report["after"]["ugr"] <= 1
    assert "digit 1 share of 16 samples" in summary(report)
    again = demo_main(["--output_dir", str(tmp_path), "--reuse", "--num_images", "16", "--num_inference_steps", "3"])
    assert again["before"] == report["before"]  # same models, same seeds -> same samples
