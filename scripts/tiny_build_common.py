"""Pieces scripts/build_tiny_base.py and scripts/tiny_looks_stages.py share: pixels in, one VAE training step, the SD1
folder's index and tokenizer/scheduler parts out, and sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.models.tiny import SCHEDULER_CONFIG

SD1_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def to_pixels(batch: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vae_step(vae, opt, x: torch.Tensor, kl_weight: float, device) -> torch.Tensor:
    """One optimizer step of the VAE on pixels x in [-1, 1]: L1 + 0.5 MSE of the sampled reconstruction plus kl_weight
    times the KL per pixel value, bf16 autocast on CUDA, gradients clipped to norm 1. Returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample.float()
    kl = dist.kl().mean() / x[0].numel()
    loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return loss


def write_sd1_parts(out: Path, tok) -> None:
    """The tokenizer, the training scheduler and model_index.json of an SD1 diffusers folder (unet, text_encoder and
    vae are saved by their stages)."""
    from diffusers import DDPMScheduler

    tok.save_pretrained(out / "tokenizer")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(SD1_INDEX, indent=2) + "\n")


def grid(images, cols: int = 8):
    from PIL import Image

    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet
