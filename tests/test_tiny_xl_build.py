"""The tiny-xl builder (`scripts/build_tiny_base.py --family sdxl --smoke`) runs end to end on a CPU at toy size and
writes a folder sdlora loads as SDXL; the real build is a GPU run (its numbers go in the model card it writes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a few minutes on 2 busy cores: 70 transformer blocks' first CPU steps are slow to warm up
def test_smoke_build_makes_a_loadable_tiny_xl(tmp_path):
    out = tmp_path / "tiny-xl"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_base.py"), "--family", "sdxl", "--smoke",
                          "--out", str(out)], capture_output=True, text=True, timeout=900,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin",
                              "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    log = json.loads((out / "build_log.json").read_text())
    assert log["family"] == "sdxl" and log["run1"]["unet_steps"] == 2
    assert abs(log["vae_scaling_factor"] * log["vae_latent_std"] - 1) < 1e-6  # SDXL's rule: 1 / latent std
    assert 0 <= log["eval_colour_acc"] <= 1 and log["eval_prompts"] == 1
    assert "## Quality" in (out / "README.md").read_text()

    from sdlora.models.base import load_base
    from sdlora.models.sdxl import SDXLFamily

    base = load_base(str(out))
    assert isinstance(base.family, SDXLFamily) and base.resolution == 128
    assert base.tokenizers["text_encoder_2"].pad_token == "!"
    assert base.vae.config.scaling_factor == log["vae_scaling_factor"]
    tiny = load_base("tiny")
    same = [torch.equal(base.vae.state_dict()[k], v) for k, v in tiny.vae.state_dict().items()]
    assert all(same)  # tiny's VAE, only its scaling factor re-chosen
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors") if f.parent != out)
    assert weights < 30e6  # fp16, within the shipping limit
