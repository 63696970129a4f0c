"""Validation loss on held-out images at fixed timesteps and fixed noise.

Fixing both makes the numbers comparable from one evaluation to the next: only the LoRA changes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlora.data.folder import ImageItem
from sdlora.data.latents import Example
from sdlora.errors import SdloraError
from sdlora.training.step import prediction_error  # the training loss itself (validation leaves out min-SNR weighting)

TIMESTEPS = (100, 300, 500, 700, 900)


def split_items(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Hold out round(fraction * n) images (at least one), chosen by the seed; repeats don't matter here."""
    if not 0 < fraction < 1:
        raise SdloraError("--validation-split must be between 0 and 1 (e.g. 0.1)")
    n_val = max(1, round(fraction * len(items)))
    if n_val >= len(items):
        raise SdloraError(f"--validation-split {fraction} leaves no training images ({len(items)} in total)")
    held = set(random.Random(f"validation/{seed}").sample(range(len(items)), n_val))
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


@dataclass
class ValidationCase:
    latents: torch.Tensor  # [1, C, h, w], the VAE mean (no sampling noise)
    noise: torch.Tensor
    timestep: int
    caption: str
    sizes: tuple = ((0, 0), (0, 0), (0, 0))  # original, crop, target: the family's size conditioning


def make_cases(examples: list[Example], seed: int, scaling: float, num_train_timesteps: int) -> list[ValidationCase]:
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    cases = []
    for ex in examples:
        mean = ex.moments[0].chunk(2, dim=0)[0][None] * scaling
        for t in TIMESTEPS:
            cases.append(ValidationCase(mean, torch.randn(mean.shape, generator=g), min(t, num_train_timesteps - 1),
                                        ex.item.caption, ex.size_info(False)))
    return cases


@torch.no_grad()
def validation_loss(cases: list[ValidationCase], unet, scheduler, cond_for: Callable[[list[str], list], dict], v_pred: bool, autocast) -> float:
    device, dtype = unet.device, unet.dtype
    total = 0.0
    for case in cases:
        t = torch.tensor([case.timestep], device=device)
        with autocast():
            err = prediction_error(unet, scheduler, case.latents.to(device), case.noise.to(device), t,
                                   cond_for([case.caption], [case.sizes]), v_pred, dtype)
        total += err.item()
    return total / len(cases)
