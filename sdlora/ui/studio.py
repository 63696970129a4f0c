"""Mix & generate for the page: one base, loaded once, with a LoraMixer whose strengths change in place.

Each request names the whole mix; the studio loads files not yet attached, removes those dropped and moves the
others' strengths and block vectors with `set_strength`/`set_blocks` (no reload; CUDA graphs stay valid).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdlora.errors import SdloraError
from sdlora.lora.blocks import format_block_weights, parse_block_weights
from sdlora.ui.paths import relative, under_root

MAX_GRID_CELLS = 36


@dataclass
class MixEntry:
    path: str  # relative to the root
    strength: float = 1.0
    te_strength: float | None = None
    lbw: str | None = None  # preset name or comma-separated vector


@dataclass
class Settings:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    scheduler: str = "dpm++"


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Studio:
    def __init__(self, root: Path, base_name: str, device: str | None, precision: str | None,
                 busy: Callable[[], str | None]):
        self.root = root
        self.base_name = base_name
        self.device = device
        self.precision = precision
        self.busy = busy  # a message while the device is taken (training), else None
        self.lock = threading.Lock()
        self.base = None
        self.mixer = None
        self.attached: dict[str, str] = {}  # relative path -> adapter name in the mixer
        self.warnings: list[str] = []
        self.last: dict | None = None  # the last result, for a reloaded page

    def _load(self) -> None:
        if self.base is not None:
            return
        import torch

        from sdlora.lora.mixer import LoraMixer
        from sdlora.models.base import load_base

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        precision = self.precision or ("fp16" if device.startswith("cuda") else "fp32")
        self.base = load_base(self.base_name, precision, device)
        self.mixer = LoraMixer(self.base, warn=self.warnings.append)

    def _sync(self, mix: list[MixEntry]) -> list[str]:
        """Make the mixer hold exactly `mix`; returns the files newly loaded (the only ones read from disk)."""
        paths = [m.path for m in mix]
        if len(set(paths)) != len(paths):
            raise SdloraError("a file is in the mix twice; change its strength instead")
        wanted = {m.path: (m, parse_block_weights(m.lbw) if m.lbw else None) for m in mix}
        for path in [p for p in self.attached if p not in wanted]:
            self.mixer.remove(self.attached.pop(path))
        loaded, changes = [], {}
        for path, (m, blocks) in wanted.items():
            name = self.attached.get(path)
            if name is None:
                file = under_root(self.root, path, "LoRA file", kind="file", suffixes=(".safetensors",))
                self.attached[path] = self.mixer.load(file, m.strength, m.te_strength, blocks=blocks)
                loaded.append(path)
                continue
            strength, te_strength, current = self.mixer.settings[name]
            if current != blocks:
                self.mixer.set_blocks(name, blocks)
            if (strength, te_strength) != (m.strength, m.te_strength):
                changes[name] = (m.strength, m.te_strength)
        if changes:
            self.mixer.set_strengths(changes)  # one recompute of the merged weights for every changed LoRA
        return loaded

    def _applied(self) -> list[dict]:
        out = []
        for path, name in self.attached.items():
            s, te, blocks = self.mixer.settings[name]
            out.append({"path": path, "strength": s, "te_strength": te,
                        "lbw": format_block_weights(blocks) if blocks else None})
        return out

    def _render(self, settings: Settings):
        from sdlora.sample.generate import generate_images

        return generate_images(self.base, settings.prompt, settings.negative, settings.seed, settings.steps,
                               settings.guidance, settings.width, settings.height, 1, settings.scheduler)[0]

    def _waiting(self) -> dict | None:
        message = self.busy()
        return {"waiting": True, "message": message} if message else None

    def generate(self, mix: list[MixEntry], settings: Settings) -> dict:
        """One image with the mix; `waiting` instead while a training job holds the device."""
        if (waiting := self._waiting()) is not None:
            return waiting
        with self.lock:
            self._load()
            self.warnings.clear()
            t0 = time.perf_counter()
            loaded = self._sync(mix)
            t1 = time.perf_counter()
            image = self._render(settings)
            t2 = time.perf_counter()
            self.last = {
                "image": png_data_url(image), "applied": self._applied(), "loaded": loaded,
                "warnings": list(self.warnings), "mix_ms": round((t1 - t0) * 1000, 1),
                "generate_ms": round((t2 - t1) * 1000, 1), "settings": vars(settings),
                "base": self.base_name,
            }
            return self.last

    def grid(self, mix: list[MixEntry], settings: Settings, x: dict, y: dict | None) -> dict:
        """An x/y grid: each axis varies one mix entry's UNet strength, text-encoder strength or block vector."""
        if (waiting := self._waiting()) is not None:
            return waiting
        xs, ys = _axis_values(x, mix), _axis_values(y, mix) if y else [None]
        if len(xs) * len(ys) > MAX_GRID_CELLS:
            raise SdloraError(f"the grid has {len(xs) * len(ys)} cells; at most {MAX_GRID_CELLS}")
        with self.lock:
            self._load()
            self.warnings.clear()
            rows = []
            for yv in ys:
                row = []
                for xv in xs:
                    cell = _with(_with(mix, x, xv), y, yv) if y else _with(mix, x, xv)
                    self._sync(cell)
                    row.append(self._render(settings))
                rows.append(row)
            self._sync(mix)
            image = _grid_image(rows, [_label(x, v) for v in xs], [_label(y, v) for v in ys] if y else None)
            return {"image": png_data_url(image), "applied": self._applied(), "warnings": list(self.warnings),
                    "cells": len(xs) * len(ys)}


AXIS_KINDS = ("strength", "te", "lbw")


def _axis_values(axis: dict, mix: list[MixEntry]) -> list:
    kind, index, values = axis.get("kind"), axis.get("index", 0), axis.get("values") or []
    if kind not in AXIS_KINDS:
        raise SdloraError(f"grid axis kind must be one of {', '.join(AXIS_KINDS)}")
    if not isinstance(index, int) or not 0 <= index < len(mix):
        raise SdloraError("grid axis: pick a LoRA of the mix")
    if not values or not isinstance(values, list):
        raise SdloraError("grid axis: give at least one value")
    if kind == "lbw":
        for v in values:
            parse_block_weights(str(v))  # a bad vector fails before anything renders
        return [str(v) for v in values]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise SdloraError(f"grid axis: strengths must be numbers, not {values}") from None


def _with(mix: list[MixEntry], axis: dict, value) -> list[MixEntry]:
    out = [MixEntry(m.path, m.strength, m.te_strength, m.lbw) for m in mix]
    target = out[axis["index"]]
    if axis["kind"] == "strength":
        target.strength = value
    elif axis["kind"] == "te":
        target.te_strength = value
    else:
        target.lbw = value
    return out


def _label(axis: dict, value) -> str:
    if axis["kind"] == "lbw":
        return f"lbw {format_block_weights(parse_block_weights(value))}"
    return f"{'TE ' if axis['kind'] == 'te' else ''}{value:g}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _grid_image(rows: list[list[Image.Image]], col_labels: list[str], row_labels: list[str] | None) -> Image.Image:
    w, h = rows[0][0].size
    font = _font(max(11, w // 12))
    top, left = 28, (110 if row_labels else 0)
    grid = Image.new("RGB", (left + w * len(rows[0]), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels):
        draw.text((left + j * w + 4, 6), text[:24], fill="black", font=font)
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((4, top + i * h + h // 2 - 8), row_labels[i][:16], fill="black", font=font)
        for j, img in enumerate(row):
            grid.paste(img, (left + j * w, top + i * h))
    return grid


def library_thumbnail(root: Path, file: Path, metadata: dict[str, str]) -> str | None:
    """modelspec.thumbnail when the file has one, else the newest sample of the run the file came from."""
    thumb = metadata.get("modelspec.thumbnail")
    if thumb and thumb.startswith("data:image/"):
        return thumb
    samples = file.parent / "samples"
    if samples.is_dir():
        pngs = sorted(samples.glob("*.png"))
        if pngs:
            return "/api/image?path=" + relative(root, pngs[-1])
    return None
