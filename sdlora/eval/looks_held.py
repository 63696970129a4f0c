"""The renderers of the held-out looks that world.py does not draw (see sdlora/eval/looks.py): looks the tiny
base never sees, so a style LoRA that draws them has learned something new. Same conventions as looks_draw.py.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from sdlora.eval.looks_draw import (
    BLACK,
    WHITE,
    _blur,
    _canvas,
    _contrast,
    _grid,
    _noise,
    _px,
    _ring,
    _rng,
    _scaled,
    _shapes,
)
from sdlora.eval.world import BACKGROUNDS, Scene, _amount, _mask, _mix, _paint, _shifted


def neon(scene: Scene, side: int) -> np.ndarray:
    """Neon signs: each outline a glowing tube with a white-hot core, on a wall darkened nearly to black."""
    bg = BACKGROUNDS[scene.background]
    canvas = _canvas(_mix(bg, BLACK, 0.78), side)
    for _, points, mask, colour in _shapes(scene, side):
        tube = _ring(points, side, _px(side, 3))
        glow = np.clip(_blur(tube, side * 0.035) * 2.2, 0, 1)
        canvas = _paint(canvas, colour, np.maximum(glow * 0.9, mask * 0.22))
        canvas = _paint(canvas, colour, tube)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.55), _ring(points, side, _px(side, 1.2)) * 0.9)
    return canvas


def stained_glass(scene: Scene, side: int) -> np.ndarray:
    """Stained glass: the picture cut into irregular panes of varied tone, held by thick black leading."""
    rng, bg = _rng(scene, "stained-glass"), BACKGROUNDS[scene.background]
    half = side // 2
    grid, cell = 9, half / 9
    y, x = _grid(half)
    cy, cx = np.minimum(y // cell, grid - 1).astype(int), np.minimum(x // cell, grid - 1).astype(int)
    seeds = rng.uniform(0.15, 0.85, (grid, grid, 2))
    best, pane = np.full(y.shape, np.inf, np.float32), np.zeros(y.shape, int)
    for dy in (-1, 0, 1):  # jittered-grid Voronoi: a pixel's nearest seed is in its cell or a neighbour
        for dx in (-1, 0, 1):
            ny, nx = np.clip(cy + dy, 0, grid - 1), np.clip(cx + dx, 0, grid - 1)
            d = (x - (nx + seeds[ny, nx, 0]) * cell) ** 2 + (y - (ny + seeds[ny, nx, 1]) * cell) ** 2
            closer = d < best
            best, pane = np.where(closer, d, best), np.where(closer, ny * grid + nx, pane)
    pane = pane.repeat(2, 0).repeat(2, 1)
    if pane.shape[0] != side:
        pane = np.pad(pane, ((0, side - pane.shape[0]), (0, side - pane.shape[1])), mode="edge")
    shapes = _shapes(scene, side)
    owner = np.zeros((side, side), int)
    for index, (_, _, mask, _) in enumerate(shapes):
        owner[mask > 0.5] = index + 1
    region = pane * (len(shapes) + 1) + owner
    glass = _mix(bg, WHITE, 0.2) if bg == BACKGROUNDS["black"] else bg  # dark glass, but lighter than its lead
    bases = [glass] + [colour for *_, colour in shapes]
    tones = rng.uniform(-1, 1, region.max() + 1)
    palette = np.asarray([_mix(bases[r % len(bases)], WHITE if t > 0 else BLACK, 0.3 * abs(t))
                          for r, t in enumerate(tones)], np.float32)
    canvas = palette[region] * (0.92 + 0.12 * _noise(rng, side, 20))[..., None]
    edge = (region != np.roll(region, 1, 0)) | (region != np.roll(region, 1, 1))
    edge[0, :] = edge[:, 0] = False
    width = 2 * _px(side, 1.2) + 1
    lead = Image.fromarray(edge.astype(np.uint8) * 255, "L").filter(ImageFilter.MaxFilter(width))
    canvas = _paint(canvas, (28, 26, 24), _amount(lead))
    for _, points, _, _ in shapes:
        canvas = _paint(canvas, (28, 26, 24), _ring(points, side, _px(side, 3)))
    return canvas


_SLATE = (30, 40, 36)


def chalk(scene: Scene, side: int) -> np.ndarray:
    """Chalk on a blackboard: grainy, broken strokes of bright chalk colour over a dusty dark slate."""
    rng, bg = _rng(scene, "chalk"), BACKGROUNDS[scene.background]
    board = _canvas(_mix(bg, _SLATE, 0.72), side)
    canvas = board + ((_noise(rng, side, 5) - 0.5) * 26 + (_noise(rng, side, side // 3) - 0.5) * 14)[..., None]
    for _, points, mask, colour in _shapes(scene, side):
        grain = 0.6 * _noise(rng, side, side // 4) + 0.4 * _noise(rng, side, side // 16, side // 48)
        cover = np.clip((grain - 0.28) * 4.5, 0, 1)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.2), mask * cover * 0.92)
        edge = _ring(points, side, _px(side, 2.5)) * np.clip((_noise(rng, side, side // 4) - 0.2) * 4, 0, 1)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.45), edge)
    return canvas


def _torn(points: list[tuple[float, float]], side: int, rng: np.random.Generator, grow: float) -> list[tuple[float, float]]:
    """The outline resampled densely with a small random jag, pushed out from the centre by `grow`."""
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        steps = max(2, int(math.hypot(x1 - x0, y1 - y0) / (side * 0.012)))
        out += [(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps) for i in range(steps)]
    cx, cy = sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)
    jag = rng.uniform(-1, 1, len(out)) * side * 0.005
    result = []
    for (x, y), j in zip(out, jag.tolist()):
        d = math.hypot(x - cx, y - cy) or 1.0
        result.append((x + (x - cx) / d * (grow + j), y + (y - cy) / d * (grow + j)))
    return result


def collage(scene: Scene, side: int) -> np.ndarray:
    """Torn-paper collage: each shape torn from coloured paper, its white paper core showing as a ragged
    rim, with an inner torn layer and a drop shadow, on a fibrous backing sheet."""
    rng, bg = _rng(scene, "collage"), BACKGROUNDS[scene.background]
    fibre = 0.5 * _noise(rng, side, side // 3, side // 12) + 0.5 * _noise(rng, side, side // 12, side // 3)
    canvas = _canvas(bg, side) + ((fibre - 0.5) * 44)[..., None]
    for _, points, _, colour in _shapes(scene, side):
        rim = _torn(points, side, rng, side * 0.012)
        shadow = _blur(_amount(_mask(_shifted(rim, side * 0.018, side * 0.026), side)), side * 0.012)
        canvas = _paint(canvas, BLACK, shadow * 0.45)
        canvas = _paint(canvas, (250, 250, 246), _amount(_mask(rim, side)))
        canvas = _paint(canvas, colour, _amount(_mask(_torn(points, side, rng, -side * 0.004), side)))
        inner = _torn(_scaled(points, 0.55), side, rng, 0.0)
        canvas = _paint(canvas, BLACK, _blur(_amount(_mask(_shifted(inner, side * 0.01, side * 0.014), side)), side * 0.008) * 0.3)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.38), _amount(_mask(inner, side)))
    return canvas


def embroidery(scene: Scene, side: int) -> np.ndarray:
    """Cross-stitch embroidery: every cell the shape covers holds one X of thread, each stitch fat in the middle
    and thin where it dives into the fabric, on an even-weave cloth of the background colour with its holes."""
    bg = BACKGROUNDS[scene.background]
    cells = 26
    cell = side / cells
    y, x = _grid(side)
    u, v = (x / cell) % 1.0 - 0.5, (y / cell) % 1.0 - 0.5  # from the cell's centre
    canvas = _paint(_canvas(bg, side), _contrast(bg, 0.12), ((np.abs(u) > 0.42) | (np.abs(v) > 0.42)) * 0.7)
    canvas = _paint(canvas, _contrast(bg, 0.35), (np.hypot(np.abs(u) - 0.5, np.abs(v) - 0.5) < 0.13) * 1.0)
    along_a, across_a = np.abs(u + v) / math.sqrt(2), np.abs(u - v) / math.sqrt(2)
    # half width 0.26 cells at the crossing (3 output pixels wide at 128 px), 0.07 at the holes
    under = np.clip((0.26 - 0.27 * along_a - across_a) * 14 + 0.5, 0, 1)
    over = np.clip((0.26 - 0.27 * across_a - along_a) * 14 + 0.5, 0, 1)
    ci, cj = np.minimum(y // cell, cells - 1).astype(int), np.minimum(x // cell, cells - 1).astype(int)
    for _, _, mask, colour in _shapes(scene, side):
        cover = Image.fromarray(np.rint(mask * 255).astype(np.uint8), "L").resize((cells, cells), Image.Resampling.BOX)
        stitched = (np.asarray(cover) >= 128)[ci, cj].astype(np.float32)  # a cell is stitched when half covered
        canvas = _paint(canvas, _mix(colour, BLACK, 0.22), stitched * under)
        canvas = _paint(canvas, colour, stitched * over)
        canvas = _paint(canvas, _mix(colour, WHITE, 0.3), stitched * over * (across_a < 0.05))  # the thread's sheen
    return canvas
