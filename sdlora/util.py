"""Atomic file replacement: a crash or error mid-write never leaves a truncated adapter where a good one was."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
