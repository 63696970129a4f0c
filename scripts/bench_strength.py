"""How long a strength change takes on a base with merged inference weights (the GPU default): three LoRAs over
every layer `--targets all-linear` touches, each host's merged copy recomputed one layer at a time (the old path)
and in batched kernels per weight shape (refresh_merged, what LoraMixer.set_strength does), then one LoRA alone
and all three in one `set_strengths` call (one recompute), in one process.

    python scripts/bench_strength.py --base tiny-xl --device cpu --json benchmarks/strength-cpu.json
    python scripts/bench_strength.py --family sdxl --device cuda --json benchmarks/strength-sdxl.json  # random SDXL

On the CPU it measures the per-layer overhead (launches and Python) that dominates at small widths; the GPU
figure for a full-size SDXL needs the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import random_lora  # noqa: E402 - scripts/ is on the path above
from bench_util import environment, random_base, sync  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="a base sdlora loads (default: a random-weight --family base)")
    ap.add_argument("--family", default="sdxl", choices=("sd15", "sdxl"))
    ap.add_argument("--small", action="store_true", help="the random base at test size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--work", default="output/bench-strength")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    import sdlora.lora.mixer as mixer_module
    from sdlora.lora.layer import LoraHost, iter_hosts, refresh_merged
    from sdlora.lora.mixer import LoraMixer
    from sdlora.models.base import load_base

    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = args.base or str(random_base(work, device, args.small, args.family))
    base = load_base(source, "bf16" if device.type == "cuda" else "fp32", str(device))
    LoraHost.merged_inference = True  # the GPU path, also on the CPU
    try:
        mixer = LoraMixer(base)
        names = [mixer.load(random_lora(base, work / f"r{i}.safetensors", "all-linear", 4, i), s)
                 for i, s in enumerate((0.8, 0.5, 0.3))]
        hosts = [h for m in (base.unet, *base.text_encoders.values()) for h in iter_hosts(m)]
        with torch.no_grad():
            for h in hosts:  # the merged copies a first forward would build
                h._merged = h._merged_weight()

        def timed(fn) -> float:
            out = []
            for k in range(args.repeats + 1):
                sync(device)
                t = time.perf_counter()
                fn(k)
                sync(device)
                out.append(time.perf_counter() - t)
            return statistics.median(out[1:]) * 1000

        def per_layer(batch: list) -> None:  # the old path: each host recomputes its own copy
            for h in batch:
                h._merged.copy_(h._merged_weight())

        def change(k: int) -> None:
            for n, s in zip(names, (0.6 + 0.01 * k, 0.4, 0.2)):
                mixer.set_strength(n, s)

        def change_one(k: int) -> None:  # one LoRA's strength (a slider moved)
            mixer.set_strength(names[0], 0.6 + 0.01 * k)

        def change_together(k: int) -> None:  # all three in one call: one recompute (what the UI and eval do)
            mixer.set_strengths({n: (s, None) for n, s in zip(names, (0.6 + 0.01 * k, 0.4, 0.2))})

        mixer_module.refresh_merged = per_layer
        old_ms = timed(change)
        mixer_module.refresh_merged = refresh_merged
        new_ms = timed(change)
        one_ms = timed(change_one)
        together_ms = timed(change_together)
        fresh = [h._merged_weight() for h in hosts]
        worst = max(float((h._merged.float() - f.float()).abs().max()) for h, f in zip(hosts, fresh))
    finally:
        LoraHost.merged_inference = None
        mixer_module.refresh_merged = refresh_merged
    rows = {"hosts": len(hosts), "loras": len(names), "change_3_strengths_one_layer_at_a_time_ms": round(old_ms, 2),
            "change_3_strengths_batched_ms": round(new_ms, 2), "speedup": round(old_ms / new_ms, 2),
            "change_1_strength_ms": round(one_ms, 2), "change_3_strengths_in_one_call_ms": round(together_ms, 2),
            "max_abs_diff_vs_per_layer": worst}
    result = {"environment": environment(device, argv), "args": vars(args), "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return result


if __name__ == "__main__":
    main()
