"""`sdlora inspect`: what an adapter file is and where it came from, from its keys, shapes and metadata.

The report is a plain dict (what `--json` prints); `format_report` renders it for people. It reads the file once
through the same loader generation uses, so whatever inspect accepts, generate accepts too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import safetensors.torch

from sdlora.formats.detect import guess_architecture, names_for
from sdlora.formats.header import read_header
from sdlora.formats.kohya import AdapterFile, ModuleWeights, load_adapter, tensor_data_sha256, tensor_hashes

# ss_* keys worth showing, with the label used in the text report.
TRAINING_KEYS = {
    "ss_base_model_version": "base model version", "ss_sd_model_name": "base model", "ss_network_module": "network",
    "ss_network_dim": "network dim", "ss_network_alpha": "network alpha", "ss_network_args": "network args",
    "ss_steps": "steps", "ss_max_train_steps": "max steps", "ss_epoch": "epoch", "ss_num_epochs": "epochs",
    "ss_learning_rate": "learning rate", "ss_unet_lr": "unet lr", "ss_text_encoder_lr": "text encoder lr",
    "ss_optimizer": "optimizer", "ss_lr_scheduler": "lr scheduler", "ss_resolution": "resolution",
    "ss_batch_size_per_device": "batch size", "ss_num_train_images": "train images", "ss_seed": "seed",
    "ss_mixed_precision": "mixed precision", "ss_clip_skip": "clip skip", "ss_noise_offset": "noise offset",
    "ss_min_snr_gamma": "min snr gamma", "ss_training_started_at": "started at", "ss_training_finished_at": "finished at",
    "ss_output_name": "output name", "ss_training_comment": "comment", "ss_zero_terminal_snr": "zero terminal snr",
}


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "max": max(values), "most_common": Counter(values).most_common(1)[0][0]}


def block_of(name: str) -> str:
    """Where a kohya module sits: 'down_blocks.1', 'mid', 'up_blocks.2', 'text encoder'..."""
    if m := re.match(r"lora_te(\d?)_", name):
        return f"text encoder {m[1]}".strip()
    if m := re.match(r"lora_unet_(down_blocks|up_blocks|input_blocks|output_blocks)_(\d+)", name):
        return f"{m[1]}.{m[2]}"
    if re.match(r"lora_unet_(mid_block|middle_block)", name):
        return "mid"
    return "unet (other)"


def _block_order(block: str) -> tuple[int, int, str]:
    group = {"down_blocks": 0, "input_blocks": 0, "mid": 1, "up_blocks": 2, "output_blocks": 2}.get(block.split(".")[0], 3)
    num = int(block.split(".")[1]) if "." in block else 0
    return group, num, block


def detect_format(keys: list[str], adapter: AdapterFile) -> str:
    """Layout and adapter type, e.g. 'kohya LoRA', 'kohya LoCon', 'LoHa', 'peft/diffusers LoRA', 'DoRA'."""
    kinds = sorted({d.kind for d in adapter.deltas.values()})
    if any(re.search(r"\.processor\.|_lora\.(down|up)\.weight$|lora_linear_layer", k) for k in keys):
        layout = "old diffusers (attention processor)"
    elif any(".lora_A." in k or k.endswith(".lora_A.weight") for k in keys):
        layout = "peft/diffusers"
    else:
        layout = "kohya"
    plain = "LoRA"
    if any(w.down.dim() == 4 and tuple(w.down.shape[2:]) != (1, 1) for w in adapter.modules.values()) or any(
        re.search(r"_(resnets|downsamplers|upsamplers|in_layers|out_layers|emb_layers)_|_skip_connection$|_\d_op$", n)
        for n in adapter.modules
    ):
        plain = "LoCon"
    parts = ([plain] if adapter.modules else []) + kinds
    return f"{layout} {' + '.join(parts)}"


def _top_tags(meta: dict[str, str], n: int = 10) -> list[tuple[str, int]]:
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return []
    total: Counter[str] = Counter()
    for tags in freq.values() if isinstance(freq, dict) else []:
        if isinstance(tags, dict):
            total.update({str(t).strip(): int(c) for t, c in tags.items() if isinstance(c, (int, float))})
    return total.most_common(n)


def _is_zero(w: object) -> bool:
    """kohya's check_lora_weights, generalised: an all-zero factor makes the module's update zero (untrained)."""
    if isinstance(w, ModuleWeights):
        return not w.up.any() or not w.down.any()
    return any(not t.any() for k, t in w.tensors.items() if k != "dora_scale")


def _hashes(path: Path, adapter: AdapterFile) -> dict[str, object]:
    meta = adapter.metadata
    raw = path.read_bytes()
    tensor_sha = tensor_data_sha256(raw)
    file_sha = hashlib.sha256(raw).hexdigest()  # the bytes are in memory already: no second read
    out: dict[str, object] = {
        "sha256": file_sha, "autov1": hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8], "autov2": file_sha[:10],
        "tensor_sha256": tensor_sha, "autov3": tensor_sha[:12],
        "sshs_model_hash": meta.get("sshs_model_hash"), "sshs_legacy_hash": meta.get("sshs_legacy_hash"),
        "modelspec_hash_sha256": meta.get("modelspec.hash_sha256"),
    }
    if meta.get("sshs_model_hash") or meta.get("sshs_legacy_hash"):
        model, legacy = tensor_hashes(safetensors.torch.load(raw), meta)
        out["sshs_verified"] = meta.get("sshs_model_hash") in (None, model) and meta.get("sshs_legacy_hash") in (None, legacy)
    return out


def inspect_adapter(path: str | Path) -> dict[str, object]:
    """Everything `sdlora inspect` shows, as JSON-ready values."""
    path = Path(path)
    adapter = load_adapter(path)  # refuses missing, non-safetensors and unsupported files with one line
    header_len, header = read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    meta = adapter.metadata
    all_modules = {**adapter.modules, **adapter.deltas}
    ranks = [w.rank for w in all_modules.values() if w.rank is not None]
    alphas = [w.alpha for w in all_modules.values() if w.alpha is not None]
    names = names_for(adapter)  # an SDXL file's blocks by SGM names, whichever path form the file uses
    blocks = Counter(block_of(names.canonical(n)) for n in all_modules)
    zero = sorted(n for n, w in all_modules.items() if _is_zero(w))
    arch, evidence = guess_architecture(adapter)
    trigger = meta.get("modelspec.trigger_phrase")
    report: dict[str, object] = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format": detect_format(keys, adapter),
        "types": dict(Counter(["LoRA"] * len(adapter.modules) + [d.kind for d in adapter.deltas.values()])),
        "architecture": arch,
        "architecture_evidence": evidence,
        "prediction_type": meta.get("modelspec.prediction_type"),
        "modules": len(all_modules),
        "rank": _stats(ranks),
        "alpha": _stats(alphas),
        "targets": {b: blocks[b] for b in sorted(blocks, key=_block_order)},
        "dtypes": sorted({header[k]["dtype"] for k in keys}),
        "trigger_words": [t.strip() for t in trigger.split(",") if t.strip()] if trigger else [],
        "top_tags": _top_tags(meta),
        "training": {k: meta[k] for k in TRAINING_KEYS if k in meta},
        "title": meta.get("modelspec.title"),
        "description": meta.get("modelspec.description"),
        "hashes": _hashes(path, adapter),
        "zero_modules": len(zero),
        "zero_module_names": zero,
        "nonfinite_module_names": adapter.nonfinite_modules(),
    }
    orientations = Counter(d.orientation for d in adapter.deltas.values() if d.orientation)
    if orientations:
        report["dora_orientation"] = dict(orientations)
    return report


def format_report(r: dict) -> str:
    """The human-readable `sdlora inspect` output."""
    def stat(s: dict | None) -> str:
        if not s:
            return "-"
        return f"{s['most_common']:g}" if s["min"] == s["max"] else f"{s['min']:g}..{s['max']:g} (mostly {s['most_common']:g})"

    h = r["hashes"]
    lines = [
        f"file:         {r['file']} ({r['size_bytes']:,} bytes, {', '.join(r['dtypes'])})",
        f"format:       {r['format']}" + (f"  [DoRA magnitude per {', '.join(r['dora_orientation'])}]" if "dora_orientation" in r else ""),
        f"architecture: {r['architecture']}{', v-prediction' if r.get('prediction_type') == 'v' else ''} "
        f"({r['architecture_evidence']})",
        f"modules:      {r['modules']}  rank {stat(r['rank'])}  alpha {stat(r['alpha'])}",
        "targets:      " + ", ".join(f"{b}: {n}" for b, n in r["targets"].items()),
    ]
    if r["title"]:
        lines.append(f"title:        {r['title']}")
    if r["description"]:
        lines.append(f"description:  {r['description']}")
    lines.append(f"trigger:      {', '.join(r['trigger_words']) or '-'}")
    if r["top_tags"]:
        lines.append("top tags:     " + ", ".join(f"{t} ({c})" for t, c in r["top_tags"]))
    if r["training"]:
        lines.append("training:")
        lines += [f"  {TRAINING_KEYS[k]}: {v}" for k, v in r["training"].items()]
    lines.append("hashes:")
    lines.append(f"  sha256:     {h['sha256']}  (AutoV2 {h['autov2']}, AutoV1 {h['autov1']})")
    lines.append(f"  tensors:    {h['tensor_sha256']}  (AutoV3 {h['autov3']})")
    if h["sshs_model_hash"] or h["sshs_legacy_hash"]:
        ok = "verified" if h.get("sshs_verified") else "DO NOT MATCH the tensors"
        lines.append(f"  sshs:       model {h['sshs_model_hash']}, legacy {h['sshs_legacy_hash']} ({ok})")
    if r["nonfinite_module_names"]:
        bad = r["nonfinite_module_names"]
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        lines.append(f"error: {len(bad)} of {r['modules']} modules hold NaN or infinite weights (generate and merge "
                     f"refuse this file): {shown}")
    if r["zero_modules"]:
        shown = ", ".join(r["zero_module_names"][:5]) + (" ..." if r["zero_modules"] > 5 else "")
        lines.append(f"warning: {r['zero_modules']} of {r['modules']} modules have all-zero weights (untrained): {shown}")
    return "\n".join(lines)
