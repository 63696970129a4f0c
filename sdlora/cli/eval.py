"""`sdlora eval`: the command-line face of sdlora/evaluate.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora.cli.launch import add_gpus_argument


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="generate prompts at several LoRA strengths; report style score, content accuracy and pixel statistics",
        description="Generate every prompt at each strength with fixed seeds and write a labelled grid PNG and a JSON report. "
        "On the tiny base a checker trained on the procedural world scores the styles and the prompted colour/shape.",
    )
    p.add_argument("--base", default="tiny", help="base model (default: tiny; tiny-xl is judged by the same checker, "
                   "tiny-looks by its own, which knows every look)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:S[:TE]]", help="LoRA at strength S; the strengths below multiply S (repeatable)")
    p.add_argument("--prompts", default="builtin", help="'builtin' (held-out prompts of the procedural world) or a text file, one prompt per line")
    p.add_argument("--num-prompts", type=int, default=16, help="how many builtin prompts (default: 16, at most 200)")
    p.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="comma-separated strengths (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--style", action="append", help="style(s) the LoRAs should show (default: read from their trigger phrases)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i (default: 0)")
    p.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    p.add_argument("--output", default="output/eval", help="folder for grid.png and report.json (default: output/eval)")
    add_gpus_argument(p, "the prompts are split across them; the same report as one GPU")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from sdlora.cli.launch import relaunched
    from sdlora.errors import SdloraError
    from sdlora.eval.checker import checker_for_base, checker_style_names
    from sdlora.eval.evaluate import builtin_prompts, file_prompts, grid_image, lora_styles, run_eval
    from sdlora.eval.world import STYLES
    from sdlora.lora.specs import parse_lora_spec
    from sdlora.models.base import load_base
    from sdlora.training import dist as dist_seam
    from sdlora.util import check_output_folder, default_device

    try:
        strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    except ValueError:
        raise SdloraError(f"--strengths must be comma-separated numbers, not '{args.strengths}'") from None
    if not strengths:
        raise SdloraError("--strengths is empty")
    checker_path = checker_for_base(args.base)  # None: a real base, pixel statistics only
    known = checker_style_names(checker_path) if checker_path else list(STYLES)
    for s in args.style or []:
        if s not in known:
            raise SdloraError(f"unknown --style '{s}'; the checker knows {', '.join(known)}")
    check_output_folder(args.output)
    specs = [parse_lora_spec(s) for s in args.lora]
    styles, trigger = lora_styles(specs, args.style, known)
    if args.prompts == "builtin":
        if not 1 <= args.num_prompts <= 200:
            raise SdloraError("--num-prompts must be between 1 and 200")
        prompts = builtin_prompts(args.num_prompts, trigger)
    else:
        prompts = file_prompts(args.prompts)
    if (code := relaunched(args, args.device)) is not None:
        return code
    proc = dist_seam.current()
    device = str(proc.device(torch.device(default_device(args.device))))
    proc.init(cpu=device == "cpu")
    base = load_base(args.base, "fp16" if device.startswith("cuda") else "fp32", device)
    n_images = len(proc.share(len(prompts))) * len(strengths)  # this process's share (all of them on one)
    # Counted in sampling steps, so the time left shows within seconds rather than after the first image.
    bar = tqdm(total=n_images * args.steps, desc=f"eval: {n_images} images", unit="step", mininterval=1.0,
               postfix=f"image 1/{n_images}", disable=not proc.is_main,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix} [{elapsed} spent, {remaining} left]")
    done = 0

    def image_done() -> None:
        nonlocal done
        done += 1
        if done < n_images:
            bar.set_postfix_str(f"image {done + 1}/{n_images}", refresh=False)

    report, grid = run_eval(base, specs, prompts, strengths, styles, args.steps, args.guidance, args.seed, checker_path is not None,
                            image_done, on_step=lambda _i: bar.update(1),
                            map_prompts=proc.map if proc.world_size > 1 else None,  # one process: batched prompts
                            checker_path=checker_path)
    bar.close()
    if not proc.is_main:
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    grid_image(grid, strengths, report.prompts).save(out / "grid.png")
    (out / "report.json").write_text(report.to_json() + "\n")
    for row in report.rows:
        parts = [f"strength {row['strength']:g}:"]
        for s in styles:
            parts.append(f"{s} {row['style_scores'][s]:.2f}")
        for key in ("colour_accuracy", "shape_accuracy", "mean_abs_change_vs_strength0"):
            if key in row:
                parts.append(f"{key.split('_')[0] if 'accuracy' in key else 'change'} {row[key]:.2f}")
        print("  ".join(parts))
    print(out / "grid.png")
    return 0
