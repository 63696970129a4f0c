"""Batches for the training loop: one bucket per batch, in an order fixed by (seed, epoch), and latents drawn
from the cached VAE moments."""

from __future__ import annotations

import torch

from sdlora.data.latents import Example


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
