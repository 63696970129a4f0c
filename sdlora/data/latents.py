"""Prepared training examples: images encoded once by the VAE, captions encoded once when frozen.

Each image is bucketed and cropped once (random crops are drawn per image from the seed),
encoded together with its mirror when `--flip` is on, and the VAE's mean/log-variance are
kept so every step can still draw a fresh latent sample. Under several processes each encodes and caches
only its shard (every world-th image), and the training loop exchanges the shards once.
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

from sdlora.data.buckets import assign_bucket, make_buckets, prepare_image
from sdlora.data.folder import ImageItem, load_rgb
from sdlora.util import atomic_path


@dataclass
class Example:
    item: ImageItem
    bucket: tuple[int, int]  # (width, height)
    moments: torch.Tensor  # [1 or 2 (flip), 2C, h, w]: mean/logvar, then the mirror's
    original_hw: tuple[int, int] = (0, 0)  # the file's size, and the crop's (top, left) in the resized image:
    crop_tl: tuple[int, int] = (0, 0)  # SDXL's micro-conditioning (time ids); SD1 ignores them
    crop_tl_flipped: tuple[int, int] = (0, 0)

    def size_info(self, flipped: bool) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(original (h, w), crop (top, left), target (h, w)) for this example as drawn."""
        return self.original_hw, self.crop_tl_flipped if flipped else self.crop_tl, (self.bucket[1], self.bucket[0])


def cache_key(items: list[ImageItem], vae, resolution: int, buckets: bool, center_crop: bool, flip: bool, seed: int) -> str:
    """Changes whenever an image file, the VAE weights or a preparation setting changes."""
    h = hashlib.sha256()
    h.update(json.dumps(["sizes-v2", resolution, buckets, center_crop, flip, seed, dict(vae.config)], sort_keys=True, default=str).encode())
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
    shard: tuple[int, int] = (0, 1),
) -> list[Example]:
    """Examples of items[rank::world] for shard (rank, world): the crop of image i is drawn from (seed, i), so it
    does not depend on the sharding."""
    rank, world = shard
    mine = list(range(rank, len(items), world))
    bucket_list = make_buckets(resolution) if buckets else [(resolution, resolution)]
    path = None
    if cache_dir is not None:
        key = cache_key([items[i] for i in mine], vae, resolution, buckets, center_crop, flip, seed)
        name = f"latents-{key}" + (f"-shard{rank}of{world}-{len(items)}" if world > 1 else "")
        path = cache_dir / f"{name}.safetensors"
        if path.exists():
            stored = load_file(path)
            return [_stored_example(items[i], stored, j) for j, i in enumerate(mine)]
    device, dtype = vae.device, vae.dtype
    examples = []
    for i in tqdm(mine, desc="encoding images", disable=not progress, leave=False):
        it = items[i]
        img = load_rgb(it.path)
        bucket = assign_bucket(img.width, img.height, bucket_list)
        rng = random.Random(f"{seed}/{i}")
        prepared = prepare_image(img, bucket, center_crop, rng)
        pixels = prepared.pixels[None]
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1).float().cpu()  # [n, 2C, h, w]
        examples.append(Example(it, bucket, moments, prepared.original_hw, prepared.crop_tl, prepared.crop_tl_flipped))
    if path is not None:
        tensors = {}
        for i, ex in enumerate(examples):
            tensors[f"{i}.bucket"] = torch.tensor(ex.bucket)
            tensors[f"{i}.moments"] = ex.moments.contiguous()
            tensors[f"{i}.sizes"] = torch.tensor([*ex.original_hw, *ex.crop_tl, *ex.crop_tl_flipped])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    return examples


def _stored_example(item: ImageItem, stored: dict[str, torch.Tensor], i: int) -> Example:
    sizes = stored[f"{i}.sizes"].tolist()
    return Example(item, tuple(stored[f"{i}.bucket"].tolist()), stored[f"{i}.moments"], tuple(sizes[0:2]),
                   tuple(sizes[2:4]), tuple(sizes[4:6]))
