"""What stays allocated once the training step is captured as a CUDA graph (issue 5: the graph path with gradient
checkpointing kept ~0.5 GiB more resident than the eager step).

Records the allocator's history through warm-up and capture, then lists the live blocks, largest groups first, each
with the innermost sdlora/diffusers/torch frames that allocated it.

GPU: python scripts/trace_graph_memory.py --work /tmp/bench --json out.json
CPU: not meaningful (CUDA allocator only); --small --device cpu runs the step and reports nothing allocated.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


CASES = ({"gradient_checkpointing": True, "text_encoder": False}, {"gradient_checkpointing": True}, {})


def where(frames: list[dict]) -> str:
    """The innermost frames worth reading: ours, diffusers', and the torch function that allocated."""
    keep = [f for f in frames if any(k in f["filename"] for k in ("sdlora", "diffusers", "torch/nn", "torch/optim", "torch/utils"))]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in keep[:4]) or "(no python frame)"


def live_blocks(device: torch.device) -> dict:
    snap = torch.cuda.memory._snapshot(device)
    groups: dict[str, list[int]] = defaultdict(list)
    pools: dict[str, int] = defaultdict(int)
    for seg in snap["segments"]:
        pool = "graph pool" if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0) else "default pool"
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                pools[pool] += b["size"]
                groups[f"{pool}: {where(b.get('frames', []))}"].append(b["size"])
    top = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:20]
    return {"by_pool_gib": {k: round(v / 2**30, 3) for k, v in pools.items()},
            "top": [{"where": k, "gib": round(sum(v) / 2**30, 3), "blocks": len(v)} for k, v in top]}


def main(argv: list[str] | None = None) -> dict:
    from bench_train import profiling_args, profiling_setup, sdlora_case

    ap = profiling_args(__doc__)
    ap.add_argument("--case", type=int, action="append", help="only these CASES (0-based; repeatable): run each in a fresh "
                    "process, since memory left by an earlier case in the same process shows in the later ones")
    args = ap.parse_args(argv)
    device, work, base, folder, latent = profiling_setup(args, "trace-graph-")
    cuda = device.type == "cuda"
    out: dict = {"cases": []}
    for k, overrides in enumerate(CASES):
        if args.case and k not in args.case:
            continue
        with sdlora_case(base, folder, work, overrides, 1, latent, device, 20) as (step, mb, _, _):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            row: dict = {"overrides": overrides}
            for i in range(step.speed.warmup + 2 if cuda else 2):
                step([mb])
                if cuda:
                    torch.cuda.synchronize(device)
                    row[f"allocated_after_step_{i + 1}_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
            row["captured"] = bool(step.graphs)
            if cuda:  # the peak covers warm-up, capture and replays: what `sdlora train` would see for this step
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                row |= live_blocks(device)
                torch.cuda.memory._record_memory_history(enabled=None)
            out["cases"].append(row)
            print(json.dumps(row, indent=1), flush=True)
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
