"""Issue 17: data-parallel training speed, one GPU against N, through the real `sdlora train --gpus N` command.

Each case runs `sdlora train` twice with the same per-GPU batch, once on 1 process and once on N, for --steps steps,
and reads the steady-state it/s the loop reports (steps after the 5th, so CUDA-graph capture is excluded).
img/s = it/s x batch x processes; scaling = img/s on N / img/s on 1 (the target is >= 1.9 on 2 GPUs). With
--check-equal a third run, 1 process at N x batch, gives the max |difference| between its adapter and the N-process
one (the same training within floating-point reduction order).

Cases: SD1.5 layout at 512 px and batch 4 per GPU (a random-weight base, scripts/make_random_sd15.py), and SDXL at
1024 px and batch 1 per GPU when --sdxl-base names an SDXL diffusers folder.

GPU:  python scripts/bench_multi_gpu.py --gpus 2 --json benchmarks/bench-multi-gpu.json [--sdxl-base FOLDER] [--check-equal]
CPU smoke test (tests/test_bench_scripts.py): --small --device cpu --gpus 2 --steps 3 --batch 1
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def dataset(work: Path, resolution: int, count: int = 16) -> Path:
    from sdlora.eval.datasets import write_dataset

    images = work / f"images-{resolution}"
    if not (images / "README.md").exists():
        write_dataset("sketch", count, resolution, 0, images, "")
    return images


def run(base: Path, images: Path, out: Path, processes: int, batch: int, steps: int, resolution: int, device: str,
        extra: list[str]) -> dict:
    """One `sdlora train` run; its it/s and peak VRAM as the main process reports them."""
    cmd = [sys.executable, "-m", "sdlora", "train", "--base", str(base), "--images", str(images), "--trigger", "sks sketch",
           "--rank", "4", "--steps", str(steps), "--batch-size", str(batch), "--resolution", str(resolution),
           "--device", device, "--output", str(out), "--overwrite", "--no-progress", "--save-dtype", "fp32", *extra]
    if processes > 1:
        cmd += ["--gpus", str(processes)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"sdlora train failed ({' '.join(cmd[3:])}):\n{p.stderr[-3000:]}")
    its = re.search(r"([\d.]+) it/s", p.stderr)
    peak = re.search(r"peak VRAM ([\d.]+) GiB", p.stderr)
    it_s = float(its.group(1)) if its else None
    return {"processes": processes, "batch_per_gpu": batch, "steps": steps, "it_per_s": it_s,
            "img_per_s": it_s * batch * processes if it_s else None, "peak_gib": float(peak.group(1)) if peak else None,
            "wall_s": round(wall, 1), "adapter": str(out / "lora.safetensors"), "command": " ".join(cmd[3:])}


def max_difference(a: str, b: str) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def bench_case(name: str, base: Path, work: Path, processes: int, batch: int, resolution: int, args) -> list[dict]:
    images = dataset(work, resolution)
    rows = []
    for n in (1, processes):
        r = run(base, images, work / f"{name}-{n}x{batch}", n, batch, args.steps, resolution, args.device, args.extra)
        rows.append({"case": name, "resolution": resolution, **r})
    one, many = rows
    if one["img_per_s"] and many["img_per_s"]:
        many["scaling"] = many["img_per_s"] / one["img_per_s"]
    if args.check_equal:
        whole = run(base, images, work / f"{name}-1x{batch * processes}", 1, batch * processes, args.steps, resolution,
                    args.device, args.extra)
        rows.append({"case": name, "resolution": resolution, **whole,
                     "max_abs_difference_vs_multi": max_difference(whole["adapter"], many["adapter"])})
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "-"


def table(rows: list[dict]) -> str:
    out = ["| case | processes | batch per GPU | it/s | img/s | scaling | peak GiB | max abs diff |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [_cell(r, "it_per_s", ".2f"), _cell(r, "img_per_s", ".1f"), _cell(r, "scaling", ".2f"),
                 _cell(r, "peak_gib", ".2f"), _cell(r, "max_abs_difference_vs_multi", ".2e")]
        out.append(f"| {r['case']} | {r['processes']} | {r['batch_per_gpu']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    from bench_train import environment, random_base

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="where to write every measurement")
    ap.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU runs (default 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model of the SD1.5 layout at 64 px (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=60, help="steps per run; it/s is measured after the 5th")
    ap.add_argument("--batch", type=int, help="batch per GPU of the SD1.5 case (default 4)")
    ap.add_argument("--sdxl-base", help="an SDXL diffusers folder: adds the 1024 px case at batch 1 per GPU")
    ap.add_argument("--check-equal", action="store_true", help="also run 1 process at gpus x batch and compare adapters")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `sdlora train` options, passed to every run")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    device = torch.device(args.device)
    env = environment(device, argv) | {"gpus": args.gpus, "visible_gpus": torch.cuda.device_count()}
    print(json.dumps(env), flush=True)
    results: dict = {"env": env, "rows": []}
    cases = [("sd15", random_base(work, device, args.small), args.batch or 4, 64 if args.small else 512)]
    if args.sdxl_base:
        cases.append(("sdxl", Path(args.sdxl_base), 1, 1024))
    for name, base, batch, resolution in cases:
        for r in bench_case(name, base, work, args.gpus, batch, resolution, args):
            results["rows"].append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    results["table"] = table(results["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    return results


if __name__ == "__main__":
    main()
