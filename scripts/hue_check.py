"""Is a style LoRA's colour loss in the drawing or in the checker's reading? Regenerates the first N held-out
prompts at strength 1 with each LoRA (same seeds as `sdlora eval`) and reads the main colour twice: by the world
checker, and by a judge-free rule (circular mean hue of the saturated pixels, nearest of the six named hues).

    python scripts/hue_check.py --styles halftone,sketch,pastel --work output/eval-styles --json benchmarks/hue.json
"""

import argparse
import colorsys
import json
from pathlib import Path

import numpy as np

from sdlora.eval.checker import judge, load_checker
from sdlora.eval.evaluate import builtin_prompts
from sdlora.eval.world import COLOURS
from sdlora.lora.mixer import LoraMixer
from sdlora.models.base import load_base
from sdlora.sample.generate import generate_images

HUES = {c: colorsys.rgb_to_hsv(*[v / 255 for v in rgb])[0] for c, rgb in COLOURS.items()}


def hue_colour(image) -> str | None:
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    mx, mn = a.max(-1), a.min(-1)
    px = a[((mx - mn) / np.maximum(mx, 1e-6) > 0.25) & (mx > 0.25)]
    if len(px) < 10:
        return None  # nothing coloured enough to read
    h = np.array([colorsys.rgb_to_hsv(*p)[0] for p in px[:: max(1, len(px) // 400)]])
    mean = np.angle(np.exp(2j * np.pi * h).mean()) / (2 * np.pi) % 1
    return min(HUES, key=lambda c: min(abs(HUES[c] - mean), 1 - abs(HUES[c] - mean)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--styles", default="halftone,sketch,pastel")
    ap.add_argument("--work", default="output/eval-styles")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    base, checker, out = load_base("tiny"), load_checker(), {}
    for style in args.styles.split(","):
        mixer = LoraMixer(base)
        name = mixer.load(str(Path(args.work) / style / "lora.safetensors"), 1.0)
        prompts = builtin_prompts(args.prompts, f"sks {style}")
        images = [generate_images(base, p.text, seed=i, steps=20)[0] for i, p in enumerate(prompts)]
        mixer.remove(name)
        v = judge(checker, images)
        rows = [{"prompted": p.colour, "checker": str(v["colour"][i]), "hue": hue_colour(images[i])} for i, p in enumerate(prompts)]
        out[style] = {"checker_right": float(np.mean([r["checker"] == r["prompted"] for r in rows])),
                      "hue_right": float(np.mean([r["hue"] == r["prompted"] for r in rows])),
                      "agree": float(np.mean([r["hue"] == r["checker"] for r in rows])), "images": rows}
        print(style, {k: out[style][k] for k in ("checker_right", "hue_right", "agree")}, flush=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
