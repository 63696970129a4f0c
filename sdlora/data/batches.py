"""Batches for the training loop: one bucket per batch, in an order fixed by (seed, epoch); each process's share
of a batch; and each sample's random draws, fixed by (seed, micro-step, its index in the batch).

The batches are cut at the global batch size (per-process batch x processes), and every sample's flip, latent
draw, noise and timestep come from its own generator. So the samples of a step, and what is drawn for each,
do not depend on how many processes split the batch: two processes with batch B train what one does with 2B.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from sdlora.data.latents import Example


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


def process_share(batch: list[int], per_process: int, rank: int) -> tuple[list[int], int]:
    """This process's slice of a global batch, and the batch index of its first sample. A bucket's last batch
    may be short: later processes then get fewer samples, or none (they still join the gradient sum)."""
    first = rank * per_process
    return batch[first : first + per_process], first


def sample_generator(seed: int, micro: int, index: int) -> torch.Generator:
    """The generator of one sample: sample `index` of micro-step `micro` of a run seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}/{micro}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass
class Draws:
    latents: torch.Tensor  # [n, C, h, w], scaled
    noise: torch.Tensor
    timesteps: torch.Tensor  # [n] int64
    flips: list[bool]


def draw_batch(examples: list[Example], first: int, seed: int, micro: int, scaling: float, num_timesteps: int,
               flip: bool, noise_offset: float | None) -> Draws:
    """Each sample's flip, latent sample (from the cached VAE moments), noise (+ offset) and timestep, drawn in
    that order from sample_generator(seed, micro, first + j)."""
    latents, noises, steps, flips = [], [], [], []
    for j, ex in enumerate(examples):
        g = sample_generator(seed, micro, first + j)
        f = bool(torch.rand(1, generator=g) < 0.5) if flip else False
        m = ex.moments[1 if (f and ex.moments.shape[0] > 1) else 0]
        mean, logvar = m.chunk(2, dim=0)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latents.append((mean + std * torch.randn(mean.shape, generator=g)) * scaling)
        noise = torch.randn(mean.shape, generator=g)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(mean.shape[:1] + (1, 1), generator=g)
        noises.append(noise)
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        flips.append(f)
    return Draws(torch.stack(latents), torch.stack(noises), torch.cat(steps), flips)
