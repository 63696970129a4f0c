"""`sdlora convert`: kohya <-> diffusers/peft layout for plain LoRA (and LoCon) files.

The diffusers layout is what `pipe.load_lora_weights` reads natively: `unet.<module path>.lora_A.weight` /
`lora_B.weight`, text encoders under `text_encoder.text_model...`, and the per-module ranks and alphas in the
`lora_adapter_metadata` entry (peft's LoraConfig per component, with rank_pattern/alpha_pattern for the modules that
differ from the most common value), so no alpha is folded into the weights and kohya -> diffusers -> kohya is exact.
LoHa/LoKr/DoRA and other full-delta types have no lora_A/lora_B form and are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch

from sdlora.errors import SdloraError
from sdlora.formats.header import read_header
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter, tensor_hashes
from sdlora.util import atomic_write_bytes

# kohya prefix -> (diffusers component, its root inside that component)
_OWNERS = {"lora_unet": ("unet", ""), "lora_te": ("text_encoder", "text_model."),
           "lora_te1": ("text_encoder", "text_model."), "lora_te2": ("text_encoder_2", "text_model.")}
# Module-name tokens that contain '_' themselves (kohya turned every '.' into '_'; these must be put back whole).
_COMPOUNDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "final_layer_norm", "text_projection", "add_embedding", "time_embedding", "linear_1", "linear_2", "conv_in",
    "conv_out", "conv_norm_out", "encoder_hid_proj", "class_embedding",
)
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ADAPTER_METADATA = "lora_adapter_metadata"


def module_path(kohya_name: str) -> tuple[str, str]:
    """(diffusers component, dotted module path) for an SD1/SD2 kohya module name."""
    prefix = next((p for p in sorted(_OWNERS, key=len, reverse=True) if kohya_name.startswith(p + "_")), None)
    if prefix is None:
        raise SdloraError(f"not a kohya module name: {kohya_name}")
    rest = kohya_name[len(prefix) + 1 :]
    if prefix == "lora_unet" and re.match(r"(input_blocks|output_blocks|middle_block)_", rest):
        raise SdloraError(f"{kohya_name} uses SDXL's original (SGM) block names; converting those is not supported")
    dotted = "." + rest.replace("_", ".") + "."
    for token in _COMPOUNDS:
        dotted = dotted.replace("." + token.replace("_", ".") + ".", "." + token + ".")
    owner, root = _OWNERS[prefix]
    path = dotted.strip(".")
    if root and not path.startswith(root):
        path = root + path
    return owner, path


def _source_dtype(path: Path) -> torch.dtype:
    """The file's most common tensor dtype, so a conversion neither widens nor rounds the weights."""
    _, header = read_header(path)
    counts = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return _DTYPES.get(counts.most_common(1)[0][0], torch.float32) if counts else torch.float32


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


def to_diffusers(modules: dict[str, ModuleWeights], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors in the diffusers/peft layout and the `lora_adapter_metadata` JSON recording every rank and alpha."""
    tensors: dict[str, torch.Tensor] = {}
    per_owner: dict[str, list[tuple[str, ModuleWeights]]] = {}
    for name in sorted(modules):
        owner, path = module_path(name)
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
    metadata = {k: v for k, v in adapter.metadata.items() if k != _ADAPTER_METADATA}
    if to == "kohya":
        return out, save_adapter(out, adapter.modules, metadata, dtype)

    tensors, config = to_diffusers(adapter.modules, dtype)
    # Hashes describe this file's tensors (recomputed), so tools verifying them agree with the new layout.
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = tensor_hashes(tensors, metadata)
    metadata["modelspec.hash_sha256"] = "0x" + metadata["sshs_model_hash"]
    metadata[_ADAPTER_METADATA] = config
    data = safetensors.torch.save(tensors, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out, hashlib.sha256(data).hexdigest()
