"""Prepared training examples: images encoded once by the VAE, captions encoded once when frozen.

Each image is bucketed and cropped once (random crops are drawn per image from the seed),
encoded together with its mirror when `--flip` is on, and the VAE's mean/log-variance are
kept so every step can still draw a fresh latent sample.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdlora.data.folder import ImageItem, assign_bucket, load_rgb, make_buckets, prepare_image
from sdlora.util import atomic_path


@dataclass
class Example:
    item: ImageItem
    bucket: tuple[int, int]  # (width, height)
    moments: torch.Tensor  # [2 or 4 (flip), C, h, w]: mean/logvar, then the mirror's


def cache_key(items: list[ImageItem], vae, resolution: int, buckets: bool, center_crop: bool, flip: bool, seed: int) -> str:
    """Changes whenever an image file, the VAE weights or a preparation setting changes."""
    h = hashlib.sha256()
    h.update(json.dumps([resolution, buckets, center_crop, flip, seed, dict(vae.config)], sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for it in items:
        h.update(str(it.path).encode())
        h.update(hashlib.sha256(it.path.read_bytes()).digest())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(
    items: list[ImageItem],
    vae,
    resolution: int,
    buckets: bool,
    center_crop: bool,
    flip: bool,
    seed: int,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> list[Example]:
    bucket_list = make_buckets(resolution) if buckets else [(resolution, resolution)]
    path = None
    if cache_dir is not None:
        key = cache_key(items, vae, resolution, buckets, center_crop, flip, seed)
        path = cache_dir / f"latents-{key}.safetensors"
        if path.exists():
            stored = load_file(path)
            return [
                Example(it, tuple(stored[f"{i}.bucket"].tolist()), stored[f"{i}.moments"]) for i, it in enumerate(items)
            ]
    device, dtype = vae.device, vae.dtype
    examples = []
    for i, it in enumerate(tqdm(items, desc="encoding images", disable=not progress, leave=False)):
        img = load_rgb(it.path)
        bucket = assign_bucket(img.width, img.height, bucket_list)
        rng = random.Random(f"{seed}/{i}")
        pixels = prepare_image(img, bucket, center_crop, rng)[None]
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1).float().cpu()  # [n, 2C, h, w]
        examples.append(Example(it, bucket, moments))
    if path is not None:
        tensors = {}
        for i, ex in enumerate(examples):
            tensors[f"{i}.bucket"] = torch.tensor(ex.bucket)
            tensors[f"{i}.moments"] = ex.moments.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    return examples


def sample_latents(examples: list[Example], flips: torch.Tensor, eps_gen: torch.Generator, scaling: float) -> torch.Tensor:
    """Draw latents for a batch (one bucket) from the cached VAE moments."""
    out = []
    for ex, f in zip(examples, flips.tolist()):
        m = ex.moments[1 if (f and ex.moments.shape[0] > 1) else 0]
        mean, logvar = m.chunk(2, dim=0)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        out.append(mean + std * torch.randn(mean.shape, generator=eps_gen))
    return torch.stack(out) * scaling


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of one bucket each, in an order fixed by (seed, epoch): resumable from a step count."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    entries = [i for i, ex in enumerate(examples) for _ in range(ex.item.repeats)]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for j in torch.randperm(len(entries), generator=g).tolist():
        i = entries[j]
        by_bucket.setdefault(examples[i].bucket, []).append(i)
    batches = [ids[k : k + batch_size] for _, ids in sorted(by_bucket.items()) for k in range(0, len(ids), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
