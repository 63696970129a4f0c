"""A contact sheet of every look (sdlora/eval/looks.py): one row per look, the same scenes in each column.

    python scripts/look_sheet.py --out docs/looks.png
    python scripts/look_sheet.py --bench 100 --size 128   # milliseconds per 128-px render, per look
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from PIL import Image, ImageDraw  # noqa: E402

from sdlora.eval.looks import ALL_LOOKS, HELD_OUT_LOOKS, render_look  # noqa: E402
from sdlora.eval.world import BACKGROUNDS, COLOURS, random_scene  # noqa: E402


def sheet(looks: list[str], scenes: list, size: int, label: int = 100) -> Image.Image:
    pad = 4
    out = Image.new("RGB", (label + len(scenes) * (size + pad), len(looks) * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for row, look in enumerate(looks):
        y = row * (size + pad)
        draw.text((4, y + size // 2 - 12), look, fill=(0, 0, 0))
        draw.text((4, y + size // 2 + 2), "held out" if look in HELD_OUT_LOOKS else "training", fill=(110, 110, 110))
        for col, scene in enumerate(scenes):
            out.paste(render_look(look, scene, size), (label + col * (size + pad), y))
    return out


def palette_image(image: Image.Image, colours: int) -> Image.Image:
    """A palette PNG keeps the sheet small (the textures compress badly as RGB). One palette for every look
    would band the gradients and shift the colours, so it is dithered, and it holds the world's exact colours
    (objects, backgrounds, black, white) so that flat areas stay flat rather than speckled."""
    exact = [*COLOURS.values(), *BACKGROUNDS.values(), (0, 0, 0), (255, 255, 255)]
    found = image.quantize(colours - len(exact), Image.Quantize.MEDIANCUT).getpalette()[: 3 * (colours - len(exact))]
    palette = Image.new("P", (1, 1))
    palette.putpalette([v for rgb in exact for v in rgb] + found)
    return image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)


def bench(looks: list[str], n: int, size: int) -> None:
    scenes = [random_scene(random.Random(f"bench-{i}")) for i in range(n)]
    for look in looks:
        render_look(look, scenes[0], size)  # warm up
        start = time.perf_counter()
        for scene in scenes:
            render_look(look, scene, size)
        print(f"{look:14s} {(time.perf_counter() - start) / n * 1000:6.1f} ms per {size}-px render", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--bench", type=int, default=0, help="time this many random scenes per look")
    parser.add_argument("--size", type=int, default=104, help="tile size (104 keeps the 23-row sheet under 400 KB)")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=60)  # four scenes with all six colours
    parser.add_argument("--colours", type=int, default=160, help="palette size of the PNG")
    parser.add_argument("--looks", help="comma-separated looks (default: all)")
    args = parser.parse_args(argv)
    if args.bench:
        bench(list(ALL_LOOKS), args.bench, args.size)
    if args.out is None:
        return
    rng = random.Random(args.seed)
    scenes: list = []
    while len(scenes) < args.scenes:  # every background once before any repeats
        scene = random_scene(rng)
        if scene.background not in {s.background for s in scenes} or len(scenes) >= len(BACKGROUNDS):
            scenes.append(scene)
    looks = args.looks.split(",") if args.looks else list(ALL_LOOKS)
    image = sheet(looks, scenes, args.size)
    palette_image(image, args.colours).save(args.out, optimize=True)
    print(f"wrote {len(looks)} looks x {len(scenes)} scenes to {args.out}")


if __name__ == "__main__":
    main()
