"""The learning rate scripts/gpu_looks_tune.sh ships: the candidate whose tuning-look runs meet the most of the
protocol's bars (ties: the lower rate). Prints it; a table of every candidate goes to stderr."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def pick(paths: list[Path]) -> tuple[float, dict[float, list[int]]]:
    met: dict[float, list[int]] = defaultdict(list)  # lr -> bars met, one entry per run
    for path in paths:
        result = json.loads(path.read_text())
        lr = float(result["train_args"].split("--unet-lr")[1].split()[0])
        for run in result["runs"]:
            met[lr].append(sum(run["bars"].values()))
    if not met:
        raise SystemExit("no tuning runs finished")
    return min(met, key=lambda lr: (-sum(met[lr]) / len(met[lr]), lr)), dict(met)


if __name__ == "__main__":
    best, met = pick([Path(p) for p in sys.argv[1:]])
    for lr in sorted(met):
        print(f"--unet-lr {lr:g}: bars met per run {met[lr]}", file=sys.stderr)
    print(f"{best:g}")
