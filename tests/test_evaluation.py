"""`msgm evaluate`, the shared evaluation setup, external classifiers and the reproduction benchmark's smoke run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_unet

from diffusers_msgm import ScoreModel
from diffusers_msgm.cli import main as cli_main
from diffusers_msgm.evaluation import evaluate_pipeline, prepare_evaluation
from diffusers_msgm.metrics import ImageClassifier, external, undesirable_generation_rate
from diffusers_msgm.training.builders import make_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tiny_pipeline(path, size=8, seed=0):
    pipe = make_pipeline(ScoreModel.from_unet(tiny_unet(size, seed=seed), sde_type="vp"))
    pipe.save_pretrained(path)
    return pipe


def tiny_classifier(resolution=8, num_classes=10):
    torch.manual_seed(0)
    return ImageClassifier(in_channels=1, num_classes=num_classes, resolution=resolution,
                           class_names=[str(i) for i in range(num_classes)], hidden_channels=(4, 8, 8),
                           feature_dim=16)


def test_msgm_evaluate_writes_json_markdown_and_grids(tmp_path):
    save_tiny_pipeline(tmp_path / "a", seed=0)
    save_tiny_pipeline(tmp_path / "b", seed=1)
    out = tmp_path / "eval"
    cli_main(["evaluate", "--model", f"before={tmp_path / 'a'}", "--model", f"after={tmp_path / 'b'}",
              "--dataset", "digits", "--forget", "1", "--num_images", "50", "--num_inference_steps", "2",
              "--bpd_images", "3", "--bpd_solver", "euler", "--bpd_steps", "2", "--classifier_epochs", "1",
              "--num_ref", "60", "--output_dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"before", "after"}
    for r in report["results"].values():
        assert 0.0 <= r["ugr"] <= 1.0 and sum(r["class_histogram"]) == 50
        assert all(math.isfinite(r[k]) for k in ("fid", "kid", "bpd_retained", "bpd_forgotten"))
    assert report["setup"]["forget_ids"] == [1] and report["setup"]["bpd_images"] == [3, 3]
    assert "| before |" in (out / "report.md").read_text()
    assert (out / "samples_before.png").is_file() and (out / "samples_after.png").is_file()
    assert (out / "classifier" / "config.json").is_file()


def test_evaluation_refuses_mismatches_and_too_few_samples(tmp_path):
    clf = tiny_classifier(resolution=8)
    with pytest.raises(ValueError, match="num_images must be >= 50"):
        prepare_evaluation("digits", ["1"], 8, classifier=clf, num_images=10)
    with pytest.raises(ValueError, match="the classifier reads 1x8x8 images but the models generate 1x16x16"):
        prepare_evaluation("digits", ["1"], 16, classifier=clf, num_images=50)
    with pytest.raises(ValueError, match="forget"):
        prepare_evaluation("digits", ["seven"], 8, classifier=clf, num_images=50)
    setup = prepare_evaluation("digits", ["1"], 8, classifier=clf, num_images=50, bpd_images=0)
    pipe16 = save_tiny_pipeline(tmp_path / "p16", size=16)
    with pytest.raises(ValueError, match="generates 1x16x16 images"):
        evaluate_pipeline(pipe16, setup)
    save_tiny_pipeline(tmp_path / "p8", size=8)
    with pytest.raises(SystemExit, match="different image shapes"):
        cli_main(["evaluate", "--model", str(tmp_path / "p8"), "--model", str(tmp_path / "p16"), "--forget", "1",
                  "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_transformers_image_classifier_for_ugr():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    vit = ViTForImageClassification(config)
    classify = external.transformers_classifier(vit, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    logits = classify(images)
    # by hand: grey -> RGB, bilinear to 16x16, (x01 - 0.5) / 0.5
    x = torch.nn.functional.interpolate(((images + 1) / 2).repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear")
    with torch.no_grad():
        expected = vit(pixel_values=(x - 0.5) / 0.5).logits
    torch.testing.assert_close(logits, expected)
    ugr = undesirable_generation_rate(classify, images, [2])
    assert ugr["n"] == 6 and len(ugr["class_histogram"]) == 3
    assert ugr["ugr"] == pytest.approx(float((expected.argmax(1) == 2).float().mean()))
    with pytest.raises(TypeError, match="transformers image-classification model"):
        external.transformers_classifier(torch.nn.Linear(2, 2))


def test_inception_fid_explains_missing_dependency(monkeypatch):
    monkeypatch.setattr(external.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="torchmetrics"):
        external.inception_fid(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))


def test_reproduction_benchmark_smoke(tmp_path):
    """The whole reproduction pipeline on digits at CI size: 7 models trained and evaluated, table and plots."""
    report, figure = tmp_path / "r.md", tmp_path / "r.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "reproduce_msgm.py"), "--smoke",
                           "--output_dir", str(tmp_path / "runs"), "--report", str(report), "--figure", str(figure)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    for name in ("original", "gold standard", "MSGM fine-tune (obtuse)", "MSGM fine-tune (obtuse_official)",
                 "MSGM fine-tune (orthogonal)", "MSGM fine-tune (orthogonal_cosine)", "MSGM re-trained (obtuse)"):
        assert f"| {name} |" in text
    results = json.loads((tmp_path / "runs" / "results.json").read_text())["results"]
    assert len(results) == 7 and all(0 <= r["ugr"] <= 1 and math.isfinite(r["fid"]) for r in results.values())
    assert figure.is_file() and (tmp_path / "r_samples.png").is_file()
