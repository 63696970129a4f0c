"""What a run tells the world while it trains: train_log.jsonl, progress.json, TensorBoard and the progress bar.

Losses stay on the device and are read back in batches (a read-back per step would sync the GPU every step).
The log is flushed to disk every few seconds and at every checkpoint, so a killed run keeps its history; on
resume the lines after the checkpoint's step are dropped and new ones appended. Only the main process writes.
Under several processes every process reads the same (summed) losses at the same steps, and a non-finite one on
any stops all (`agree` is Dist.any); the timed flush is off there, as processes would flush at different steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora.errors import SdloraError
from sdlora.util import atomic_write_bytes

LOG_FILE, PROGRESS_FILE = "train_log.jsonl", "progress.json"
FLUSH_SECONDS = 5.0


class Logbook:
    def __init__(self, out: Path, total: int, step: int, *, progress: bool, tensorboard: bool, is_main: bool,
                 warn: Callable[[str], None], ema: float | None = None, started: float | None = None,
                 agree: Callable[[bool], bool] | None = None):
        self.out, self.total, self.is_main, self.agree = out, total, is_main, agree
        self.ema, self.last_loss = ema, float("nan")
        self.pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, lr) not yet logged
        self.started, self.first_step, self.last_flush = started or time.time(), step, time.monotonic()
        self.t_session = time.monotonic()
        self.file = _open_log(out / LOG_FILE, step) if is_main else None
        self.writer = _tensorboard(out, warn) if tensorboard and is_main else None
        self.bar = tqdm(total=total, initial=step, desc="training", disable=not (progress and is_main), unit="step",
                        dynamic_ncols=True)
        self.step = step

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, lr))
        self.step = step
        self.bar.update(1)

    def due(self) -> bool:
        """Time to read the losses back: every few seconds, so the file on disk is never far behind."""
        return self.agree is None and time.monotonic() - self.last_flush > FLUSH_SECONDS

    def flush(self, extra: dict | None = None, status: str = "training") -> None:
        """Log the pending steps' losses (one read-back for many steps); stop on a non-finite loss."""
        self.last_flush = time.monotonic()
        values = torch.stack([loss for _, loss, _ in self.pending]).tolist() if self.pending else []
        bad = next(((s, v) for (s, _, _), v in zip(self.pending, values) if not math.isfinite(v)), None)
        if self.agree is not None and self.agree(bad is not None) and bad is None:
            bad = (self.step, "not finite on another process")
        for (s, _, lr), value in zip(self.pending, values):
            if bad is not None and s >= bad[0]:
                break
            self.last_loss = value
            self.ema = value if self.ema is None else 0.95 * self.ema + 0.05 * value
            record = {"step": s, "loss": value, "loss_smooth": self.ema, "lr": lr}
            if extra and s == self.step:
                record |= extra
            self._write(record)
        if bad is not None:
            self.pending.clear()
            raise SdloraError(
                f"loss became {bad[1]} at step {bad[0]}; stopped. The last good adapter is the latest checkpoint in "
                f"{self.out / 'checkpoints'}; try a lower learning rate or --mixed-precision bf16"
            )
        if self.pending:
            self.bar.set_postfix(loss=f"{self.ema:.4f}", lr=f"{self.pending[-1][2]:.2e}")
        self.pending.clear()
        if self.file:
            self.file.flush()
        self._progress(status)

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
        if self.writer:
            for key in ("loss", "lr", "val_loss"):
                if key in record:
                    self.writer.add_scalar(key, record[key], record["step"])

    def _progress(self, status: str) -> None:
        """progress.json: what a page or a script polls (step, total, time left)."""
        if not self.is_main:
            return
        elapsed = time.monotonic() - self.t_session
        done = self.step - self.first_step
        eta = elapsed / done * (self.total - self.step) if done > 0 else None
        state = {"step": self.step, "total": self.total, "elapsed_s": round(elapsed, 2),
                 "eta_s": None if eta is None else round(eta, 2), "loss": self.ema, "status": status}
        atomic_write_bytes(self.out / PROGRESS_FILE, json.dumps(state).encode())

    def message(self, text: str) -> None:
        self.bar.write(text) if self.is_main else None

    def close(self, status: str | None = None) -> None:
        self.bar.close()
        if status:
            try:
                self._progress(status)
            except OSError:
                pass
        if self.file:
            self.file.close()
            self.file = None
        if self.writer:
            self.writer.close()
            self.writer = None


def _open_log(path: Path, step: int):
    """Append to the log, first dropping lines past `step` (a resumed run replays those steps)."""
    if step and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _line_step(line) is not None and _line_step(line) <= step]
        atomic_write_bytes(path, "".join(kept).encode())
    elif not step:
        path.unlink(missing_ok=True)
    return open(path, "a", encoding="utf-8")


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a killed run


def _tensorboard(out: Path, warn: Callable[[str], None]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("--tensorboard needs the tensorboard package (pip install 'sdlora[tensorboard]'); not logging to it")
        return None
    return SummaryWriter(str(out / "logs"))
