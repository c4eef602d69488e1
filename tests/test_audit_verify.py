"""`msgm audit`: the before/after verify loop (UGR, memorisation, attribution mass)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_unet

from diffusers_msgm import ScoreModel
from diffusers_msgm.audit.verify import attribution_mass
from diffusers_msgm.cli import main as cli_main
from diffusers_msgm.training.builders import make_pipeline


def test_attribution_mass_is_the_positive_share_on_the_forget_set():
    scores = torch.tensor([[1.0, 3.0, -5.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    mask = torch.tensor([True, False, False, True])
    torch.testing.assert_close(attribution_mass(scores, mask), torch.tensor([0.25, 0.5]))
    with pytest.raises(ValueError, match="scores must be"):
        attribution_mass(scores, torch.tensor([True, False]))


def test_msgm_audit_before_after_report(tmp_path):
    for name, seed in (("before", 0), ("after", 1)):
        make_pipeline(ScoreModel.from_unet(tiny_unet(8, seed=seed), sde_type="vp")).save_pretrained(tmp_path / name)
    out = tmp_path / "audit"
    cli_main(["audit", "--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--forget", "1",
              "--num_images", "50", "--num_inference_steps", "2", "--num_ref", "60", "--classifier_epochs", "1",
              "--memorization_images", "3", "--memorization_directions", "4", "--attribution_train_images", "20",
              "--attribution_queries", "4", "--attribution_proj_dim", "16", "--attribution_timesteps", "2",
              "--output_dir", str(out)])
    report = json.loads((out / "audit.json").read_text())
    assert set(report["models"]) == {"before", "after"}
    assert report["attribution_train"] == {"forgotten": 2, "total": 20}
    for r in report["models"].values():
        assert 0 <= r["ugr"] <= 1 and math.isfinite(r["fid"])
        assert -1.0 <= r["memorization"]["forgotten"]["mean"] <= 1.0  # p = 1: minus a mean cosine
        assert 0.0 <= r["attribution_mass_on_forgotten"]["mean"] <= 1.0
        assert r["attribution_mass_prior"] == pytest.approx(0.1)
    assert "| before |" in (out / "audit.md").read_text()


def test_msgm_audit_refuses_too_many_queries(tmp_path):
    make_pipeline(ScoreModel.from_unet(tiny_unet(8), sde_type="vp")).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="attribution_queries"):
        cli_main(["audit", "--before", str(tmp_path / "m"), "--after", str(tmp_path / "m"), "--forget", "1",
                  "--num_images", "50", "--attribution_queries", "60", "--classifier_epochs", "1",
                  "--num_inference_steps", "1", "--num_ref", "60", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
