"""`sdlora eval`: generate prompts at several LoRA strengths and measure what the LoRA does.

On the tiny base the world checker (sdlora/checker.py) scores each style and whether the main
object's colour and shape are as prompted. On any base, pixel statistics that need no judge are
reported too: how far images move from strength 0, saturation, brightness and edge density.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdlora.errors import SdloraError
from sdlora.eval.world import COLOURS, SHAPES, STYLES, caption, eval_scenes
from sdlora.formats.kohya import load_adapter
from sdlora.lora.mixer import LoraMixer
from sdlora.lora.specs import LoraSpec
from sdlora.models.base import BaseModel
from sdlora.sample.generate import GenerateOptions, generate, generate_images


@dataclass
class Prompt:
    text: str
    colour: str | None = None  # what the checker should see, when known
    shape: str | None = None


@dataclass
class EvalReport:
    strengths: list[float]
    prompts: list[str]
    styles: list[str]  # the styles the LoRAs are expected to show
    rows: list[dict] = field(default_factory=list)  # one per strength

    def to_json(self) -> str:
        return json.dumps({"strengths": self.strengths, "prompts": self.prompts, "styles": self.styles, "results": self.rows}, indent=2)


def builtin_prompts(n: int, trigger: str | None) -> list[Prompt]:
    """Held-out prompts of the procedural world (never seen by the tiny base in training)."""
    out = []
    for scene in eval_scenes(n):
        text = f"{trigger}, {caption(scene)}" if trigger else caption(scene)
        out.append(Prompt(text, scene.shapes[0].colour, scene.shapes[0].kind))
    return out


def file_prompts(path: str | Path) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise SdloraError(f"prompt file not found: {p}")
    lines = [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not lines:
        raise SdloraError(f"prompt file {p} is empty")
    return [Prompt(line, _first_word(line, sorted(COLOURS)), _first_word(line, list(SHAPES))) for line in lines]


def _first_word(text: str, words: list[str]) -> str | None:
    hits = [(m.start(), w) for w in words for m in [re.search(rf"\b{w}\b", text.lower())] if m]
    return min(hits)[1] if hits else None


def lora_styles(specs: list[LoraSpec], explicit: list[str] | None, known: list[str] = STYLES) -> tuple[list[str], str | None]:
    """Styles to score (from --style or the files' trigger phrases naming one of `known`, the checker's styles) and
    the joined trigger phrase."""
    triggers = []
    for spec in specs:
        meta = load_adapter(spec.path).metadata
        t = meta.get("modelspec.trigger_phrase") or ""
        if t:
            triggers.append(t)
    styles = explicit or [s for s in known if any(re.search(rf"\b{re.escape(s)}\b", t) for t in triggers)]
    return styles, ", ".join(triggers) or None


def pixel_stats(images: list[Image.Image], reference: list[Image.Image] | None) -> dict[str, float]:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])
    mx, mn = arr.max(-1), arr.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0).mean()
    grey = arr.mean(-1)
    edges = (np.abs(np.diff(grey, axis=1)) > 0.1).mean() + (np.abs(np.diff(grey, axis=2)) > 0.1).mean()
    stats = {"brightness": float(grey.mean()), "saturation": float(sat), "edge_density": float(edges / 2)}
    if reference is not None:
        ref = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in reference])
        stats["mean_abs_change_vs_strength0"] = float(np.abs(arr - ref).mean())
    return stats


def run_eval(
    base: BaseModel,
    specs: list[LoraSpec],
    prompts: list[Prompt],
    strengths: list[float],
    styles: list[str],
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
    use_checker: bool = True,
    progress=None,
    on_step=None,
    map_prompts: Callable[[Callable[[int], Image.Image], int], list[Image.Image]] | None = None,
    checker_path: str | Path | None = None,
    batch: int = 8,
) -> tuple[EvalReport, list[list[Image.Image]]]:
    """Images[strength][prompt]; prompt i always uses seed + i so columns differ only by strength.

    `progress()` is called after each image, `on_step(i)` after each sampling step (for a bar with time left).
    `map_prompts(fn, n)` -> [fn(0) ... fn(n-1)]: several processes each render a share of the prompts (Dist.map).
    `checker_path`: another world checker (a looks checker scores every look it was trained on).
    `batch`: prompts per sampling call (each keeps its own seed's noise; batch 1 is the one-image-at-a-time path)."""
    from sdlora.eval.checker import judge, load_checker

    checker = (load_checker(Path(checker_path)) if checker_path else load_checker()) if use_checker else None
    mixer = LoraMixer(base)
    names = [mixer.load(s.path, s.strength, s.te_strength, blocks=s.blocks) for s in specs]
    report = EvalReport(strengths, [p.text for p in prompts], styles)
    grid: list[list[Image.Image]] = []
    for k in strengths:
        mixer.set_strengths({name: (k * s.strength, k * (s.strength if s.te_strength is None else s.te_strength))
                             for name, s in zip(names, specs)})

        def render(i: int) -> Image.Image:
            image = generate_images(base, prompts[i].text, seed=seed + i, steps=steps, guidance=guidance,
                                    on_step=on_step)[0]
            if progress:
                progress()
            return image

        if map_prompts:
            images = map_prompts(render, len(prompts))
        else:  # several prompts per UNet call: the same noise (seed + i), a few times faster on a CPU
            images = []
            for i in range(0, len(prompts), batch):
                chunk = [p.text for p in prompts[i : i + batch]]
                per_image = (lambda j, k=len(chunk): [on_step(j) for _ in range(k)]) if on_step else None  # bars count image-steps
                images += generate(base, GenerateOptions(chunk[0], seed=seed + i, steps=steps, guidance=guidance,
                                                         prompts=chunk), per_image)
                for _ in chunk:
                    if progress:
                        progress()
        row: dict = {"strength": k, **pixel_stats(images, grid[0] if grid else None)}
        if checker is not None:
            v = judge(checker, images)
            row["style_scores"] = {s: float(v["style"][:, j].mean()) for j, s in enumerate(checker.style_names)}
            known = [(i, p) for i, p in enumerate(prompts) if p.colour]
            if known:
                row["colour_accuracy"] = float(np.mean([v["colour"][i] == p.colour for i, p in known]))
            known = [(i, p) for i, p in enumerate(prompts) if p.shape]
            if known:
                row["shape_accuracy"] = float(np.mean([v["shape"][i] == p.shape for i, p in known]))
        report.rows.append(row)
        grid.append(images)
    for name in names:
        mixer.remove(name)
    return report, grid


def grid_image(grid: list[list[Image.Image]], strengths: list[float], prompts: list[str], max_rows: int = 8) -> Image.Image:
    """Rows = prompts, columns = strengths, with labels; the picture users look at."""
    rows = min(max_rows, len(prompts))
    w, h = grid[0][0].size
    label_w, head_h = 220, 24
    font = ImageFont.load_default()
    out = Image.new("RGB", (label_w + w * len(strengths), head_h + h * rows), "white")
    draw = ImageDraw.Draw(out)
    for c, k in enumerate(strengths):
        draw.text((label_w + c * w + 4, 6), f"strength {k:g}", fill="black", font=font)
        for r in range(rows):
            out.paste(grid[c][r], (label_w + c * w, head_h + r * h))
    for r in range(rows):
        lines = _wrap(prompts[r], 34)[: max(1, h // 12)]
        for j, line in enumerate(lines):
            draw.text((4, head_h + r * h + 4 + 12 * j), line, fill="black", font=font)
    return out


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur] if cur else lines
