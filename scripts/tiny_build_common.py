"""Pieces scripts/build_tiny_base.py and scripts/tiny_looks_stages.py share: pixels in, one VAE training step, the SD1
folder's index and tokenizer/scheduler parts out, and sample grids."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.eval import world
from sdlora.models.tiny import SCHEDULER_CONFIG

SD1_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def world_scene(seed: int, index: int, single: bool) -> world.Scene:
    """Scene `index` of a build seeded `seed` (one object only when `single`), never one of the held-out scenes."""
    rng = random.Random(f"{seed}/{index}")
    while True:
        scene = world.random_scene(rng)
        if (not single or len(scene.shapes) == 1) and not world.is_held_out(scene):
            return scene


def _render_one(job: tuple[str, int, int, bool, int]) -> tuple[np.ndarray, str, tuple]:
    style, seed, index, single, size = job
    scene = world_scene(seed, index, single)
    s = scene.shapes[0]
    return np.asarray(world.render(style, scene, size)), world.caption(scene), (s.colour, s.kind)


def render_pool(styles: list[str], n: int, seed: int, workers: int, size: int, single: bool = False
                ) -> tuple[np.ndarray, list, list]:
    """n renders (styles cycled) as uint8 [n, size, size, 3], their captions and main-object labels, in `workers`
    forked processes."""
    jobs = [(styles[i % len(styles)], seed, i // len(styles) if single else i, single, size) for i in range(n)]
    with mp.get_context("fork").Pool(workers) as pool:
        out = pool.map(_render_one, jobs, chunksize=64)
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


def to_pixels(batch: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def recon_loss(rec: torch.Tensor, x: torch.Tensor, chroma_weight: float = 0.0) -> torch.Tensor:
    """L1 + 0.5 MSE on RGB; with chroma_weight, the same terms on luma and on rgb - luma (times chroma_weight)
    instead: hue errors of pale colours are small in RGB (scripts/vae_colour_probe.py measured the effect)."""
    if not chroma_weight:
        return F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x)
    ry, xy = rec.mean(1, keepdim=True), x.mean(1, keepdim=True)
    return (F.l1_loss(ry, xy) + 0.5 * F.mse_loss(ry, xy)
            + chroma_weight * (F.l1_loss(rec - ry, x - xy) + 0.5 * F.mse_loss(rec - ry, x - xy)))


def jitter(x: torch.Tensor, g: torch.Generator, share: float = 1.0) -> torch.Tensor:
    """Generic photometric jitter of pixels in [-1, 1] on `share` of the images: saturation x U(0.25, 1), then
    lightened toward white by U(0, 0.5): more low-chroma hues than the training looks draw, without rendering any look."""
    pick = (torch.rand(len(x), generator=g) < share).to(x.device)
    sat, light = (torch.rand(len(x), 1, 1, 1, generator=g).to(x.device) for _ in range(2))
    y = x.mean(1, keepdim=True)
    return torch.where(pick[:, None, None, None], (y + (0.25 + 0.75 * sat) * (x - y)) * (1 - 0.5 * light) + 0.5 * light, x)


def vae_step(vae, opt, x: torch.Tensor, kl_weight: float, device, chroma_weight: float = 0.0) -> torch.Tensor:
    """One optimizer step of the VAE on pixels x in [-1, 1]: recon_loss of the sampled reconstruction plus kl_weight
    times the KL per pixel value, bf16 autocast on CUDA, gradients clipped to norm 1. Returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample.float()
    kl = dist.kl().mean() / x[0].numel()
    loss = recon_loss(rec, x, chroma_weight) + kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return loss


def checker_step(model, opt, data: tuple, train_idx: torch.Tensor, batch: int, g: torch.Generator,
                 bf16: bool = False) -> torch.Tensor:
    """One optimiser step of a world checker (both builders'): a random batch of the rows it trains on, a little pixel
    noise, and the colour + shape (softmax) + style (sigmoid) losses; bf16 autocast where asked (on CUDA)."""
    x, colour, shape, style = data
    idx = train_idx[torch.randint(0, len(train_idx), (batch,), device=x.device, generator=g)]
    xb = x[idx] + 0.03 * torch.randn((len(idx), *x.shape[1:]), device=x.device, generator=g)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        c, s, sl = model(xb)
    loss = (F.cross_entropy(c.float(), colour[idx]) + F.cross_entropy(s.float(), shape[idx])
            + F.binary_cross_entropy_with_logits(sl.float(), style[idx]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@torch.no_grad()
def round_trip(vae, images: np.ndarray, device, batch: int = 128, sample: bool = False,
               generator: torch.Generator | None = None) -> np.ndarray:
    """Images through encode -> decode: the latent mean, or with `sample` a draw from `generator` (seed it: the global
    RNG is seeded differently in every process, which made a checker trained alone differ run to run)."""
    out = []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_pixels(images[i : i + batch], device)).latent_dist
        rec = vae.decode(dist.sample(generator) if sample else dist.mode()).sample
        out.append(((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


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
