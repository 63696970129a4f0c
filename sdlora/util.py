"""Small things every room shares: atomic file replacement, the one dtype table, warn/info, device defaults.

Atomic replacement means a crash or error mid-write never leaves a truncated adapter where a good one was.
torch is imported lazily so the CLI's --help stays fast.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "fp16", "bf16")
SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}  # a safetensors header's names -> ours


def torch_dtype(name: str) -> torch.dtype:
    """fp32 / fp16 / bf16 (or safetensors' F32 / F16 / BF16) as a torch dtype."""
    import torch

    name = SAFETENSORS_DTYPES.get(name, name)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def warn(msg: str) -> None:
    """A warning on stderr, kept apart from what commands print on stdout."""
    print(f"warning: {msg}", file=sys.stderr)


def info(msg: str) -> None:
    print(msg, file=sys.stderr)


def default_device(asked: str | None = None) -> str:
    """The device a command runs on: what was asked for, else the GPU when there is one."""
    import torch

    return asked or ("cuda" if torch.cuda.is_available() else "cpu")


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; not every platform lets a directory be opened, so failure is tolerated."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> Path:
    """Create an empty temp file beside `path` (same filesystem, so os.replace is atomic), honouring the umask."""
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on normal exit fsync it and rename it over `path`, on error delete it.

    The caller writes the temp file however it likes (e.g. `safetensors.torch.save_file`). Until the block
    finishes, readers of `path` keep seeing the old file, and an exception leaves the old file untouched.
    """
    path = Path(path)
    tmp = _create_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old content or all of `data`, never a mix."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
