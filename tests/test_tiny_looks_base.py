"""`--base tiny-looks`: the shipped looks base loads as a plain SD1 folder at 32x32 latents, draws 128-px images,
and `sdlora eval` judges it with its own checker (one score per look) rather than the tiny base's."""

import json
import random

import numpy as np
import pytest
import torch

from sdlora.eval import world
from sdlora.eval.checker import CHECKER_PATH, checker_for_base, load_checker
from sdlora.eval.looks import ALL_LOOKS, render_look
from sdlora.models.base import load_base

from .test_cli import assert_ok, cli_env, sdlora  # noqa: F401  (cli_env: the fixture)


@pytest.fixture(scope="module")
def looks_base():
    return load_base("tiny-looks")


def test_tiny_looks_is_an_sd1_base_with_32x32_latents(looks_base):
    assert looks_base.family.name == "sd1" and looks_base.unet.config.sample_size == 32
    scene = world.random_scene(random.Random("tiny-looks-base"))
    image = torch.from_numpy(np.array(render_look("neon", scene, 128))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latent = looks_base.vae.encode(image).latent_dist.mode()
        back = looks_base.vae.decode(latent).sample
    assert latent.shape == (1, 4, 32, 32)
    assert (back - image).abs().mean() < 0.1  # the VAE round trip keeps the render (a random VAE would not)


def test_each_tiny_base_has_its_judge():
    assert checker_for_base("tiny") == CHECKER_PATH and checker_for_base("some/hub-id") is None
    assert load_checker(checker_for_base("tiny-looks")).style_names == list(ALL_LOOKS)


def test_eval_on_tiny_looks_scores_a_held_out_look_with_its_checker(cli_env, tmp_path):  # noqa: F811
    from sdlora.eval.datasets import write_dataset

    data = tmp_path / "neon"
    write_dataset("neon", 4, 128, 7, data, "sks neon")
    assert_ok(sdlora(cli_env, "train", "--images", data, "--base", "tiny-looks", "--trigger", "sks neon", "--steps", "2",
                     "--output", tmp_path / "run", "--no-progress"))
    out = tmp_path / "eval"
    assert_ok(sdlora(cli_env, "eval", "--base", "tiny-looks", "--lora", tmp_path / "run" / "lora.safetensors",
                     "--num-prompts", "2", "--strengths", "0,1", "--steps", "2", "--output", out))
    report = json.loads((out / "report.json").read_text())
    assert report["styles"] == ["neon"]  # read off the trigger phrase: only the looks checker knows the word
    row = report["results"][0]
    assert list(row["style_scores"]) == list(ALL_LOOKS) and 0 <= row["colour_accuracy"] <= 1
