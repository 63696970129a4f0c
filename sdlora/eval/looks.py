"""Many "looks" of the procedural world (sdlora/eval/world.py), for a tiny base that has seen many art styles.

A real Stable Diffusion base has seen thousands of art styles before a style LoRA teaches it one more. The tiny
base is built the same way (issue 15): it trains on TRAINING_LOOKS (renders of world scenes in each look, the
caption sometimes naming the look), and style learning is measured on HELD_OUT_LOOKS, which the base never saw
drawn nor named. Every look keeps each object's colour (its pixels stay nearest their named colour's hue) and
its silhouette, so the checker's colour and shape reading stays meaningful in every look.

    render_look("woodcut", scene, 128)            # a PIL image; the same inputs give the same pixels
    look_caption(scene, "woodcut", True, rng)     # "woodcut, a small red circle above ... background"

plain, sketch, pastel and halftone are world.py's styles, drawn by world.render (4x supersampled); the others
live in looks_draw.py (training) and looks_held.py (held out) and are drawn 2x supersampled, which keeps a
128-px render around 10-25 ms on one core.
"""

from __future__ import annotations

import colorsys
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdlora.eval import looks_draw as draw
from sdlora.eval import looks_held as held
from sdlora.eval.world import COLOURS, DESCRIPTIONS, Scene, caption, render

_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Look:
    """A way of drawing the world: its name, one line on what it looks like, the caption words that name it,
    and its renderer `(scene, side) -> float side x side x 3`; None for world.py's own styles."""

    name: str
    description: str
    words: tuple[str, ...]
    draw: Callable[[Scene, int], np.ndarray] | None


def _look(name: str, words: tuple[str, ...], fn: Callable[[Scene, int], np.ndarray] | None) -> Look:
    if fn is None:
        return Look(name, DESCRIPTIONS[name], words, fn)
    doc = " ".join((fn.__doc__ or "").split()).rstrip(".")  # the renderer's docstring, as world's lines read
    description = doc[:1].lower() + doc[1:]
    return Look(name, description, words, fn)


_TRAINING = (
    _look("plain", ("flat colours", "plain"), None),
    _look("hatching", ("hatching", "hatched lines"), draw.hatching),
    _look("crosshatch", ("cross-hatching", "crosshatched"), draw.crosshatch),
    _look("stippling", ("stippling", "stippled"), draw.stippling),
    _look("stripes", ("stripes", "striped"), draw.stripes),
    _look("checker", ("checkered", "checkerboard pattern"), draw.checker),
    _look("gradient", ("gradient", "gradient shading"), draw.gradient),
    _look("posterise", ("posterized", "cel shaded"), draw.posterise),
    _look("pixel", ("pixel art", "pixelated"), draw.pixel),
    _look("softfocus", ("soft focus", "blurry"), draw.softfocus),
    _look("watercolour", ("watercolor", "watercolour painting"), draw.watercolour),
    _look("grainy", ("grainy", "film grain"), draw.grainy),
    _look("woodcut", ("woodcut", "linocut"), draw.woodcut),
    _look("relief", ("raised relief", "bevelled"), draw.emboss),
    _look("crayon", ("crayon", "wax crayon"), draw.crayon),
)
_HELD_OUT = (
    _look("sketch", ("pencil sketch", "sketch"), None),
    _look("pastel", ("pastel", "pastel palette"), None),
    _look("halftone", ("halftone", "halftone dots"), None),
    _look("neon", ("neon", "neon sign"), held.neon),
    _look("stained-glass", ("stained glass", "leaded glass"), held.stained_glass),
    _look("chalk", ("chalk", "chalkboard"), held.chalk),
    _look("collage", ("torn paper collage", "paper collage"), held.collage),
    _look("embroidery", ("embroidery", "embroidered", "needlework"), held.embroidery),
)
LOOKS: dict[str, Look] = {look.name: look for look in _TRAINING + _HELD_OUT}
TRAINING_LOOKS: tuple[str, ...] = tuple(look.name for look in _TRAINING)  # what the base is trained on
HELD_OUT_LOOKS: tuple[str, ...] = tuple(look.name for look in _HELD_OUT)  # never drawn nor named for the base
ALL_LOOKS: tuple[str, ...] = TRAINING_LOOKS + HELD_OUT_LOOKS


def get_look(name: str) -> Look:
    if name not in LOOKS:
        raise ValueError(f"unknown look {name!r}; choose from {', '.join(ALL_LOOKS)}")
    return LOOKS[name]


def render_look(look: str, scene: Scene, size: int) -> Image.Image:
    """Draw scene in look as a size x size RGB image; the same inputs always give the same pixels (texture
    randomness comes from scene.texture_seed)."""
    spec = get_look(look)
    if spec.draw is None:
        return render(look, scene, size)
    side = size * _SUPERSAMPLE
    pixels = np.clip(np.rint(spec.draw(scene, side)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.LANCZOS)


def look_caption(scene: Scene, look: str, named: bool, rng: random.Random) -> str:
    """The content caption; when named, one of the look's words before or after it (rng picks which word and
    where), e.g. "cross-hatching, a small red circle above a large blue square on a grey background"."""
    words = get_look(look).words
    text = caption(scene)
    if not named:
        return text
    word = rng.choice(words)
    return f"{word}, {text}" if rng.random() < 0.5 else f"{text}, {word}"


HUES = {c: colorsys.rgb_to_hsv(*[v / 255 for v in rgb])[0] for c, rgb in COLOURS.items()}
MIN_CHROMA = 0.05  # below this mean chroma (0..1) a shape reads as grey: its colour is lost


def hue_name(pixels: np.ndarray) -> str | None:
    """A simple hue judge of pixels [N, 3] in 0..1: the angle of the mean chroma vector (a chroma-weighted circular
    mean of the hue) as the nearest of world's six named hues; None when the pixels are, on average, grey."""
    c = pixels - pixels.mean(-1, keepdims=True)
    a, b = (2 * c[:, 0] - c[:, 1] - c[:, 2]).mean() / 2, (c[:, 1] - c[:, 2]).mean() * np.sqrt(3) / 2
    if np.hypot(a, b) < MIN_CHROMA:
        return None
    hue = np.arctan2(b, a) / (2 * np.pi) % 1
    return min(HUES, key=lambda name: min(abs(HUES[name] - hue), 1 - abs(HUES[name] - hue)))
