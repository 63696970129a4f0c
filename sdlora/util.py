"""Small things every room shares: atomic file replacement, the one dtype table, warn/info, device defaults, one-line
OSError text, output-folder checks and the CPU thread count.

Atomic replacement means a crash or error mid-write never leaves a truncated adapter where a good one was.
torch is imported lazily so the CLI's --help stays fast.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import SdloraError

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
        fd = os.open(tmp, os.O_RDONLY)  # read-only: the caller may have made the file read-only already
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old content or all of `data`, never a mix."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- messages


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn the first time `key` comes up in this process (a long prompt is cut in every step that uses it)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warn(message)


def describe_os_error(exc: OSError, what: str = "cannot access") -> str:
    """`<what> <path>: <why>` for the error line, e.g. 'cannot access out/x: Permission denied'."""
    why = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{what} {paths}: {why}" if paths else f"{what}: {why}"


def check_output_folder(path: str | Path, option: str = "--output") -> Path:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written.

    Finds the nearest part of `path` that exists: it must be a folder, and (when `path` itself is missing) one the
    user may create folders in; an existing `path` must be writable. Root ignores permission bits; os.access knows.
    """
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = f"{option} {path}" if probe == path else f"{option} {path}: {probe}"
        raise SdloraError(f"{where} is a file, not a folder; choose another {option}")
    if not os.access(probe if probe.exists() else Path.cwd(), os.W_OK | os.X_OK):
        raise SdloraError(f"{option} {path}: cannot write in {probe} (permission denied); choose another {option}")
    return path


# ---------------------------------------------------------------- CPU threads

THREADS_ENV = "SDLORA_THREADS"


def cpu_count() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores(window: float = 0.2) -> float | None:
    """How many of this process's CPUs other programs kept busy over the last `window` seconds (Linux), else None.

    Read from /proc/stat: unlike the load average, which takes a minute to notice a new load, it is current.
    """
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None

    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name.startswith("cpu") and name != "cpu" and (mine is None or name in mine):
                    t = [int(x) for x in ticks[:8]]
                    out[name] = (sum(t), t[3] + t[4])  # total, idle + iowait
        return out

    try:
        first = sample()
        time.sleep(window)
        second = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for name, (total, idle) in second.items():
        d_total, d_idle = total - first[name][0], idle - first[name][1]
        busy += (d_total - d_idle) / d_total if d_total > 0 else 0.0
    return busy


def choose_cpu_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads for the CPU: the cores nobody else is using, at least 1.

    torch's OpenMP threads meet at a barrier after every operator; when another program holds a core, the thread
    on it waits for the scheduler and the others wait for it, so a 2-core machine beside a busy load runs many
    times slower with 2 threads than with 1 (BENCHMARKS.md, "CPU threads"), while 1 thread on an idle 2-core
    machine loses little. So only cores that are idle now count; when that cannot be read, the load average.
    On 2 cores or fewer, 1 thread: a second one bought nothing for the tiny bases even idle (4.44 vs 4.34 it/s on
    a quiet host), and on a 2-core VM its barrier made the README's quick start 3x slower (1.25 vs 4.27 it/s,
    BENCHMARKS.md 2026-12-03).
    """
    cores = cpu_count() if cores is None else cores
    if cores <= 2:
        return 1
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores, cores - math.floor(busy + 0.5)))


def configure_cpu_threads(environ: dict[str, str] | None = None, announce: Callable[[str], None] | None = None) -> int | None:
    """Set torch's CPU thread count once, at the command line's start, unless the user chose one.

    SDLORA_THREADS=N, OMP_NUM_THREADS=N or MKL_NUM_THREADS=N win; otherwise `choose_cpu_threads`. Returns the
    number set, or None when the user's choice was left alone. Also makes idle OpenMP threads sleep rather than
    spin (OMP_WAIT_POLICY=PASSIVE, only where unset and before torch loads its OpenMP runtime).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    given = env.get(THREADS_ENV)
    if given:
        try:
            n = max(1, int(given))
        except ValueError:
            raise SdloraError(f"{THREADS_ENV} must be a whole number, not '{given}'") from None
    elif env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS"):
        return None
    else:
        cores = cpu_count()
        most = choose_cpu_threads(cores, 0.0)  # what this machine uses idle
        busy = busy_cores() if most > 1 else None  # 0.2 s of /proc/stat, only where it can change the answer
        n = choose_cpu_threads(cores, busy) if most > 1 else 1
        if n < most and announce:
            announce(f"other programs keep {busy or 0:.1f} of {cores} CPU cores busy: using {n} CPU thread"
                     f"{'s' if n > 1 else ''} (set {THREADS_ENV}=N to choose)")
    import torch

    torch.set_num_threads(n)
    return n
