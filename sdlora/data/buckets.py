"""Aspect-ratio buckets (kohya's list) and cropping an image to its bucket."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdlora.data.folder import to_rgb
from sdlora.errors import SdloraError


def make_buckets(
    resolution: int, min_size: int = 64, max_size: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """Kohya's bucket list: (width, height) pairs no larger in area than resolution**2, sides multiples of step.

    Training at the image's own aspect ratio keeps subjects whole instead of cropping them to a square.
    """
    max_size = 2 * resolution if max_size is None else max_size
    for name, value in (("resolution", resolution), ("min_size", min_size), ("max_size", max_size)):
        if value <= 0 or value % step:
            raise SdloraError(f"{name} must be a positive multiple of {step}, got {value}")
    if min_size > max_size:
        raise SdloraError(f"min_size ({min_size}) is larger than max_size ({max_size})")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio (log scale, so 2:1 and 1:2 are equally far from 1:1); ties -> larger."""
    if not buckets:
        raise SdloraError("no buckets to assign images to")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


@dataclass
class Prepared:
    """An image cropped to its bucket, with what SDXL's micro-conditioning needs to know about the crop."""

    pixels: torch.Tensor  # float [3, height, width] in [-1, 1]
    original_hw: tuple[int, int]  # the file's size before resizing
    crop_tl: tuple[int, int]  # (top, left) of the crop in the resized image
    crop_tl_flipped: tuple[int, int]  # the same crop seen in the mirrored image (--flip)


def prepare_image(img: Image.Image, bucket: tuple[int, int], center_crop: bool, rng: random.Random) -> Prepared:
    """Resize to cover the bucket and crop to it (a random offset from `rng` unless center_crop)."""
    bucket_w, bucket_h = bucket
    img = to_rgb(img)
    original_hw = (img.height, img.width)
    scale = max(bucket_w / img.width, bucket_h / img.height)
    new_w = max(bucket_w, round(img.width * scale))
    new_h = max(bucket_h, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center_crop:
        left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
    else:
        left, top = rng.randint(0, new_w - bucket_w), rng.randint(0, new_h - bucket_h)
    img = img.crop((left, top, left + bucket_w, top + bucket_h))
    pixels = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    return Prepared(tensor, original_hw, (top, left), (top, new_w - bucket_w - left))
