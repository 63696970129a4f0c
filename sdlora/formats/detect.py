"""Which base an adapter file is for, from its key names, layer widths and metadata.

The tools that work on a file alone (inspect, convert, merge, resize) need it to pick the kohya name table; the
mixer needs it to refuse an SD 1.x file on an SDXL base (and the reverse) with the reason, instead of applying the
few layers whose shapes happen to agree.
"""

from __future__ import annotations

import dataclasses
import re

from sdlora.errors import SdloraError
from sdlora.formats.deltas import DeltaWeights
from sdlora.formats.kohya import AdapterFile, ModuleWeights
from sdlora.formats.names import SD1_NAMES, NameTable
from sdlora.formats.names_sdxl import SDXL_NAMES

SDXL_KEYS = re.compile(r"^lora_(te1|te2)_|^lora_unet_(input_blocks|output_blocks|middle_block)_")
# cross-attention context width (attn2 to_k/to_v input) and text-encoder width -> architecture
_CONTEXT_DIMS = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl"}
_TE_DIMS = {768: "sd_v1", 1024: "sd_v2"}
LABELS = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sdxl": "SDXL"}
KOHYA_VERSIONS = {"sd_v1": "sd_v1", "sd_v2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # -> ss_base_model_version


def _in_width(w: ModuleWeights | DeltaWeights) -> int | None:
    """Input width of a Linear module's update: lora_down's, or ΔW's size over its rows (LoHa, LoKr, DoRA...)."""
    if isinstance(w, ModuleWeights):
        return int(w.down.shape[1])
    try:
        out = w.out_features()
        return w.numel() // out if out else None
    except (IndexError, KeyError):
        return None


def guess_architecture(adapter: AdapterFile) -> tuple[str, str]:
    """(sd_v1 | sd_v2 | sdxl | unknown, the evidence): SDXL key names first (SDXL-architecture bases of any width
    use them), then layer widths, then metadata.

    Widths are read from every module type, so LyCORIS LoHa/LoKr files (no lora_down) are recognised too.
    """
    every = {**adapter.modules, **adapter.deltas}
    if any(SDXL_KEYS.search(n) for n in every):
        return "sdxl", "SDXL key names (lora_te1/te2, input/output blocks)"
    for name, w in every.items():
        if re.search(r"attn2_to_[kv]$", name) and (arch := _CONTEXT_DIMS.get(_in_width(w) or 0)):
            return arch, f"cross-attention width {_in_width(w)}"
    for name, w in every.items():
        if re.search(r"^lora_te_.*self_attn_q_proj$", name) and (arch := _TE_DIMS.get(_in_width(w) or 0)):
            return arch, f"text-encoder width {_in_width(w)}"
    meta = adapter.metadata
    version = meta.get("ss_base_model_version", "")
    spec = meta.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return "sdxl", "metadata"
    if version == "sd_v2" or spec.startswith("stable-diffusion-v2") or meta.get("ss_v2") == "True":
        return "sd_v2", "metadata"
    if version == "sd_v1" or spec.startswith("stable-diffusion-v1"):
        return "sd_v1", "metadata"
    if any(n.startswith("lora_te_") for n in every):
        return "sd_v1", "one text encoder (lora_te_ keys)"
    return "unknown", "no conclusive widths, key names or metadata"


def sdxl_by_names(adapter: AdapterFile) -> bool | None:
    """What the key names alone say: True for lora_te1/te2 or SGM block names, False for SD 1.x/2.x's one
    `lora_te_` encoder, None when they say neither (a UNet-only file with diffusers paths)."""
    names = list(adapter.modules) + list(adapter.deltas)
    xl, sd = any(SDXL_KEYS.search(n) for n in names), any(n.startswith("lora_te_") for n in names)
    return None if xl == sd else xl  # both: a hand-made mix, left to the shape check


def context_width(adapter: AdapterFile) -> int | None:
    """The cross-attention context width the file's attn2 to_k/to_v LoRAs were made for (768 SD1, 2048 SDXL)."""
    for name, w in adapter.modules.items():  # LoRA pairs only: a full delta's width is left to the shape check
        if re.search(r"attn2_to_[kv]$", name):
            return int(w.down.shape[1])
    return None


def names_for(adapter: AdapterFile) -> NameTable:
    """The name table a file's modules follow: SDXL's (default SDXL layout) or SD 1.x/2.x's."""
    return SDXL_NAMES if guess_architecture(adapter)[0] == "sdxl" else SD1_NAMES


def canonical_modules(adapter: AdapterFile, names: NameTable) -> AdapterFile:
    """The same file with every UNet module under the table's own name (SGM for SDXL), so files written with
    diffusers paths and files written with SGM paths line up module for module."""
    modules = {names.canonical(k): w for k, w in adapter.modules.items()}
    deltas = {names.canonical(k): w for k, w in adapter.deltas.items()}
    if len(modules) != len(adapter.modules) or len(deltas) != len(adapter.deltas):
        raise SdloraError(f"{adapter.path or 'the adapter'} names one module twice (once by its SGM and once by its "
                          "diffusers path)")
    return dataclasses.replace(adapter, modules=modules, deltas=deltas)
