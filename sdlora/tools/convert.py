"""`sdlora convert`: kohya <-> diffusers/peft layout for plain LoRA (and LoCon) files.

The diffusers layout is what `pipe.load_lora_weights` reads natively: `unet.<module path>.lora_A.weight` /
`lora_B.weight`, text encoders under `text_encoder.text_model...`, and the per-module ranks and alphas in the
`lora_adapter_metadata` entry (peft's LoraConfig per component, with rank_pattern/alpha_pattern for the modules that
differ from the most common value), so no alpha is folded into the weights and kohya -> diffusers -> kohya is exact.
LoHa/LoKr/DoRA and other full-delta types have no lora_A/lora_B form and are refused. SDXL files go through SDXL's
name table (formats/names_sdxl.py): kohya output names the UNet by SGM paths, diffusers output by diffusers paths.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch

from sdlora.errors import SdloraError
from sdlora.formats.detect import SDXL_KEYS, canonical_modules, names_for
from sdlora.formats.header import read_header
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter, tensor_hashes
from sdlora.formats.names import SD1_NAMES, NameTable
from sdlora.formats.names_sdxl import SDXL_NAMES
from sdlora.util import SAFETENSORS_DTYPES, atomic_write_bytes, torch_dtype

_ADAPTER_METADATA = "lora_adapter_metadata"


def module_path(kohya_name: str, names: NameTable | None = None) -> tuple[str, str]:
    """(diffusers component, dotted module path) for a kohya module name; SGM (SDXL) names by SDXL's table."""
    if names is None:
        names = SDXL_NAMES if SDXL_KEYS.search(kohya_name) else SD1_NAMES
    return names.module_path(kohya_name)


def _source_dtype(path: Path) -> torch.dtype:
    """The file's most common tensor dtype, so a conversion neither widens nor rounds the weights."""
    _, header = read_header(path)
    counts = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    common = counts.most_common(1)[0][0] if counts else "F32"
    return torch_dtype(common) if common in SAFETENSORS_DTYPES else torch.float32


def _peft_config(entries: list[tuple[str, ModuleWeights]]) -> dict[str, object]:
    """peft LoraConfig fields for one component: most common rank/alpha plus per-module exceptions."""
    ranks = Counter(w.rank for _, w in entries)
    alphas = Counter(w.alpha for _, w in entries)
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    # peft matches pattern keys as '(.*\.)?KEY$', so the text encoder's paths work with or without 'text_model.'.
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: w.rank for p, w in entries if w.rank != r},
        "alpha_pattern": {p: w.alpha for p, w in entries if w.alpha != alpha},
        "target_modules": sorted(p for p, _ in entries),
    }


def to_diffusers(modules: dict[str, ModuleWeights], dtype: torch.dtype,
                 names: NameTable = SD1_NAMES) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors in the diffusers/peft layout and the `lora_adapter_metadata` JSON recording every rank and alpha."""
    tensors: dict[str, torch.Tensor] = {}
    per_owner: dict[str, list[tuple[str, ModuleWeights]]] = {}
    for name in sorted(modules):
        owner, path = names.module_path(name)
        w = modules[name]
        tensors[f"{owner}.{path}.lora_A.weight"] = w.down.to(dtype).contiguous()
        tensors[f"{owner}.{path}.lora_B.weight"] = w.up.to(dtype).contiguous()
        per_owner.setdefault(owner, []).append((path.removeprefix("text_model."), w))
    config = {f"{owner}.{k}": v for owner, entries in per_owner.items() for k, v in _peft_config(entries).items()}
    return tensors, json.dumps(config, separators=(",", ":"))


def default_output(path: Path, to: str) -> Path:
    return path.with_name(f"{path.stem}.{to}.safetensors")


def convert_adapter(path: str | Path, to: str, output: str | Path | None = None) -> tuple[Path, str]:
    """Write `path` in the `to` layout ('kohya' or 'diffusers'); returns (output path, its sha256)."""
    path = Path(path)
    if to not in ("kohya", "diffusers"):
        raise SdloraError(f"unknown target layout '{to}': choose kohya or diffusers")
    out = Path(output) if output else default_output(path, to)
    if out.resolve() == path.resolve():
        raise SdloraError(f"refusing to overwrite the source file {path}: choose another --output")
    adapter = load_adapter(path)
    if adapter.deltas:
        kinds = ", ".join(sorted({d.kind for d in adapter.deltas.values()}))
        raise SdloraError(
            f"cannot convert {path}: its {kinds} modules are full weight updates with no lora_down/lora_up "
            f"(lora_A/lora_B) form, so neither layout can hold them"
        )
    dtype = _source_dtype(path)
    names = names_for(adapter)
    adapter = canonical_modules(adapter, names)  # kohya's own names: SGM paths for an SDXL UNet
    metadata = {k: v for k, v in adapter.metadata.items() if k != _ADAPTER_METADATA}
    if to == "kohya":
        return out, save_adapter(out, adapter.modules, metadata, dtype)

    tensors, config = to_diffusers(adapter.modules, dtype, names)
    # Hashes describe this file's tensors (recomputed), so tools verifying them agree with the new layout.
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = tensor_hashes(tensors, metadata)
    metadata["modelspec.hash_sha256"] = "0x" + metadata["sshs_model_hash"]
    metadata[_ADAPTER_METADATA] = config
    data = safetensors.torch.save(tensors, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out, hashlib.sha256(data).hexdigest()
