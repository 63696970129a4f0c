"""Shared fixtures: the tiny base is built once per session in a private cache; runs are seeded."""

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SKETCH = REPO / "datasets" / "sketch"


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["SDLORA_CACHE"] = str(tmp_path_factory.mktemp("sdlora-cache"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(2)
    yield


@pytest.fixture
def style_dir(tmp_path) -> Path:
    """A copy of the first 8 sketch images (keeps runs short; the shipped set stays untouched)."""
    d = tmp_path / "images"
    d.mkdir()
    for png in sorted(SKETCH.glob("*.png"))[:8]:
        shutil.copy(png, d / png.name)
        shutil.copy(png.with_suffix(".txt"), d / png.with_suffix(".txt").name)
    return d


def quick_config(images, output, **kw):
    from sdlora.training.config import make_config

    values = dict(images=str(images), output=str(output), steps=30, rank=4, seed=7, progress=False,
                  trigger="sks sketch", unet_lr=1e-3, targets="cross-attn")
    values.update(kw)
    return make_config(None, **values)


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory) -> Path:
    """One 30-step LoRA shared by the read-only tests."""
    from sdlora.training.loop import train

    root = tmp_path_factory.mktemp("trained")
    imgs = root / "images"
    imgs.mkdir()
    for png in sorted(SKETCH.glob("*.png"))[:8]:
        shutil.copy(png, imgs / png.name)
        shutil.copy(png.with_suffix(".txt"), imgs / png.with_suffix(".txt").name)
    result = train(quick_config(imgs, root / "out", save_dtype="fp32"))
    return result.adapter
