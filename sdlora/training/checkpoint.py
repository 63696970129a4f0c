"""Training checkpoints: the adapter file plus everything needed to continue bit-for-bit."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from sdlora.errors import SdloraError

STATE_FILE = "training_state.pt"


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: Path, state: dict[str, Any], write_adapter) -> Path:
    """Write into a temp folder, then rename it into place: a checkpoint is whole or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    write_adapter(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or an output folder whose newest checkpoint is taken."""
    p = Path(path)
    if (p / STATE_FILE).exists():
        return p
    candidates = sorted((p / "checkpoints").glob("step-*/" + STATE_FILE)) if p.is_dir() else []
    if not candidates:
        raise SdloraError(f"nothing to resume in {p}: no checkpoint (step-*/{STATE_FILE}) found")
    return candidates[-1].parent


def load_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SdloraError(f"unreadable training state in {folder}: {type(e).__name__}: {e}") from None


def prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted(root.glob("step-*"))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
