"""Where a training step's GPU time goes, by kernel kind (issue 5's "what the profile shows" at batch 16).

The step is the one `sdlora train` builds, run eagerly under torch.profiler (the CUDA graph replays exactly these
kernels, without the launch gaps), with the text-encoder LoRA on (the default) and off (frozen encoder, cached
embeddings): the difference is what training the text encoder costs.

GPU: python scripts/profile_step_kernels.py --work /tmp/bench --json out.json
CPU smoke: --small --device cpu (CPU operator times instead of kernels)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

KINDS = (  # first match wins; kernel names as cuBLAS/cuDNN/PyTorch/Triton print them
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "cudnn")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "mm", "linear", "addmm")),
    ("normalization", ("norm",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("elementwise / reduction", ("elementwise", "vectorized", "unrolled", "reduce", "silu", "gelu", "add", "mul", "copy", "cat")),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(key in low for key in keys)), "other")


def step_profile(base, folder: Path, work: Path, batch: int, latent: int, device: torch.device, steps: int, **overrides) -> dict:
    from bench_train import sdlora_case, sync

    cuda = device.type == "cuda"
    with sdlora_case(base, folder, work, {"cuda_graph": False, **overrides}, batch, latent, device, steps + 3) as (step, mb, _, _):
        for _ in range(3):
            step.eager([mb])
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step.eager([mb])
            sync(device)
    per_kernel: dict[str, float] = {}
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            per_kernel[e.key] = per_kernel.get(e.key, 0.0) + us / 1000 / steps
    by_kind: dict[str, float] = {}
    for name, ms in per_kernel.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + ms
    total = sum(by_kind.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    row = {"batch": batch, "overrides": overrides, "kernel_ms_per_step": round(total, 2),
           "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "by_kind_pct": {k: round(100 * v / total, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "top_kernels_ms": [[name[:120], round(ms, 2)] for name, ms in top]}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    from bench_train import profiling_args, profiling_setup

    ap = profiling_args(__doc__)
    ap.add_argument("--batches", default="16,1")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    device, work, base, folder, latent = profiling_setup(args, "profile-kernels-")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for overrides in ({}, {"text_encoder": False}):
            rows.append(step_profile(base, folder, work, batch, latent, device, args.steps, **overrides))
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
