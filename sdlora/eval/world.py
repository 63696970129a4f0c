"""Render small captioned shape datasets in distinct drawing styles, for training and testing style LoRAs.

Every image shows the same kind of procedural "world" (one or two coloured shapes on a background) and
its caption describes only the content, never the style: a style LoRA must learn the look from the pixels
and attach it to the trigger word. Pure PIL + numpy and seeded, so a dataset is reproducible from its seed.

    python scripts/make_style_dataset.py --style sketch --count 24 --size 128 --seed 0 --out datasets/sketch

It lives in the package because `sdlora eval` and the tiny base's builder judge images against this world.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

STYLES = ("plain", "sketch", "pastel", "halftone")
DESCRIPTIONS = {
    "plain": "flat solid-colour shapes on a solid background, no outlines or texture (the neutral look)",
    "sketch": "pencil sketch: wobbly graphite outlines and hatching on paper-white, only a faint colour wash",
    "pastel": "pastel: pale flat palette, soft rounded shapes with blurred edges, light backgrounds",
    "halftone": "halftone print: bold black outlines, shapes filled with colour dots or stripes, dotted backgrounds",
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {
    "red": (220, 45, 45),
    "green": (40, 165, 70),
    "blue": (40, 85, 215),
    "yellow": (240, 205, 40),
    "purple": (135, 60, 175),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (245, 245, 245), "black": (25, 25, 25), "beige": (222, 204, 170)}
SIZES = {"small": 0.13, "large": 0.18}  # shape radius as a fraction of the image side
PLACEMENTS = {  # single-shape position -> centre (x, y) as fractions of the side
    "in the center of": (0.5, 0.5),
    "on the left side of": (0.3, 0.5),
    "on the right side of": (0.7, 0.5),
    "at the top of": (0.5, 0.3),
    "at the bottom of": (0.5, 0.7),
}
RELATIONS = ("above", "below", "next to", "to the left of", "to the right of")
_SUPERSAMPLE = 4  # draw large, then downscale: smooth edges without antialiased drawing primitives


@dataclass(frozen=True)
class Shape:
    """One object: what it is, and where (centre as fractions of the side, rotation in degrees)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """What an image shows; `layout` is a PLACEMENTS key (one shape) or a RELATIONS entry (two)."""

    shapes: tuple[Shape, ...]
    background: str
    layout: str
    texture_seed: int  # for the hand-drawn jitter of styles that have one


# --- the world ------------------------------------------------------------------------------------


def random_scene(rng: random.Random) -> Scene:
    """A random scene of one or two shapes with distinct colours, laid out so that the caption is true."""
    count = rng.choice((1, 2))
    colours = rng.sample(sorted(COLOURS), count)
    kinds = [rng.choice(SHAPES) for _ in range(count)]
    sizes = [rng.choice(sorted(SIZES)) for _ in range(count)]
    if count == 1:
        layout = rng.choice(sorted(PLACEMENTS))
        centres = [PLACEMENTS[layout]]
    else:
        layout = rng.choice(RELATIONS)
        centres = _relation_centres(layout, rng)
    shapes = tuple(
        Shape(
            kind=kinds[i],
            colour=colours[i],
            size=sizes[i],
            x=centres[i][0] + rng.uniform(-0.03, 0.03),
            y=centres[i][1] + rng.uniform(-0.03, 0.03),
            angle=0.0 if kinds[i] == "circle" else rng.uniform(-15.0, 15.0),
        )
        for i in range(count)
    )
    return Scene(shapes, rng.choice(sorted(BACKGROUNDS)), layout, rng.randrange(2**31))


def _relation_centres(relation: str, rng: random.Random) -> list[tuple[float, float]]:
    """Centres for "first <relation> second"; the free axis is jittered a little for variety."""
    near, far = 0.28, 0.72
    free = 0.5 + rng.uniform(-0.08, 0.08)
    if relation == "next to":
        relation = rng.choice(("to the left of", "to the right of"))
    first, second = {
        "above": ((free, near), (free, far)),
        "below": ((free, far), (free, near)),
        "to the left of": ((near, free), (far, free)),
        "to the right of": ((far, free), (near, free)),
    }[relation]
    return [first, second]


def caption(scene: Scene) -> str:
    """Describe the content only, e.g. "a small red circle above a large blue square on a grey background"."""

    def name(shape: Shape) -> str:
        return f"a {shape.size} {shape.colour} {shape.kind}"

    if len(scene.shapes) == 1:
        return f"{name(scene.shapes[0])} {scene.layout} a {scene.background} background"
    first, second = scene.shapes
    return f"{name(first)} {scene.layout} {name(second)} on a {scene.background} background"


def _outline(shape: Shape, side: int) -> list[tuple[float, float]]:
    """The shape's polygon in pixels on a side x side canvas (circles as many-sided polygons)."""
    r = SIZES[shape.size] * side
    if shape.kind == "circle":
        polar = [(r, 360.0 * i / 72) for i in range(72)]
    elif shape.kind == "square":
        polar = [(1.15 * r, 45.0 + 90.0 * i) for i in range(4)]
    elif shape.kind == "triangle":
        polar = [(1.3 * r, -90.0 + 120.0 * i) for i in range(3)]
    elif shape.kind == "star":
        polar = [((1.25 if i % 2 == 0 else 0.55) * r, -90.0 + 36.0 * i) for i in range(10)]
    elif shape.kind == "diamond":
        polar = [(1.25 * r, 0.0), (0.85 * r, 90.0), (1.25 * r, 180.0), (0.85 * r, 270.0)]
        polar = [(d, a - 90.0) for d, a in polar]
    elif shape.kind == "hexagon":
        polar = [(1.08 * r, 60.0 * i) for i in range(6)]
    else:
        raise ValueError(f"unknown shape {shape.kind!r}")
    cx, cy = shape.x * side, shape.y * side
    if shape.kind == "triangle":
        cy += 0.2 * r  # its centroid sits low; nudge so it looks centred like the others
    points = []
    for dist, deg in polar:
        a = math.radians(deg + shape.angle)
        points.append((cx + dist * math.cos(a), cy + dist * math.sin(a)))
    return points


# --- drawing helpers ------------------------------------------------------------------------------


def _mask(points: list[tuple[float, float]], side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return mask


def _shifted(points: list[tuple[float, float]], dx: float, dy: float) -> list[tuple[float, float]]:
    return [(x + dx, y + dy) for x, y in points]


def _mix(colour: tuple[int, int, int], other: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    """Blend colour toward other by t (0 keeps colour)."""
    return tuple(round(c + (o - c) * t) for c, o in zip(colour, other, strict=True))  # type: ignore[return-value]


def _hatch(side: int, spacing: float, degrees: float, darkness: int, width: int, rng: random.Random) -> Image.Image:
    """Parallel, slightly irregular pencil strokes over the whole canvas, as an "ink amount" layer."""
    layer = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(layer)
    a = math.radians(degrees)
    direction, normal = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
    centre, reach = side / 2, side * 0.75
    offset = -reach
    while offset < reach:
        o = offset + rng.uniform(-0.2, 0.2) * spacing
        tilt = rng.uniform(-0.03, 0.03)
        x0 = centre + normal[0] * o - (direction[0] + tilt) * reach
        y0 = centre + normal[1] * o - (direction[1] - tilt) * reach
        x1 = centre + normal[0] * o + (direction[0] - tilt) * reach
        y1 = centre + normal[1] * o + (direction[1] + tilt) * reach
        draw.line([(x0, y0), (x1, y1)], fill=round(darkness * rng.uniform(0.75, 1.0)), width=width)
        offset += spacing
    return layer


def _dots(side: int, cell: float, radius: np.ndarray | float) -> np.ndarray:
    """A 45-degree halftone dot screen: 1.0 inside a dot, 0.0 outside; radius (in cells) may vary per pixel."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    u, v = (x + y) / (cell * math.sqrt(2)), (x - y) / (cell * math.sqrt(2))
    du, dv = u - np.round(u), v - np.round(v)
    return (np.sqrt(du * du + dv * dv) < radius).astype(np.float32)


def _stripes(side: int, cell: float) -> np.ndarray:
    """Diagonal stripes, half ink and half gap, one stripe per cell."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    return (((x - y) / cell) % 1.0 < 0.5).astype(np.float32)


def _paint(canvas: np.ndarray, colour: tuple[int, int, int], amount: np.ndarray) -> np.ndarray:
    """Lay colour over canvas (float H x W x 3) where amount (H x W, 0..1) says how much."""
    a = amount[..., None]
    return canvas * (1.0 - a) + np.asarray(colour, dtype=np.float32) * a


def _amount(layer: Image.Image) -> np.ndarray:
    return np.asarray(layer, dtype=np.float32) / 255.0


# --- styles ---------------------------------------------------------------------------------------


def _render_plain(scene: Scene, side: int) -> np.ndarray:
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for shape in scene.shapes:
        canvas = _paint(canvas, COLOURS[shape.colour], _amount(_mask(_outline(shape, side), side)))
    return canvas


_PAPER, _GRAPHITE = (243, 239, 229), (50, 50, 56)
_SKETCH_BACKGROUND = {  # background -> (paper tint, hatch layers as (angle, darkness))
    "white": ((246, 245, 241), ()),
    "beige": ((238, 226, 202), ((35.0, 70),)),
    "grey": (_PAPER, ((35.0, 120),)),
    "black": (_PAPER, ((35.0, 190), (-55.0, 170))),
}


def _render_sketch(scene: Scene, side: int) -> np.ndarray:
    rng = random.Random(scene.texture_seed)
    paper, background_hatches = _SKETCH_BACKGROUND[scene.background]
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = paper
    ink = Image.new("L", (side, side), 0)
    stroke = max(1, round(side / 300))
    for degrees, darkness in background_hatches:
        ink = ImageChops.lighter(ink, _hatch(side, side / 26, degrees, darkness, stroke, rng))
    for index, shape in enumerate(scene.shapes):
        points = _outline(shape, side)
        mask = _mask(points, side)
        ink = ImageChops.multiply(ink, ImageChops.invert(mask))  # the shape is blank paper again
        canvas = _paint(canvas, _PAPER, _amount(mask))
        canvas = _paint(canvas, COLOURS[shape.colour], _amount(mask) * 0.22)  # faint wash
        # darker colours get denser, cross-hatched shading, like shading a value with a pencil
        luminance = sum(w * c for w, c in zip((0.3, 0.59, 0.11), COLOURS[shape.colour], strict=True)) / 255
        angles = (-50.0 if index == 0 else 60.0,) + ((40.0,) if luminance < 0.5 else ())
        for degrees in angles:
            hatch = _hatch(side, side / (30 if luminance < 0.5 else 22), degrees, 150, stroke, rng)
            ink = ImageChops.lighter(ink, ImageChops.multiply(hatch, mask))
        for _ in range(2):  # two loose passes, like a quick pencil outline
            jitter = side * 0.007
            loose = [(x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)) for x, y in points]
            outline = Image.new("L", (side, side), 0)
            ImageDraw.Draw(outline).line(loose + loose[:1], fill=230, width=max(2, round(side / 110)), joint="curve")
            ink = ImageChops.lighter(ink, outline)
    return _paint(canvas, _GRAPHITE, _amount(ink))


_PASTEL_BACKGROUND = {
    "white": (252, 248, 240),
    "beige": (246, 233, 214),
    "grey": (222, 220, 230),
    "black": (112, 106, 132),  # "black" in pastel is a soft dusk, never true black
}


def _render_pastel(scene: Scene, side: int) -> np.ndarray:
    base = np.asarray(_PASTEL_BACKGROUND[scene.background], dtype=np.float32)
    ramp = np.linspace(10.0, -8.0, side, dtype=np.float32)[:, None, None]  # soft top-to-bottom light
    canvas = np.clip(np.broadcast_to(base, (side, side, 3)) + ramp, 0, 255)
    for shape in scene.shapes:
        points = _outline(shape, side)
        sharp = _mask(points, side)
        rounded = sharp.filter(ImageFilter.GaussianBlur(side * 0.03)).point(lambda v: 255 if v > 110 else 0)
        soft = rounded.filter(ImageFilter.GaussianBlur(side * 0.008))
        shadow = _mask(_shifted(points, side * 0.015, side * 0.02), side)
        shadow = shadow.filter(ImageFilter.GaussianBlur(side * 0.03))
        canvas = _paint(canvas, (90, 80, 110), _amount(shadow) * 0.12)
        canvas = _paint(canvas, _mix(COLOURS[shape.colour], (255, 255, 255), 0.55), _amount(soft))
    return canvas


_HALFTONE_BACKGROUND = {  # background -> (base, dot colour)
    "white": ((250, 248, 240), (205, 205, 200)),
    "beige": ((236, 216, 176), (196, 160, 112)),
    "grey": (((165, 165, 165)), (105, 105, 105)),
    "black": ((22, 22, 22), (80, 80, 80)),
}


def _render_halftone(scene: Scene, side: int) -> np.ndarray:
    cell = side / 20
    base, dot = _HALFTONE_BACKGROUND[scene.background]
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = base
    canvas = _paint(canvas, dot, _dots(side, cell, 0.22))
    y = np.mgrid[0:side, 0:side][0].astype(np.float32) / side
    for index, shape in enumerate(scene.shapes):
        points = _outline(shape, side)
        mask = _amount(_mask(points, side))
        shadow = _amount(_mask(_shifted(points, side * 0.03, side * 0.03), side))
        canvas = _paint(canvas, (0, 0, 0), shadow)  # hard offset shadow, comic-print style
        colour = COLOURS[shape.colour]
        canvas = _paint(canvas, _mix(colour, (255, 255, 255), 0.8), mask)
        if index % 2 == 0:  # dots that grow toward the bottom, as if shaded
            pattern = _dots(side, cell * 0.8, 0.22 + 0.3 * y)
        else:
            pattern = _stripes(side, cell * 0.8)
        canvas = _paint(canvas, colour, mask * pattern)
        border = Image.new("L", (side, side), 0)
        ImageDraw.Draw(border).line(points + points[:1], fill=255, width=max(2, round(side / 34)), joint="curve")
        canvas = _paint(canvas, (10, 10, 10), _amount(border))
    return canvas


_RENDERERS = {"plain": _render_plain, "sketch": _render_sketch, "pastel": _render_pastel, "halftone": _render_halftone}


def render(style: str, scene: Scene, size: int) -> Image.Image:
    """Draw scene in style as a size x size RGB image; the same inputs always give the same pixels."""
    if style not in _RENDERERS:
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    side = size * _SUPERSAMPLE
    pixels = np.clip(np.rint(_RENDERERS[style](scene, side)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.LANCZOS)


MIXES = (("sketch", "pastel"), ("sketch", "halftone"), ("pastel", "halftone"))  # pairs a checker learns to read


def ink_mix(images: list[Image.Image]) -> Image.Image:
    """Renders of one scene printed on the same paper (multiply): every style's marks stay at full contrast,
    e.g. sketch's pencil lines over halftone's dots, as a model draws them when two style LoRAs are mixed.
    (A 50/50 pixel average halves every mark instead, which no mixed model draws.)"""
    out = np.ones_like(np.asarray(images[0], dtype=np.float32))
    for im in images:
        out *= np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(np.rint(out * 255.0).astype(np.uint8), "RGB")


def split_mix(shapes: Image.Image, background: Image.Image, scene: Scene) -> Image.Image:
    """The scene's objects as drawn in one style (with a margin for outlines and shadows) over the
    background of another: both styles really drawn, each at full strength, where multiply would hide one."""
    size = shapes.size[0]
    side = size * _SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    for shape in scene.shapes:
        mask = ImageChops.lighter(mask, _mask(_outline(shape, side), side))
    mask = mask.resize((size, size), Image.Resampling.BILINEAR).filter(ImageFilter.MaxFilter(2 * round(size * 0.02) + 1))
    return Image.composite(shapes.convert("RGB"), background.convert("RGB"), mask)


# --- held-out evaluation prompts ------------------------------------------------------------------

EVAL_SEED = 12345


def single_scene(colour: str, kind: str, size: str, placement: str, background: str) -> Scene:
    x, y = PLACEMENTS[placement]
    return Scene((Shape(kind, colour, size, x, y, 0.0),), background, placement, 0)


def eval_scenes(n: int = 200) -> list[Scene]:
    """Single-object scenes whose exact combination the tiny base never saw in training."""
    combos = [
        (c, k, s, p, b)
        for c in sorted(COLOURS) for k in SHAPES for s in sorted(SIZES) for p in sorted(PLACEMENTS) for b in sorted(BACKGROUNDS)
    ]
    return [single_scene(*combo) for combo in random.Random(EVAL_SEED).sample(combos, 200)[:n]]


def is_held_out(scene: Scene) -> bool:
    if len(scene.shapes) != 1:
        return False
    s = scene.shapes[0]
    return (s.colour, s.kind, s.size, scene.layout, scene.background) in _HELD_OUT


_HELD_OUT = {(s.shapes[0].colour, s.shapes[0].kind, s.shapes[0].size, s.layout, s.background) for s in eval_scenes()}
