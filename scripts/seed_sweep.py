"""Train one style with the default command (plus optional extra flags) for several seeds and score each LoRA
at strengths 0 and 1 (and 0.5) on held-out prompts: how robust a default recipe is, not only on the lucky seed.

    python scripts/seed_sweep.py --style pastel --seeds 0,1,2 --json benchmarks/sweep-pastel.json
    python scripts/seed_sweep.py --base tiny-xl --style pastel --json benchmarks/sweep-pastel-xl.json  # SDXL LoRAs
"""

import argparse
import json
import shlex
import time
from pathlib import Path

from sdlora.cli.main import main as cli
from sdlora.eval.evaluate import builtin_prompts, run_eval
from sdlora.lora.specs import LoraSpec
from sdlora.models.base import load_base

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="tiny", help="an embedded base (tiny, tiny-xl) or any base --base takes")
    ap.add_argument("--style", default="pastel")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--strengths", default="0,0.5,1")
    ap.add_argument("--train-args", default="")
    ap.add_argument("--work", default=str(ROOT / "output" / "seed-sweep"))
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",")]
    base, runs = load_base(args.base), []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.work) / f"{args.style}-{seed}"
        t = time.perf_counter()
        rc = cli(["train", "--base", args.base, "--images", str(ROOT / "datasets" / args.style), "--trigger", f"sks {args.style}",
                  "--rank", "4", "--output", str(out), "--overwrite", "--no-progress", "--seed", str(seed),
                  *shlex.split(args.train_args)])
        assert rc == 0
        train_s = time.perf_counter() - t
        report, _ = run_eval(base, [LoraSpec(str(out / "lora.safetensors"))],
                             builtin_prompts(args.prompts, f"sks {args.style}"), strengths, [args.style])
        rows = {r["strength"]: {"style": round(r["style_scores"][args.style], 3),
                                "colour": round(r["colour_accuracy"], 3), "shape": round(r["shape_accuracy"], 3)}
                for r in report.rows}
        runs.append({"seed": seed, "train_seconds": round(train_s, 1), "rows": rows})
        print(json.dumps(runs[-1]), flush=True)
    result = {"base": args.base, "style": args.style, "train_args": args.train_args, "prompts": args.prompts, "runs": runs}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
