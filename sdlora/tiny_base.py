"""The embedded tiny base: Stable Diffusion 1.x architecture at CPU size.

It is built from the configs below with fixed seeds and written once as an ordinary
diffusers folder in the user cache, so it loads through exactly the same code as any
other diffusers folder. Module names and block layout equal SD1.5's (16 transformer
blocks, 1x1-conv proj_in/proj_out, 12 CLIP layers), so LoRA keys are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
BUILD_SEED = 20261123

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The same noise schedule SD1.5 trains with (scaled_linear betas, epsilon prediction).
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def _config_key() -> str:
    blob = json.dumps([UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, SCHEDULER_CONFIG, BUILD_SEED], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("SDLORA_CACHE", Path.home() / ".cache" / "sdlora"))


def tiny_base_dir() -> Path:
    """Folder of the tiny base, built on first use (a few seconds on a CPU)."""
    target = cache_root() / f"tiny-sd1-{_config_key()}"
    if not (target / "model_index.json").exists():
        build_tiny_base(target)
    return target


def build_tiny_base(target: Path) -> None:
    """Build the models from configs with fixed seeds and save them as a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(BUILD_SEED)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(tmp / "unet")
    torch.manual_seed(BUILD_SEED + 1)
    AutoencoderKL(**VAE_CONFIG).save_pretrained(tmp / "vae")
    torch.manual_seed(BUILD_SEED + 2)
    CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).save_pretrained(tmp / "text_encoder")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp / "tokenizer")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
