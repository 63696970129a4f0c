"""Editing a safetensors file's metadata in place (`sdlora meta`) without touching its tensor bytes.

Only the JSON header is rewritten; the data section is copied byte for byte, so the tensor hashes (sshs_model_hash,
AutoV3, modelspec.hash_sha256) stay valid. The legacy addnet hash covers bytes at a fixed offset of a buffer that also
holds the ss_* metadata, so it is recomputed when an ss_* key changes. The new file replaces the old atomically.
"""

from __future__ import annotations

import json
import shutil
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


def edit_metadata(path: str | Path, set_values: dict[str, str], unset: list[str]) -> MetaEdit:
    """Set and remove metadata keys of `path` in place; returns the new file's sha256 and what changed."""
    path = Path(path)
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
    with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(len(new_header).to_bytes(8, "little"))
        dst.write(new_header)
        src.seek(8 + n)
        shutil.copyfileobj(src, dst, 1 << 20)  # the tensor bytes, unchanged
    return MetaEdit(file_sha256(path), changed, rehashed)
