"""The renderers of the training looks (sdlora/eval/looks.py), each `(scene, side) -> float H x W x 3` like
world's `_render_*`. They run at 2x supersampling (world's styles use 4x), so `side` is twice the output size:
widths below are given in output pixels at 128 px through `_px`, and every coloured line is at least 2 of them.
Texture randomness comes from `scene.texture_seed`, salted by the look, so a render is reproducible.
"""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from sdlora.eval.world import (
    BACKGROUNDS,
    COLOURS,
    SIZES,
    Scene,
    Shape,
    _amount,
    _hatch,
    _mask,
    _mix,
    _outline,
    _paint,
    _render_plain,
    _shifted,
)

WHITE, BLACK, INK = (255, 255, 255), (0, 0, 0), (22, 20, 18)
Colour = tuple[int, int, int]


# --- shared helpers -------------------------------------------------------------------------------


def _px(side: int, pixels: float) -> int:
    """A width of `pixels` output pixels at 128 px, in pixels of this (supersampled) canvas."""
    return max(1, round(pixels * side / 128))


def _rng(scene: Scene, salt: str) -> np.random.Generator:
    return np.random.default_rng([scene.texture_seed, zlib.crc32(salt.encode())])


def _pyrng(scene: Scene, salt: str) -> random.Random:
    return random.Random(f"{scene.texture_seed}:{salt}")  # str seeds hash by sha512: stable across runs


def _canvas(colour: Colour, side: int) -> np.ndarray:
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = colour
    return canvas


def _shapes(scene: Scene, side: int) -> list[tuple[Shape, list[tuple[float, float]], np.ndarray, Colour]]:
    out = []
    for shape in scene.shapes:
        points = _outline(shape, side)
        out.append((shape, points, _amount(_mask(points, side)), COLOURS[shape.colour]))
    return out


def _luma(colour: Colour) -> float:
    return (0.3 * colour[0] + 0.59 * colour[1] + 0.11 * colour[2]) / 255


def _contrast(colour: Colour, t: float) -> Colour:
    """colour moved by t toward black when it is light, toward white when it is dark."""
    return _mix(colour, BLACK if _luma(colour) > 0.35 else WHITE, t)


def _noise(rng: np.random.Generator, side: int, cells: int, cells_x: int | None = None) -> np.ndarray:
    """Smooth value noise in 0..1: a cells x cells_x random grid, bicubically enlarged to side x side."""
    low = rng.random((cells, cells_x or cells), dtype=np.float32)
    big = Image.fromarray(low, "F").resize((side, side), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big), 0.0, 1.0)


def _blur(amount: np.ndarray, radius: float) -> np.ndarray:
    layer = Image.fromarray(np.rint(amount * 255).astype(np.uint8), "L")
    return _amount(layer.filter(ImageFilter.GaussianBlur(radius)))


def _ring(points: list[tuple[float, float]], side: int, width: int) -> np.ndarray:
    """The closed outline of points as an amount layer, width pixels wide."""
    layer = Image.new("L", (side, side), 0)
    ImageDraw.Draw(layer).line(points + points[:1], fill=255, width=width, joint="curve")
    return _amount(layer)


def _scaled(points: list[tuple[float, float]], factor: float) -> list[tuple[float, float]]:
    cx, cy = sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)
    return [(cx + (x - cx) * factor, cy + (y - cy) * factor) for x, y in points]


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    return y, x


def _hatches(side: int, spacing: float, angles: tuple[float, ...], width: int, rng: random.Random) -> np.ndarray:
    ink = Image.new("L", (side, side), 0)
    for degrees in angles:
        ink = ImageChops.lighter(ink, _hatch(side, spacing, degrees, 255, width, rng))
    return _amount(ink)


# --- the training looks ---------------------------------------------------------------------------


def hatching(scene: Scene, side: int) -> np.ndarray:
    """Parallel strokes of full colour over a pale tint; the background faintly hatched the same way."""
    rng, bg = _pyrng(scene, "hatching"), BACKGROUNDS[scene.background]
    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.2), _hatches(side, side / 18, (62.0,), _px(side, 2), rng))
    for _, _, mask, colour in _shapes(scene, side):
        canvas = _paint(canvas, _mix(colour, WHITE, 0.62), mask)
        canvas = _paint(canvas, colour, mask * _hatches(side, side / 26, (62.0,), _px(side, 2.2), rng))
    return canvas


def crosshatch(scene: Scene, side: int) -> np.ndarray:
    """Two crossing sets of dark-toned strokes in and around each shape, and a dark pen outline."""
    rng, bg = _pyrng(scene, "crosshatch"), BACKGROUNDS[scene.background]
    ink = _hatches(side, side / 16, (45.0, -45.0), _px(side, 2), rng)
    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.3), ink)
    for _, points, mask, colour in _shapes(scene, side):
        canvas = _paint(canvas, _mix(colour, WHITE, 0.7), mask)
        ink = _hatches(side, side / 22, (30.0, -60.0), _px(side, 2), rng)
        canvas = _paint(canvas, _mix(colour, BLACK, 0.25), mask * ink)
        canvas = _paint(canvas, _mix(colour, BLACK, 0.5), _ring(points, side, _px(side, 2)))
    return canvas


def _stipple(rng: np.random.Generator, side: int, box: tuple[float, float, float, float], coverage: float) -> np.ndarray:
    """Random round dots (about 3 output pixels across) scattered over box until they cover `coverage` of it."""
    r = side / 90
    x0, y0, x1, y1 = box
    n = round(-math.log(1 - coverage) * (x1 - x0) * (y1 - y0) / (math.pi * r * r))
    layer = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(layer)
    for x, y in zip(rng.uniform(x0, x1, n).tolist(), rng.uniform(y0, y1, n).tolist()):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return _amount(layer)


def stippling(scene: Scene, side: int) -> np.ndarray:
    """Shapes built from random dots of colour on a pale tint; a sparse dust of dots on the background."""
    rng, bg = _rng(scene, "stippling"), BACKGROUNDS[scene.background]
    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.35), _stipple(rng, side, (0, 0, side, side), 0.1))
    for _, points, mask, colour in _shapes(scene, side):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        canvas = _paint(canvas, _mix(colour, WHITE, 0.75), mask)
        canvas = _paint(canvas, colour, mask * _stipple(rng, side, (min(xs), min(ys), max(xs), max(ys)), 0.55))
    return canvas


def stripes(scene: Scene, side: int) -> np.ndarray:
    """Bold horizontal bands of colour and pale tint inside each shape, crisp and flat, over wide faint bands."""
    rng, bg = _rng(scene, "stripes"), BACKGROUNDS[scene.background]
    y = np.arange(side, dtype=np.float32)[:, None]
    wide = np.broadcast_to(((y / (side / 5)) % 1.0 < 0.5).astype(np.float32), (side, side))
    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.1), wide)
    for _, _, mask, colour in _shapes(scene, side):
        band = (((y / (side / 11)) + rng.random()) % 1.0 < 0.55).astype(np.float32)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.6), mask)
        canvas = _paint(canvas, colour, mask * band)
    return canvas


def checker(scene: Scene, side: int) -> np.ndarray:
    """Checkerboard fills: shapes in colour and tint squares, the background in a faint large checker."""
    bg = BACKGROUNDS[scene.background]
    y, x = _grid(side)

    def board(cell: float) -> np.ndarray:
        return ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)

    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.12), board(side / 8))
    squares = board(side / 18)
    for _, _, mask, colour in _shapes(scene, side):
        canvas = _paint(canvas, _mix(colour, WHITE, 0.55), mask)
        canvas = _paint(canvas, colour, mask * squares)
    return canvas


def gradient(scene: Scene, side: int) -> np.ndarray:
    """Smooth colour ramps: each shape from a light tint at its top-left through full colour to a deep shade
    at its bottom-right; the background shaded across from left to right."""
    bg = BACKGROUNDS[scene.background]
    y, x = _grid(side)
    canvas = _canvas(bg, side) + (45.0 - 90.0 * x / side)[..., None]
    for _, points, mask, colour in _shapes(scene, side):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        t = np.clip((x - min(xs) + y - min(ys)) / (max(xs) - min(xs) + max(ys) - min(ys)), 0, 1)[..., None]
        light, mid, deep = (np.asarray(c, np.float32) for c in (_mix(colour, WHITE, 0.6), colour, _mix(colour, BLACK, 0.35)))
        ramp = np.where(t < 0.5, light + (mid - light) * (2 * t), mid + (deep - mid) * (2 * t - 1))
        canvas = canvas * (1 - mask[..., None]) + ramp * mask[..., None]
    return canvas


def posterise(scene: Scene, side: int) -> np.ndarray:
    """Cel shading in three hard tone bands (light from the top-left) with a dark outline; the background in
    three flat concentric bands."""
    bg = BACKGROUNDS[scene.background]
    y, x = _grid(side)
    ring = np.hypot(x - side / 2, y - side / 2) / (side / 2)
    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.1), (ring > 0.55).astype(np.float32))
    canvas = _paint(canvas, _contrast(bg, 0.2), (ring > 0.95).astype(np.float32))
    for shape, points, mask, colour in _shapes(scene, side):
        r = SIZES[shape.size] * side
        d = np.hypot(x - shape.x * side + 0.45 * r, y - shape.y * side + 0.45 * r) / r
        canvas = _paint(canvas, _mix(colour, BLACK, 0.35), mask)
        canvas = _paint(canvas, colour, mask * (d < 1.25))
        canvas = _paint(canvas, _mix(colour, WHITE, 0.5), mask * (d < 0.55))
        canvas = _paint(canvas, _mix(colour, BLACK, 0.65), _ring(points, side, _px(side, 2)))
    return canvas


def pixel(scene: Scene, side: int) -> np.ndarray:
    """Pixel art on a 28 x 28 grid of hard-edged blocks: each block the colour of what covers most of it, every
    shape ringed by one block of its dark shade, the background in stepped bands from light to dark."""
    cells, bg = 28, BACKGROUNDS[scene.background]
    canvas = _canvas(bg, cells)
    steps = np.floor(np.arange(cells) / cells * 4)[:, None, None]  # four bands of seven rows
    canvas = _paint(canvas, _contrast(bg, 0.3), np.broadcast_to(steps / 3 * 0.5, (cells, cells, 1))[..., 0])
    for _, _, mask, colour in _shapes(scene, cells * 4):
        cover = mask.reshape(cells, 4, cells, 4).mean(axis=(1, 3)) >= 0.5
        ring = np.zeros_like(cover)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ring |= np.roll(cover, (dy, dx), (0, 1))
        canvas[ring & ~cover] = _mix(colour, BLACK, 0.5)
        canvas[cover] = colour
    blocks = Image.fromarray(canvas.astype(np.uint8), "RGB").resize((side, side), Image.Resampling.NEAREST)
    return np.asarray(blocks, dtype=np.float32)


def softfocus(scene: Scene, side: int) -> np.ndarray:
    """Out of focus: the flat scene under a strong blur with a little bloom, full colour, no hard edge left."""
    plain = Image.fromarray(np.rint(_render_plain(scene, side)).astype(np.uint8), "RGB")
    near = np.asarray(plain.filter(ImageFilter.GaussianBlur(side * 0.02)), dtype=np.float32)
    far = np.asarray(plain.filter(ImageFilter.GaussianBlur(side * 0.06)), dtype=np.float32)
    return 0.72 * near + 0.28 * np.maximum(near, far) + 6.0


_PAPER = (248, 246, 240)


def watercolour(scene: Scene, side: int) -> np.ndarray:
    """Wet washes on white paper: wobbly soft-edged colour with uneven pigment, darker where it dried at the rim."""
    rng, bg = _rng(scene, "watercolour"), BACKGROUNDS[scene.background]
    canvas = _paint(_canvas(_PAPER, side), bg, 0.5 + 0.25 * _noise(rng, side, 5))
    for _, _, mask, colour in _shapes(scene, side):
        wobble = _noise(rng, side, 12)
        wash = np.clip((_blur(mask, side * 0.02) + 0.35 * (wobble - 0.5) - 0.5) * 6 + 0.5, 0, 1)
        inner = np.clip((_blur(wash, side * 0.012) - 0.72) * 5, 0, 1)
        canvas = _paint(canvas, _PAPER, wash)
        canvas = _paint(canvas, colour, wash * (0.55 + 0.3 * _noise(rng, side, 9)))
        canvas = _paint(canvas, _mix(colour, BLACK, 0.2), wash * (1 - inner) * 0.6)
    return canvas * (0.93 + 0.07 * _noise(rng, side, side // 3))[..., None]


def grainy(scene: Scene, side: int) -> np.ndarray:
    """Flat shapes on coarse grain: strong neutral speckle over everything, like rough paper or fast film."""
    rng = _rng(scene, "grainy")
    grain = 0.7 * _noise(rng, side, side // 4) + 0.3 * _noise(rng, side, side // 12)
    return _render_plain(scene, side) + (grain[..., None] - 0.5) * 110.0


def woodcut(scene: Scene, side: int) -> np.ndarray:
    """A woodcut: thick black outlines, carved contour rings inside each shape, wavy gouged wood grain behind."""
    rng, bg = _rng(scene, "woodcut"), BACKGROUNDS[scene.background]
    y, x = _grid(side)
    wave = y + side * 0.012 * np.sin(2 * math.pi * x / (side * 0.4) + rng.uniform(0, 6.3))
    grain = ((wave / (side / 13) + rng.random()) % 1.0 < 0.2).astype(np.float32)
    canvas = _paint(_canvas(bg, side), INK if _luma(bg) > 0.35 else _mix(bg, WHITE, 0.55), grain * 0.85)
    for _, points, mask, colour in _shapes(scene, side):
        canvas = _paint(canvas, colour, mask)
        for factor in (0.7, 0.4):
            canvas = _paint(canvas, INK, _ring(_scaled(points, factor), side, _px(side, 2)))
        canvas = _paint(canvas, INK, _ring(points, side, _px(side, 4)))
    return canvas


def emboss(scene: Scene, side: int) -> np.ndarray:
    """Raised relief: each shape bevelled, lit along its top-left edge and dark along its bottom-right, on a soft
    shadow, over a background embossed like plaster."""
    rng, bg = _rng(scene, "relief"), BACKGROUNDS[scene.background]
    d, bumps = side / 38, _noise(rng, side, 22)
    lit = np.clip((bumps - np.roll(bumps, (round(d), round(d)), (0, 1))) * 5, -1, 1)  # the background as embossed plaster
    canvas = _paint(_paint(_canvas(bg, side), WHITE, np.clip(lit, 0, 1) * 0.28), BLACK, np.clip(-lit, 0, 1) * 0.24)
    for _, points, mask, colour in _shapes(scene, side):
        canvas = _paint(canvas, BLACK, _blur(_amount(_mask(_shifted(points, d, d), side)), side * 0.02) * 0.3)
        canvas = _paint(canvas, colour, mask)
        lower = mask * (1 - _amount(_mask(_shifted(points, -d, -d), side)))
        upper = mask * (1 - _amount(_mask(_shifted(points, d, d), side)))
        canvas = _paint(canvas, _mix(colour, BLACK, 0.45), lower)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.55), upper)
    return canvas


def _streaks(rng: np.random.Generator, side: int, degrees: float) -> np.ndarray:
    """Waxy coverage 0..1 in long streaks along `degrees`, with fine grain where the paper shows through."""
    big = side * 3 // 2
    streak = Image.fromarray(rng.random((big // 3, 8), dtype=np.float32), "F").resize((big, big), Image.Resampling.BICUBIC)
    streak = streak.rotate(degrees, Image.Resampling.BILINEAR).crop(((big - side) // 2, (big - side) // 2,
                                                                      (big + side) // 2, (big + side) // 2))
    texture = 0.65 * np.asarray(streak) + 0.35 * _noise(rng, side, side // 3)
    return np.clip((texture - 0.3) * 4.0, 0, 1)


_NEWSPRINT = (224, 220, 208)  # greyer than the background colours, so even white crayon shows its streaks


def crayon(scene: Scene, side: int) -> np.ndarray:
    """Wax crayon on grey newsprint: streaky, gappy diagonal strokes of colour, background scribbled in too."""
    rng, bg = _rng(scene, "crayon"), BACKGROUNDS[scene.background]
    canvas = _paint(_canvas(_NEWSPRINT, side), bg, _streaks(rng, side, 25.0) * 0.9)
    for _, points, mask, colour in _shapes(scene, side):
        canvas = _paint(canvas, _NEWSPRINT, mask)
        canvas = _paint(canvas, colour, mask * _streaks(rng, side, -35.0))
        canvas = _paint(canvas, _mix(colour, BLACK, 0.2), _ring(points, side, _px(side, 2.5)) * _streaks(rng, side, 60.0))
    return canvas
