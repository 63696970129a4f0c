"""Seconds per image on this machine's CPU for each embedded base (the issue-15 budget: one image <= 2 s), after one
warm-up image, at the generate command's default 20 steps.

    python scripts/time_tiny_generation.py                      # tiny and tiny-looks, 3 images each, 2 threads
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    import torch

    from sdlora.models.base import load_base
    from sdlora.sample.generate import generate_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="tiny,tiny-looks")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for name in args.bases.split(","):
        base = load_base(name)
        generate_images(base, "a red circle", seed=0, steps=args.steps)  # warm-up
        times = []
        for i in range(args.repeats):
            t = time.perf_counter()
            generate_images(base, "a small blue star on a white background", seed=i, steps=args.steps)
            times.append(round(time.perf_counter() - t, 3))
        out[name] = times
        print(f"{name}: one image, {args.steps} steps: {' / '.join(f'{t:.2f}' for t in times)} s", flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
