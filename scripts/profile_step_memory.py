"""Where a training step's peak GPU memory sits: weights, forward (saved activations) and backward, with and without
gradient checkpointing, eagerly, for the step `sdlora train` builds (issue 5's batch-1 memory question).

GPU: python scripts/profile_step_memory.py --work /tmp/bench --json out.json
CPU smoke: --small --device cpu (memory figures are CUDA-only and read as null there)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def gib(device: torch.device, peak: bool) -> float | None:
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30, 3)


def profile(base, folder: Path, work: Path, batch: int, latent: int, device: torch.device, **overrides) -> dict:
    from bench_train import sdlora_case

    with sdlora_case(base, folder, work, {"cuda_graph": False, **overrides}, batch, latent, device, 10) as (step, mb, _, _):
        for _ in range(2):
            step.eager([mb])  # optimizer state and kernels exist before measuring
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        row = {"overrides": overrides, "batch": batch, "resident_gib": gib(device, False)}
        loss = step.loss(mb)
        row |= {"forward_peak_gib": gib(device, True), "after_forward_gib": gib(device, False)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss.backward()
        row |= {"backward_peak_gib": gib(device, True), "after_backward_gib": gib(device, False)}
        step.optimizer.zero_grad(set_to_none=True)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    from bench_train import profiling_args, profiling_setup

    ap = profiling_args(__doc__)
    args = ap.parse_args(argv)
    device, work, base, folder, latent = profiling_setup(args, "profile-mem-")
    rows = []
    for kw in ({"text_encoder": False, "channels_last": "off"}, {"text_encoder": False, "channels_last": "off", "gradient_checkpointing": True},
               {"text_encoder": False}, {"text_encoder": False, "gradient_checkpointing": True}):
        rows.append(profile(base, folder, work, 1, latent, device, **kw))
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
