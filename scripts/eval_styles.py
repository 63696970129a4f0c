"""Measure style LoRAs on the tiny base: train each example style with the default command, then
`sdlora eval` it at strengths 0/0.5/1 on held-out prompts; also the two-LoRA mix. Writes JSON.

    python scripts/eval_styles.py --styles halftone --mix halftone,sketch --prompts 16 --json benchmarks/styles.json

`--train-args "--no-text-encoder --steps 600"` adds flags to the default command, to probe other recipes.
"""

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdlora.cli.main", *args], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--styles", default="halftone,sketch,pastel")
    ap.add_argument("--mix", default="halftone,sketch")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--work", default="output/eval-styles")
    ap.add_argument("--train-args", default="", help="extra flags for `sdlora train` (default: none, the README's command)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    work = ROOT / args.work
    extra = shlex.split(args.train_args)
    results = {"python": platform.python_version(), "machine": platform.machine(), "prompts": args.prompts,
               "train_args": args.train_args, "runs": []}
    styles = sorted(set(args.styles.split(",")) | set(filter(None, args.mix.split(","))))
    for style in styles:
        t = time.perf_counter()
        # the README's default command (tiny base, its recommended defaults)
        sh("train", "--images", f"datasets/{style}", "--trigger", f"sks {style}", "--rank", "4",
           "--output", str(work / style), "--overwrite", "--no-progress", *extra)
        train_s = time.perf_counter() - t
        if style in args.styles.split(","):
            sh("eval", "--lora", str(work / style / "lora.safetensors"), "--strengths", "0,0.5,1",
               "--num-prompts", str(args.prompts), "--output", str(work / f"eval-{style}"))
            report = json.loads((work / f"eval-{style}" / "report.json").read_text())
            results["runs"].append({"style": style, "train_seconds": round(train_s, 1), "results": report["results"]})
    if args.mix:
        mix = args.mix.split(",")
        sh("eval", *[a for s in mix for a in ("--lora", str(work / s / "lora.safetensors"))], "--strengths", "1",
           "--num-prompts", str(args.prompts), "--output", str(work / "eval-mix"))
        report = json.loads((work / "eval-mix" / "report.json").read_text())
        results["mix"] = {"styles": mix, "results": report["results"]}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
