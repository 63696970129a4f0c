"""Render a style data set of the procedural world to a folder: NNN.png + NNN.txt and a README.md.

`python -m sdlora.eval.datasets --style sketch --out datasets/sketch` (scripts/make_style_dataset.py wraps it).
--style takes any look of sdlora/eval/looks.py (world's sketch, pastel and halftone among them, drawn exactly as
world.render draws them, so the shipped datasets/ folders come out byte for byte the same).
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from PIL import Image

from sdlora.eval.looks import ALL_LOOKS, get_look, render_look
from sdlora.eval.world import caption, random_scene


def write_dataset(style: str, count: int, size: int, seed: int, out: Path, trigger: str) -> None:
    """Write NNN.png + NNN.txt (caption without trigger) and a README.md into out; style is any look."""
    description = get_look(style).description  # an unknown look fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # only this script's own numbered files, so a smaller rerun leaves no strays
        if re.fullmatch(r"\d{3,}\.(png|txt)", old.name):
            old.unlink()
    rng = random.Random(seed)
    for index in range(count):
        scene = random_scene(rng)
        # a 256-colour palette PNG looks the same here and is ~2.5x smaller than RGB (hatching and dots
        # compress badly), keeping a 24-image set well under 400 KB; loaders convert it back to RGB
        palette = render_look(style, scene, size).quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(out / f"{index:03d}.png", optimize=True)
        (out / f"{index:03d}.txt").write_text(caption(scene) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        f"{style}: {description}. {count} images at {size}x{size}, seed {seed}. "
        f'Suggested trigger: "{trigger}" (captions omit it; train with --trigger "{trigger}").\n',
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=ALL_LOOKS, required=True, metavar="LOOK", help=", ".join(ALL_LOOKS))
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trigger", help='suggested trigger word for the README (default "sks <style>")')
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 16:
        parser.error("--count must be >= 1 and --size >= 16")
    trigger = args.trigger or f"sks {args.style}"
    write_dataset(args.style, args.count, args.size, args.seed, args.out, trigger)
    print(f"wrote {args.count} {args.style} images to {args.out}")


if __name__ == "__main__":
    main()


