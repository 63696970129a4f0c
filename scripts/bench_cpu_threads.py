"""`sdlora train` steps/s on the CPU for several thread settings, on an idle machine and beside a busy load.

Issue 13: on a 2-core machine with other work running, training ran 20-60x slower than idle with torch's default
thread count (one per core), and about as fast as idle with one thread: the signature of OpenMP threads waiting
at every operator for a thread whose core another program holds. This script measures it. Each case is one real
`sdlora train` process (tiny base, a few sketch images); the busy load is N processes spinning in pure Python.

    python scripts/bench_cpu_threads.py --cores 0,1 --busy 2 --steps 40 --json out.json

`--cores` pins the training and the load to those CPUs, so a big machine can play a 2-core laptop.
Settings: `1`, `2` (torch's default for 2 cores, libgomp's default wait policy: what sdlora did before),
`2-passive` (2 threads, OMP_WAIT_POLICY=PASSIVE) and `auto` (sdlora's own choice, sdlora/util.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKETCH = REPO / "datasets" / "sketch"
SETTINGS = {  # name -> environment on top of the caller's (threads unset: sdlora chooses)
    "1": {"SDLORA_THREADS": "1"},
    "2": {"SDLORA_THREADS": "2", "OMP_WAIT_POLICY": ""},  # empty: libgomp's default (spin, then sleep)
    "2-passive": {"SDLORA_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "auto": {},
}
SPEED = re.compile(r"([0-9.]+) it/s")


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def start_load(n: int, cores: list[int] | None) -> tuple[list, object]:
    """n processes spinning on the CPU (pinned to `cores` when given) until the returned event is set."""
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
        if cores:
            os.sched_setaffinity(p.pid, cores)
    return procs, stop


def stop_load(procs: list, stop) -> None:
    stop.set()
    for p in procs:
        p.join(5)


def train_once(work: Path, steps: int, env_extra: dict[str, str], cores: list[int] | None, images: Path,
               timeout: float = 1800) -> dict:
    """One `sdlora train` run; steps/s as the trainer reports it (timed from the 6th step) and the wall time.
    A run past `timeout` seconds is stopped and reported as such (its speed is then below steps / timeout)."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SDLORA_THREADS",
                                                            "OMP_WAIT_POLICY")}
    env.update(env_extra)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "sdlora.cli.main", "train", "--images", str(images), "--trigger", "sks sketch",
           "--steps", str(steps), "--rank", "4", "--device", "cpu", "--output", str(out), "--no-progress"]
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=pin)
    except subprocess.TimeoutExpired:
        return {"it_per_s": None, "wall_s": round(time.perf_counter() - t0, 1), "threads": env_extra.get("SDLORA_THREADS"),
                "timed_out": True}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sdlora train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    speeds = SPEED.findall(proc.stderr)
    chosen = re.search(r"using (\d+) CPU thread", proc.stderr)
    threads = env_extra.get("SDLORA_THREADS") or (chosen.group(1) if chosen else "all cores")
    return {"it_per_s": float(speeds[-1]) if speeds else None, "wall_s": round(wall, 1), "threads": threads}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", help="comma-separated CPU ids to pin training and load to (default: no pinning)")
    ap.add_argument("--busy", type=int, default=2, help="spinning processes in the busy case (default: 2)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (default: 40)")
    ap.add_argument("--images", type=int, default=6, help="sketch images to train on (default: 6)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"thread settings to run (default: {','.join(SETTINGS)})")
    ap.add_argument("--loads", default="idle,busy", help="idle, busy or both (default: idle,busy)")
    ap.add_argument("--run-timeout", type=float, default=1800, help="stop a run after this many seconds (default: 1800)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        for png in sorted(SKETCH.glob("*.png"))[: args.images]:
            shutil.copy(png, images / png.name)
            shutil.copy(png.with_suffix(".txt"), images / png.with_suffix(".txt").name)
        for load in args.loads.split(","):
            procs, stop = start_load(args.busy, cores) if load == "busy" else ([], None)
            try:
                time.sleep(1.0 if procs else 0)  # let the load take its cores before sdlora looks
                for name in args.settings.split(","):
                    r = train_once(work, args.steps, SETTINGS[name], cores, images, args.run_timeout)
                    row = {"load": load if load == "idle" else f"{args.busy} spinning processes", "setting": name, **r,
                           "loadavg_1min": round(os.getloadavg()[0], 2)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                if procs:
                    stop_load(procs, stop)
    result = {"cores": cores or f"all ({os.cpu_count()})", "steps": args.steps, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
