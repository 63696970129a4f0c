"""Issue 15's style-learning protocol: for each held-out look, a dataset of 24 captioned images, the README's default
command (no per-look settings) at several training seeds, and held-out prompts at strengths 0 / 0.25 / 0.5 / 0.75 /
1, judged by a world checker that knows the look; then two LoRAs of different looks mixed at 1.0 each. Writes JSON
and a markdown table with each bar's verdict.

    python scripts/eval_styles.py --base build/looks --checker build/looks/checker.safetensors --json benchmarks/looks.json
    python scripts/eval_styles.py --looks pastel,sketch --json benchmarks/tiny-before.json   # the shipped tiny base

The three example looks train on the shipped datasets/ folders; the others are rendered here (seed 100 + index).
Bars: style >= 0.8 at 1 and <= 0.2 at 0, rising with strength; colour and shape within 10 points of strength 0;
0.5 between 0.2 and 0.8 (a dial, not a switch); mixed, each look >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def dataset(look: str, index: int, work: Path, trigger: str) -> Path:
    if (ROOT / "datasets" / look).is_dir() and trigger == f"sks {look}":
        return ROOT / "datasets" / look
    from sdlora.eval.datasets import write_dataset

    out = work / "data" / look
    if not (out / "023.png").exists():
        write_dataset(look, 24, 128, 100 + index, out, trigger)
    return out


def verdicts(rows: dict[float, dict]) -> dict[str, bool]:
    style = [rows[k]["style"] for k in STRENGTHS]
    return {"style_at_1": style[-1] >= 0.8, "style_at_0": style[0] <= 0.2,
            "rises": all(a <= b for a, b in zip(style, style[1:])), "dial_at_half": 0.2 <= rows[0.5]["style"] <= 0.8,
            "colour_kept": rows[1.0]["colour"] >= rows[0.0]["colour"] - 0.10,
            "shape_kept": rows[1.0]["shape"] >= rows[0.0]["shape"] - 0.10}


def main(argv: list[str] | None = None) -> dict:
    from sdlora.cli.main import main as cli
    from sdlora.eval.checker import checker_for_base
    from sdlora.eval.evaluate import builtin_prompts, grid_image, run_eval
    from sdlora.eval.looks import HELD_OUT_LOOKS
    from sdlora.lora.specs import LoraSpec
    from sdlora.models.base import load_base

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--checker", default=None, help="a checker that knows the looks (default: the base's own judge)")
    ap.add_argument("--looks", default=",".join(HELD_OUT_LOOKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--trigger", default="sks {look}", help="trigger phrase ({look}: the look's name); tuning on a "
                    "look the base knows takes one without its name")
    ap.add_argument("--mix", default="pastel,sketch", help="two looks mixed at 1.0 each (their seed-0 LoRAs)")
    ap.add_argument("--train-args", default="", help="extra `sdlora train` flags (default: none, the README's command)")
    ap.add_argument("--device", default=None, help="where generation runs (default: cuda when there is one)")
    ap.add_argument("--work", default=str(ROOT / "output" / "eval-styles"))
    ap.add_argument("--json", required=True)
    ap.add_argument("--grids", default=None, help="a folder for each look's seed-0 grid (8 prompts x the strengths)")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # training picks its own (the CLI's)
    work, base = Path(args.work), load_base(args.base, device=device)
    looks, seeds = args.looks.split(","), [int(s) for s in args.seeds.split(",")]
    args.checker = args.checker or checker_for_base(args.base)  # tiny-looks: its own checker, which knows every look
    runs, loras = [], {}
    for i, look in enumerate(looks):
        trigger = args.trigger.format(look=look)
        data = dataset(look, i, work, trigger)
        for seed in seeds:
            out = work / f"{look}-{seed}"
            t = time.perf_counter()
            rc = cli(["train", "--images", str(data), "--trigger", trigger, "--rank", "4", "--base", args.base,
                      "--seed", str(seed), "--output", str(out), "--overwrite", "--no-progress", *args.train_args.split()])
            if rc != 0:
                raise SystemExit(f"training {look} seed {seed} failed")
            train_s = time.perf_counter() - t
            loras[(look, seed)] = out / "lora.safetensors"
            prompts = builtin_prompts(args.prompts, trigger)
            report, grid = run_eval(base, [LoraSpec(str(loras[(look, seed)]))], prompts, list(STRENGTHS), [look],
                                    checker_path=args.checker)
            if args.grids and seed == seeds[0]:
                Path(args.grids).mkdir(parents=True, exist_ok=True)
                grid_image(grid, list(STRENGTHS), [p.text for p in prompts]).save(Path(args.grids) / f"{look}.png")
            rows = {r["strength"]: {"style": round(r["style_scores"][look], 3), "colour": round(r["colour_accuracy"], 3),
                                    "shape": round(r["shape_accuracy"], 3)} for r in report.rows}
            runs.append({"look": look, "seed": seed, "train_seconds": round(train_s, 1), "rows": rows,
                         "bars": verdicts(rows)})
            print(json.dumps(runs[-1]), flush=True)
    result: dict = {"base": args.base, "checker": str(args.checker), "prompts": args.prompts, "train_args": args.train_args,
                    "trigger": args.trigger,
                    "runs": runs}
    mix = [m for m in args.mix.split(",") if m]
    if len(mix) == 2 and all((m, seeds[0]) in loras for m in mix):
        report, _ = run_eval(base, [LoraSpec(str(loras[(m, seeds[0])])) for m in mix],
                             builtin_prompts(args.prompts, ", ".join(args.trigger.format(look=m) for m in mix)), [1.0], mix,
                             checker_path=args.checker)
        scores = {m: round(report.rows[0]["style_scores"][m], 3) for m in mix}
        result["mix"] = {"looks": mix, "scores": scores, "both_show": all(v >= 0.5 for v in scores.values())}
    result["table"] = table(runs)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    return result


def table(runs: list[dict]) -> str:
    """One markdown row per (look, seed): style at each strength, colour and shape at 0 -> 1, bars missed."""
    lines = ["| look | seed | style 0 / .25 / .5 / .75 / 1 | colour 0 -> 1 | shape 0 -> 1 | bars missed |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        rows = r["rows"]
        style = " / ".join(f"{rows[k]['style']:.2f}" for k in STRENGTHS)
        missed = ", ".join(k for k, ok in r["bars"].items() if not ok) or "none"
        lines.append(f"| {r['look']} | {r['seed']} | {style} | {rows[0.0]['colour']:.0%} -> {rows[1.0]['colour']:.0%} | "
                     f"{rows[0.0]['shape']:.0%} -> {rows[1.0]['shape']:.0%} | {missed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
