"""Bad inputs, one table: each case must raise a clear error (the message names the problem) and write nothing.

Every case gets a fresh workspace; ``setup(ws)`` builds the bad input there and returns the call to make. The
workspace's files (names, sizes, mtimes) must be the same after the failed call, and ``ws/out`` (the output
directory of the training cases) must not exist.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import tiny_unet
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_msgm import ExemplarModeration, ModeratedScoreScheduler, MSGMInpaintPipeline, MSGMLoss, MSGMPipeline
from diffusers_msgm.data import ImageTransform, arrays_to_dataset
from diffusers_msgm.models import ScoreModel
from diffusers_msgm.models.loading import load_score_model
from diffusers_msgm.training import train_score, unlearn
from diffusers_msgm.training.data import build_training_data

WEIGHTS = os.path.join("score_model", "diffusion_pytorch_model.safetensors")
CONFIG = os.path.join("score_model", "config.json")
TRAIN = ["--resolution", "8", "--train_batch_size", "4", "--logger", "none", "--validation_steps", "0",
         "--max_train_steps", "2", "--checkpointing_steps", "2", "--seed", "0"]


def tiny_model(seed: int = 0, **unet_kwargs) -> ScoreModel:
    return ScoreModel.from_unet(tiny_unet(seed=seed, **unet_kwargs))


def tiny_pipe(model: ScoreModel | None = None) -> MSGMPipeline:
    model = model or tiny_model()
    return MSGMPipeline(model, ModeratedScoreScheduler.from_score_model(model))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny MSGMPipeline (8x8, 1 channel) to copy and damage."""
    path = tmp_path_factory.mktemp("saved") / "pipe"
    tiny_pipe().save_pretrained(path)
    return path


def copy_pipe(ws, saved) -> str:
    dst = os.path.join(ws, "model")
    shutil.copytree(saved, dst)
    return dst


def edit_config(path: str, change: Callable[[dict], None]) -> None:
    config = json.loads(open(path).read())
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)


# ------------------------------------------------------------------ setups: each returns the failing call
def truncated_weights(ws, saved):
    d = copy_pipe(ws, saved)
    path = os.path.join(d, WEIGHTS)
    os.truncate(path, os.path.getsize(path) // 2)
    return lambda: MSGMPipeline.from_pretrained(d)


def garbage_weights(ws, saved):
    d = copy_pipe(ws, saved)
    with open(os.path.join(d, WEIGHTS), "wb") as f:
        f.write(b"\x00" * 64)
    return lambda: load_score_model(d)


def unknown_config_field(ws, saved):
    d = copy_pipe(ws, saved)
    edit_config(os.path.join(d, CONFIG), lambda c: c.update(sde_tpye="ve"))  # misspelt: would be ignored
    return lambda: MSGMPipeline.from_pretrained(d)


def missing_config_field(ws, saved):
    d = copy_pipe(ws, saved)
    edit_config(os.path.join(d, CONFIG), lambda c: c.pop("sde_type"))  # would silently default to "vp"
    return lambda: MSGMPipeline.from_pretrained(d)


def missing_unet_config(ws, saved):
    d = os.path.join(ws, "score_model")
    shutil.copytree(os.path.join(saved, "score_model"), d)
    edit_config(os.path.join(d, "config.json"), lambda c: c.pop("unet_config"))
    return lambda: load_score_model(d)


def config_not_json(ws, saved):
    d = copy_pipe(ws, saved)
    with open(os.path.join(d, CONFIG), "w") as f:
        f.write("{sde_type: vp")
    return lambda: MSGMPipeline.from_pretrained(d)


def wrong_architecture(ws, saved):
    d = copy_pipe(ws, saved)
    save_file(tiny_model(block_out_channels=(16, 32)).state_dict(), os.path.join(d, WEIGHTS))
    return lambda: MSGMPipeline.from_pretrained(d)


def missing_tensor(ws, saved):
    d = copy_pipe(ws, saved)
    state = load_file(os.path.join(d, WEIGHTS))
    state.pop("unet.conv_out.weight")
    save_file(state, os.path.join(d, WEIGHTS))
    return lambda: MSGMPipeline.from_pretrained(d)


def unexpected_tensor(ws, saved):
    d = copy_pipe(ws, saved)
    state = load_file(os.path.join(d, WEIGHTS))
    state["unet.extra_head.weight"] = torch.zeros(3)
    save_file(state, os.path.join(d, WEIGHTS))
    return lambda: load_score_model(d)


def _to_pickle(folder: str) -> None:
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    torch.save(load_file(weights), os.path.join(folder, "diffusion_pytorch_model.bin"))
    os.remove(weights)


def pickle_only_pipeline(ws, saved):
    d = copy_pipe(ws, saved)
    _to_pickle(os.path.join(d, "score_model"))
    return lambda: MSGMPipeline.from_pretrained(d)


def pickle_only_stock_ddpm_to_unlearn(ws, saved):
    from diffusers import DDPMPipeline, DDPMScheduler

    d = os.path.join(ws, "ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(d)
    _to_pickle(os.path.join(d, "unet"))
    args = unlearn.parse_args(TRAIN + ["--pretrained_model_name_or_path", d, "--forget_labels", "1",
                                       "--output_dir", os.path.join(ws, "out")])
    return lambda: unlearn.main(args)


class _Payload:
    def __reduce__(self):  # unpickling this would create a file
        return (builtins.open, (os.path.join(os.environ["BAD_INPUT_WS"], "pwned"), "w"))


def pickle_with_code_even_when_allowed(ws, saved):
    d = copy_pipe(ws, saved)
    folder = os.path.join(d, "score_model")
    state = dict(load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")), payload=_Payload())
    os.environ["BAD_INPUT_WS"] = str(ws)
    torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return lambda: MSGMPipeline.from_pretrained(d, allow_pickle=True)


def no_such_directory(ws, saved):
    return lambda: MSGMPipeline.from_pretrained(os.path.join(ws, "not", "there"))


def a_file_not_a_directory(ws, saved):
    path = os.path.join(ws, "model.safetensors")
    save_file({"x": torch.zeros(1)}, path)
    return lambda: load_score_model(path)


def nan_sample(ws, saved):
    return lambda: tiny_model()(torch.full((2, 1, 8, 8), float("nan")), 0.5)


def inf_time(ws, saved):
    return lambda: tiny_model()(torch.zeros(2, 1, 8, 8), torch.tensor([0.5, float("inf")]))


def float64_sample(ws, saved):
    return lambda: tiny_model()(torch.zeros(2, 1, 8, 8, dtype=torch.float64), 0.5)


def integer_sample(ws, saved):
    return lambda: tiny_model()(torch.zeros(2, 1, 8, 8, dtype=torch.long), 0.5)


def sample_on_another_device(ws, saved):
    return lambda: tiny_model()(torch.zeros(2, 1, 8, 8, device="meta"), 0.5)


def nan_latents(ws, saved):
    return lambda: tiny_pipe()(batch_size=1, num_inference_steps=2, latents=torch.full((1, 1, 8, 8), float("nan")))


def inf_in_inpaint_image(ws, saved):
    model = tiny_model()
    pipe = MSGMInpaintPipeline(model, ModeratedScoreScheduler.from_score_model(model))
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 0] = float("inf")
    return lambda: pipe(image=image, mask_image=torch.ones(1, 1, 8, 8), num_inference_steps=2)


def _inpaint_with(images):
    model = tiny_model()
    pipe = MSGMInpaintPipeline(model, ModeratedScoreScheduler.from_score_model(model))
    return lambda: pipe(image=images, mask_image=torch.ones(len(images), 1, 8, 8), num_inference_steps=2)


def inpaint_images_of_mixed_sizes(ws, saved):
    return _inpaint_with([Image.new("L", (8, 8)), Image.new("L", (12, 8))])


def inpaint_images_of_mixed_modes(ws, saved):
    return _inpaint_with([Image.new("L", (8, 8)), Image.new("RGB", (8, 8))])


def empty_loss_batch(ws, saved):
    model = tiny_model()
    return lambda: MSGMLoss(model.sde, forget_weight=0.5)(model, torch.zeros(4, 1, 8, 8), torch.zeros(0, 1, 8, 8))


def empty_exemplar_set(ws, saved):
    return lambda: ExemplarModeration(torch.zeros(0, 1, 8, 8), tiny_model().sde)


def empty_saved_dataset(ws, saved):
    d = os.path.join(ws, "empty-dataset")
    arrays_to_dataset(np.zeros((0, 8, 8), np.uint8), [], ["a", "b"]).save_to_disk(d)
    args = train_score.parse_args(TRAIN + ["--dataset_name", d, "--block_out_channels", "8", "16",
                                           "--output_dir", os.path.join(ws, "out")])
    return lambda: train_score.main(args)


def empty_image_folder(ws, saved):
    os.makedirs(os.path.join(ws, "images"))
    with open(os.path.join(ws, "images", "notes.txt"), "w") as f:
        f.write("no images here")
    args = train_score.parse_args(TRAIN + ["--dataset_name", os.path.join(ws, "images"), "--block_out_channels",
                                           "8", "16", "--output_dir", os.path.join(ws, "out")])
    return lambda: train_score.main(args)


def forget_class_with_no_rows(ws, saved):
    d = os.path.join(ws, "two-of-three")
    arrays_to_dataset(np.zeros((8, 8, 8), np.uint8), [0, 1] * 4, ["a", "b", "c"]).save_to_disk(d)
    args = unlearn.parse_args(TRAIN + ["--pretrained_model_name_or_path", str(saved), "--dataset_name", d,
                                       "--forget_labels", "c", "--output_dir", os.path.join(ws, "out")])
    return lambda: unlearn.main(args)


def corrupt_checkpoint_to_resume(ws, saved):
    out = os.path.join(ws, "run")
    checkpoint = os.path.join(out, "checkpoint-2")
    os.makedirs(checkpoint)
    save_file({"x": torch.zeros(4)}, os.path.join(checkpoint, "model.safetensors"))
    os.truncate(os.path.join(checkpoint, "model.safetensors"), 20)
    args = unlearn.parse_args(TRAIN + ["--pretrained_model_name_or_path", str(saved), "--forget_labels", "1",
                                       "--output_dir", out, "--resume_from_checkpoint", "latest"])
    return lambda: unlearn.main(args)


@dataclass
class Case:
    setup: Callable
    error: type[BaseException]
    match: str


CASES = {
    # files on disk
    "truncated-safetensors": Case(truncated_weights, ValueError, "not a valid safetensors file.*truncated or corrupt"),
    "garbage-safetensors": Case(garbage_weights, ValueError, "not a valid safetensors file"),
    "config-unknown-field": Case(unknown_config_field, ValueError, r"unknown \['sde_tpye'\]"),
    "config-missing-field": Case(missing_config_field, ValueError, r"missing \['sde_type'\]"),
    "config-missing-unet_config": Case(missing_unet_config, ValueError, r"missing \['unet_config'\]"),
    "config-not-json": Case(config_not_json, ValueError, "config.json is not valid JSON"),
    "weights-of-another-architecture": Case(wrong_architecture, ValueError, "do not fit the architecture.*expected shape"),
    "weights-missing-a-tensor": Case(missing_tensor, ValueError, r"missing tensors \['unet.conv_out.weight'\]"),
    "weights-with-an-extra-tensor": Case(unexpected_tensor, ValueError, r"unexpected tensors \['unet.extra_head"),
    "pickle-only-pipeline": Case(pickle_only_pipeline, ValueError, "only pickle weights.*allow_pickle=True"),
    "pickle-only-stock-ddpm-unlearn": Case(pickle_only_stock_ddpm_to_unlearn, ValueError, "only pickle weights"),
    "pickle-with-code-allowed": Case(pickle_with_code_even_when_allowed, ValueError, "refused by torch.load.weights_only=True"),
    "no-such-directory": Case(no_such_directory, ValueError, "no such directory"),
    "file-not-directory": Case(a_file_not_a_directory, ValueError, "is a file; expected a directory"),
    # tensors
    "nan-sample": Case(nan_sample, ValueError, "`sample` has non-finite values"),
    "inf-time": Case(inf_time, ValueError, "`t` must lie in"),
    "float64-sample-float32-model": Case(float64_sample, TypeError, "dtype torch.float64 .* weights are torch.float32"),
    "integer-sample": Case(integer_sample, TypeError, "dtype torch.int64"),
    "sample-on-another-device": Case(sample_on_another_device, ValueError, "is on meta but the score model is on cpu"),
    "nan-latents": Case(nan_latents, ValueError, "`latents` has non-finite values"),
    "inf-in-inpaint-image": Case(inf_in_inpaint_image, ValueError, r"`image` values must lie in \[0, 1\]"),
    "inpaint-images-mixed-sizes": Case(inpaint_images_of_mixed_sizes, ValueError, "differ in size or mode"),
    "inpaint-images-mixed-modes": Case(inpaint_images_of_mixed_modes, ValueError, "differ in size or mode"),
    "empty-loss-batch": Case(empty_loss_batch, ValueError, "`x_forget` is an empty batch"),
    "empty-exemplar-set": Case(empty_exemplar_set, ValueError, "`forget_images` is empty"),
    # training data
    "empty-saved-dataset": Case(empty_saved_dataset, ValueError, "has no rows"),
    "image-folder-without-images": Case(empty_image_folder, ValueError, "contains no image files"),
    "forget-class-with-no-rows": Case(forget_class_with_no_rows, ValueError, r"forget_labels 2 \('c'\) occur in no row"),
    "corrupt-checkpoint-to-resume": Case(corrupt_checkpoint_to_resume, ValueError, "checkpoint-2.*not a valid safetensors"),
}


def snapshot(root) -> dict:
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly_and_writes_nothing(name, saved, tmp_path):
    case = CASES[name]
    ws = tmp_path / "ws"
    ws.mkdir()
    call = case.setup(str(ws), saved)
    before = snapshot(ws)
    with pytest.raises(case.error, match=case.match):
        call()
    assert snapshot(ws) == before, "the failed call wrote or changed files"
    assert not (ws / "out").exists()


def test_allow_pickle_loads_plain_tensors_with_weights_only(saved, tmp_path):
    """The explicit flag loads a tensors-only ``.bin`` (``torch.load(weights_only=True)``) to the same weights."""
    d = copy_pipe(tmp_path, saved)
    _to_pickle(os.path.join(d, "score_model"))
    loaded = MSGMPipeline.from_pretrained(d, allow_pickle=True).score_model.state_dict()
    reference = load_file(os.path.join(saved, WEIGHTS))
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_image_folders_of_mixed_sizes_and_modes_become_one_uniform_tensor(tmp_path):
    """Mixed sizes and modes in a *training* folder are not an error: every image is converted and resized."""
    from argparse import Namespace

    for folder, images in (("keep", [Image.new("L", (8, 8), 40), Image.new("RGB", (12, 10), (200, 10, 10)),
                                     Image.new("RGBA", (16, 16), (0, 0, 0, 0)), Image.new("P", (9, 8))]),
                           ("drop", [Image.new("I;16", (8, 8)), Image.new("LA", (10, 10))])):
        os.makedirs(tmp_path / folder)
        for i, image in enumerate(images):
            image.save(tmp_path / folder / f"{i}.png")
    args = Namespace(forget_dir=str(tmp_path / "drop"), retain_dir=str(tmp_path / "keep"), image_column="image")
    data = build_training_data(args, ImageTransform(8, channels=1))
    retain = to_tensor_all(data.retain)
    assert retain.shape == (4, 1, 8, 8) and data.forget.shape == (2, 1, 8, 8)
    assert retain.min() >= -1 and retain.max() <= 1 and torch.isfinite(data.forget).all()


def to_tensor_all(dataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])
