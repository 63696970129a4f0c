"""An automatic judge for images of the procedural world (sdlora/world.py).

A small CNN, trained on renders that went through the tiny base's VAE (so it sees the same
blur a generated image has), reads the main object's colour and shape and, with independent
sigmoid outputs, whether each style shows. It learns colour and shape in every style, and learns
two-style images from composites where both styles are really drawn (world.ink_mix/split_mix),
since two mixed style LoRAs draw both looks at once rather than a faded average of two pictures.
Shipped in the package; `scripts/build_tiny_base.py` trains it. No such judge exists for real bases, where `sdlora eval` reports pixel statistics only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdlora.eval.world import COLOURS, SHAPES, STYLES

CHECKER_PATH = Path(__file__).parents[1] / "assets" / "checker.safetensors"
COLOUR_NAMES = sorted(COLOURS)
SHAPE_NAMES = list(SHAPES)
STYLE_NAMES = list(STYLES)
INPUT = 64


class Checker(nn.Module):
    """`style_names`: one sigmoid output per style (the shipped checker: world.STYLES; a looks checker: every look)."""

    def __init__(self, width: int = 48, style_names: tuple[str, ...] | list[str] = STYLE_NAMES):
        super().__init__()
        self.style_names = list(style_names)
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 2, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.colour = nn.Linear(c_in, len(COLOUR_NAMES))
        self.shape = nn.Linear(c_in, len(SHAPE_NAMES))
        self.style = nn.Linear(c_in, len(self.style_names))  # independent logits: a mix can show two styles

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.colour(h), self.shape(h), self.style(h)


def to_input(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_checker(model: Checker, path: Path) -> None:
    """The weights with the style names in the file's metadata, so load_checker rebuilds the right heads."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"style_names": json.dumps(model.style_names)})


def checker_style_names(path: Path = CHECKER_PATH) -> list[str]:
    """The styles a checker file scores, from its metadata (world.STYLES where it has none, as the shipped one),
    without loading its weights."""
    from safetensors import safe_open

    from sdlora.errors import SdloraError

    path = Path(path)
    if not path.exists():
        raise SdloraError(f"the world checker is missing ({path}); build it with scripts/build_tiny_base.py")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["style_names"]) if "style_names" in meta else list(STYLE_NAMES)


def load_checker(path: Path = CHECKER_PATH) -> Checker:
    """A checker and its style names (checker_style_names); the width is read off the first layer's weights."""
    from safetensors.torch import load_file

    names = checker_style_names(path)
    weights = load_file(str(path))
    model = Checker(width=weights["features.0.weight"].shape[0], style_names=names)
    model.load_state_dict(weights)
    return model.eval()


def checker_for_base(base: str) -> Path | None:
    """The judge of an embedded base: tiny-looks carries its own (it knows every look), tiny and tiny-xl share the
    shipped one; None for any other base (no judge exists for real bases)."""
    from sdlora.models.tiny import TINY_BASES

    if base not in TINY_BASES:
        return None
    own = TINY_BASES[base] / "checker.safetensors"
    return own if own.exists() else CHECKER_PATH


@torch.no_grad()
def judge(model: Checker, images: list[Image.Image]) -> dict[str, np.ndarray]:
    """Per image: predicted colour/shape names and the probability that each style shows (model.style_names order)."""
    colours, shapes, styles = [], [], []
    for i in range(0, len(images), 64):
        c, s, st = model(to_input(images[i : i + 64]))
        colours += [COLOUR_NAMES[j] for j in c.argmax(1).tolist()]
        shapes += [SHAPE_NAMES[j] for j in s.argmax(1).tolist()]
        styles.append(torch.sigmoid(st).numpy())
    return {"colour": np.array(colours), "shape": np.array(shapes), "style": np.concatenate(styles)}
