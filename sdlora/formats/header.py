"""Editing a safetensors file's metadata in place (`sdlora meta`) without touching its tensor bytes.

Only the JSON header is rewritten; the data section is copied byte for byte, so the tensor hashes (sshs_model_hash,
AutoV3, modelspec.hash_sha256) stay valid. The legacy addnet hash covers bytes at a fixed offset of a buffer that also
holds the ss_* metadata, so it is recomputed when an ss_* key changes. The new file replaces the old atomically.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from sdlora.errors import SdloraError
from sdlora.formats.kohya import check_safetensors_file, file_sha256, tensor_hashes
from sdlora.util import atomic_path

# Short names users type, stored as modelspec.<name> (Stability's model spec, shown by the model sites).
SHORT_KEYS = ("trigger_phrase", "description", "title", "author", "license", "tags", "usage_hint")
_COMPUTED = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


@dataclass
class MetaEdit:
    sha256: str  # of the whole new file
    changed: list[str]  # full keys set or removed
    rehashed: bool  # the sshs_* hashes were recomputed because ss_* metadata changed


def read_header(path: str | Path) -> tuple[int, dict]:
    """(header length, parsed header JSON) of a safetensors file, refusing anything else with one line."""
    path = Path(path)
    check_safetensors_file(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdloraError(f"corrupt safetensors header in {path}: {exc}") from exc
    if not isinstance(header, dict):
        raise SdloraError(f"corrupt safetensors header in {path}: not a JSON object")
    return n, header


def metadata_key(key: str) -> str:
    """The stored key for a user-given one: short names map to modelspec.*, full ss_*/modelspec.* keys stay."""
    key = key.strip()
    if key in SHORT_KEYS:
        return f"modelspec.{key}"
    if key in _COMPUTED:
        raise SdloraError(f"{key} is computed from the tensors and cannot be set by hand")
    if key.startswith(("ss_", "modelspec.")) and len(key) > len("ss_"):
        return key
    raise SdloraError(f"unknown metadata key '{key}': use one of {', '.join(SHORT_KEYS)} or a full ss_*/modelspec.* key")


def _encode_header(header: dict) -> bytes:
    """Compact JSON starting with '{"' (A1111 asserts it), space-padded to 8 bytes as safetensors writes it."""
    data = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return data + b" " * (-len(data) % 8)


def edit_metadata(path: str | Path, set_values: dict[str, str], unset: list[str], force: bool = False) -> MetaEdit:
    """Set and remove metadata keys of `path` in place; returns the new file's sha256 and what changed.

    The file keeps its mode and owner. A read-only file (no write bit) is refused unless `force`. Edits of one file
    are serialised by a lock beside it, and the file is checked not to have changed under the edit before the new
    one replaces it, so two edits at once both survive and a writer outside sdlora is never overwritten.
    """
    path = Path(path)
    check_safetensors_file(path)
    st = path.stat()
    if not force and not st.st_mode & 0o222:
        raise SdloraError(f"{path} is read-only (mode {stat.filemode(st.st_mode)}); pass --force to edit it anyway "
                          "(the file stays read-only)")
    with _edit_lock(path):
        return _edit_locked(path, set_values, unset)


def _edit_locked(path: Path, set_values: dict[str, str], unset: list[str]) -> MetaEdit:
    before = path.stat()
    n, header = read_header(path)
    meta = dict(header.get("__metadata__") or {})
    changed: list[str] = []
    for key in unset:
        full = metadata_key(key)
        if full not in meta:
            raise SdloraError(f"cannot unset {full}: {path} has no such metadata key")
        del meta[full]
        changed.append(full)
    for key, value in set_values.items():
        full = metadata_key(key)
        if meta.get(full) != value:
            meta[full] = value
            changed.append(full)

    rehashed = False
    if any(k.startswith("ss_") for k in changed) and ("sshs_model_hash" in meta or "sshs_legacy_hash" in meta):
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = tensor_hashes(safetensors.torch.load_file(path), meta)
        rehashed = True

    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    new_header = _encode_header({"__metadata__": meta, **tensors} if meta else tensors)
    read_sha = hashlib.sha256()
    try:
        with atomic_path(path) as tmp:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                read_sha.update(src.read(8 + n))
                dst.write(len(new_header).to_bytes(8, "little"))
                dst.write(new_header)
                for chunk in iter(lambda: src.read(1 << 20), b""):  # the tensor bytes, unchanged
                    read_sha.update(chunk)
                    dst.write(chunk)
            _keep_mode_and_owner(tmp, before, path)
            _check_unchanged(path, before, read_sha.hexdigest())
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE and Path(exc.filename or path).resolve() != path.resolve():
            raise _folder_not_writable(path, exc) from None
        raise
    return MetaEdit(file_sha256(path), changed, rehashed)


def _keep_mode_and_owner(tmp: Path, before: os.stat_result, path: Path) -> None:
    """The new file gets the old one's permission bits and, where they differ from ours, its owner and group."""
    os.chmod(tmp, stat.S_IMODE(before.st_mode))
    mine = tmp.stat()
    if (mine.st_uid, mine.st_gid) != (before.st_uid, before.st_gid):
        try:
            os.chown(tmp, before.st_uid, before.st_gid)
        except PermissionError:
            raise SdloraError(f"{path} belongs to another user (uid {before.st_uid}, gid {before.st_gid}) and replacing "
                              "it would take it over; edit it as its owner") from None


def _check_unchanged(path: Path, before: os.stat_result, read_sha: str) -> None:
    """Refuse to replace a file that someone changed while it was read (size, mtime or content differ)."""
    now = path.stat()
    same = (now.st_ino, now.st_size, now.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    if not same or file_sha256(path) != read_sha:
        raise SdloraError(f"{path} changed while its metadata was being edited; nothing was written, run the edit again")


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _folder_not_writable(path: Path, exc: OSError) -> SdloraError:
    return SdloraError(f"cannot edit {path}: its folder {path.parent} is not writable ({exc.strerror}); "
                       "sdlora meta writes the new file beside the old one and renames it over")


@contextmanager
def _edit_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `.<name>.lock` beside `path`, removed when done.

    The holder unlinks the lock file before releasing it, so a waiter that then gets a lock on the unlinked file
    sees that its inode is gone from the folder and tries again with a fresh one.
    """
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE:
                raise _folder_not_writable(path, exc) from None
            raise
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
