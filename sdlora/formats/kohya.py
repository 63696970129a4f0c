"""Reading and writing LoRA adapters in the community (kohya) safetensors format.

The writer produces exactly what kohya's sd-scripts writes (keys, 0-dim alphas, `sshs_*` hashes), so A1111, ComfyUI
and diffusers accept the files. The reader also takes diffusers/peft-layout files, renaming them to kohya names, so
every other sdlora tool works on one representation. Pickle-based files are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sdlora.errors import SdloraError
from sdlora.formats.deltas import DELTA_SUFFIXES, DeltaWeights, family_of
from sdlora.formats.names import kohya_name
from sdlora.util import atomic_write_bytes

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
_KOHYA_NAME = re.compile(r"^lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+$")
_KOHYA_KEY = re.compile(r"^(?P<name>lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(?P<suffix>.+)$")
_KOHYA_SUFFIX = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid"}
_KOHYA_SUFFIX |= {s: s for s in DELTA_SUFFIXES - set(_KOHYA_SUFFIX)}  # LoHa/LoKr/DoRA/diff parts keep their names
# peft / diffusers layout: "<owner>.<module path>.lora_A[.<adapter name>].weight" and "<...>.alpha".
_PEFT_KEY = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_PEFT_OWNERS = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_TE_ROOTS = ("text_model.", "encoder.layers.", "text_projection")
_PEFT_MAGNITUDE = re.compile(r"^(?P<base>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")  # peft DoRA
# The older diffusers attention-processor layout: "<block>.attn1.processor.to_q_lora.down.weight" (UNet) and
# "text_encoder.<path>.q_proj.lora_linear_layer.up.weight" (text encoder), each optionally "unet."-prefixed.
_OLD_DIFFUSERS_KEY = re.compile(
    r"^(?P<base>.+?)(?:\.processor)?\.(?:(?P<proj>to_q|to_k|to_v|to_out)_lora|(?P<te>lora_linear_layer))"
    r"\.(?P<part>down\.weight|up\.weight|alpha)$"
)

# Recognisable non-LoRA adapter families, checked in order: (pattern on the key, what to call it).
_UNSUPPORTED = (
    (re.compile(r"oft_|\.oft_blocks"), "OFT (oft_*) keys"),
    (re.compile(r"\.diff_b$"), "full bias difference (.diff_b) keys"),
    (re.compile(r"\.[ab][12]\.weight$"), "GLoRA (a1/a2/b1/b2) keys"),
    (re.compile(r"lora_embedding_"), "embedding LoRA (lora_embedding_*) keys"),
    (re.compile(r"\.[wb]_norm$"), "LyCORIS norm (w_norm/b_norm) keys"),
    (re.compile(r"\.bias$"), "LoRA bias keys"),
    (re.compile(r"hada_|lokr_"), "LyCORIS keys of an unknown layout"),
)

_MB = 0x100000
_LEGACY_HASH_BYTES = 0x10000


@dataclass
class ModuleWeights:
    """One LoRA pair. The applied delta is (alpha / rank) * up @ down, as in kohya, A1111, ComfyUI and diffusers."""

    down: torch.Tensor  # [r, in] (Linear) or [r, in, kh, kw] (Conv)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float  # a file without alpha (or alpha 0) means alpha = rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank: the factor consumers apply to up @ down."""
        return self.alpha / self.rank


@dataclass
class AdapterFile:
    """A loaded adapter: modules keyed by kohya module name, tensors in fp32, the file's string metadata.

    `modules` holds plain LoRA pairs (what every sdlora tool edits); `deltas` holds LoHa/LoKr/DoRA/Tucker/diff
    modules, which only apply as a full weight update (see sdlora.delta_weights).
    """

    modules: dict[str, ModuleWeights]
    metadata: dict[str, str]
    path: Path | None = None
    deltas: dict[str, DeltaWeights] = field(default_factory=dict)

    def nonfinite_modules(self) -> list[str]:
        """Modules holding NaN or infinite weights (or alpha): applied, they turn every image black."""
        bad = []
        for name, m in sorted({**self.modules, **self.deltas}.items()):
            tensors = (m.down, m.up) if isinstance(m, ModuleWeights) else tuple(m.tensors.values())
            if (m.alpha is not None and not math.isfinite(m.alpha)) or not all(bool(t.isfinite().all()) for t in tensors):
                bad.append(name)
        return bad

    def require_finite(self) -> None:
        """Refuse, with the module's name, a file that would make NaN images or weights."""
        bad = self.nonfinite_modules()
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise SdloraError(f"{self.path or 'the adapter'} holds NaN or infinite weights in {bad[0]}{more}; "
                              "refusing to apply it (sdlora inspect lists them)")


def file_sha256(path: str | Path) -> str:
    """Whole-file sha256 hex (AutoV2 is its first 10 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_data_sha256(buffer: bytes) -> str:
    """sha256 of a safetensors buffer past its 8-byte length and JSON header: the tensor bytes only."""
    header_len = int.from_bytes(buffer[:8], "little")
    return hashlib.sha256(memoryview(buffer)[8 + header_len :]).hexdigest()


def tensor_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya/additional-networks compute them.

    Both are taken over an in-memory safetensors file holding the tensors and only the `ss_*` metadata, so editing
    other metadata (titles, hashes) does not change them.
    """
    ss_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buffer = safetensors.torch.save(tensors, ss_metadata)
    legacy = hashlib.sha256(buffer[_MB : _MB + _LEGACY_HASH_BYTES]).hexdigest()[:8]
    return tensor_data_sha256(buffer), legacy


def _check_pair(name: str, down: torch.Tensor, up: torch.Tensor, where: str) -> None:
    if down.ndim not in (2, 4) or up.ndim != down.ndim or 0 in down.shape or 0 in up.shape:
        raise SdloraError(
            f"{name} in {where} is not a LoRA pair: lora_down shape {list(down.shape)}, lora_up shape {list(up.shape)}"
        )
    if up.shape[1] != down.shape[0]:
        raise SdloraError(
            f"rank mismatch in {where}: {name} has lora_down rank {down.shape[0]} but lora_up rank {up.shape[1]}"
        )


def save_adapter(
    path: str | Path,
    modules: dict[str, ModuleWeights],
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
) -> str:
    """Write a kohya LoRA file atomically and return the sha256 of the whole file.

    `sshs_model_hash`, `sshs_legacy_hash` and `modelspec.hash_sha256` are computed and also stored into the
    caller's `metadata` dict (as kohya does), so callers can report them.
    """
    path = Path(path)
    if not modules:
        raise SdloraError(f"refusing to write {path}: the adapter has no modules")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SdloraError(f"metadata for {path} must map str to str, got {key!r}: {type(value).__name__}")

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        m = modules[name]
        if not _KOHYA_NAME.match(name):
            raise SdloraError(f"invalid kohya module name {name!r}: expected lora_unet_/lora_te_/lora_te1_/lora_te2_")
        _check_pair(name, m.down, m.up, str(path))
        # copy=True: tensors must not share storage, or safetensors refuses to serialise them.
        tensors[f"{name}.lora_down.weight"] = m.down.detach().to("cpu", dtype, copy=True).contiguous()
        tensors[f"{name}.lora_up.weight"] = m.up.detach().to("cpu", dtype, copy=True).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)

    model_hash, legacy_hash = tensor_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    metadata["modelspec.hash_sha256"] = "0x" + model_hash

    data = safetensors.torch.save(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_safetensors_container(path: Path) -> None:
    """Refuse files that are not safetensors by content (pickles included) before any parser touches them."""
    if not path.exists():
        raise SdloraError(f"adapter file not found: {path}")
    if path.is_dir():
        raise SdloraError(f"{path} is a directory, not a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(10)
    # Test the safetensors signature first: a header length's low byte may well be 0x80 or spell "PK".
    if len(head) == 10 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return
    if head[:2] == b"PK":
        why = "it is a PyTorch zip checkpoint; sdlora never unpickles files, convert it to .safetensors"
    elif head[:1] == b"\x80":
        why = "it is a Python pickle; sdlora never unpickles files, convert it to .safetensors"
    else:
        why = "no safetensors header"
    raise SdloraError(f"{path} is not a .safetensors file ({why})")


check_safetensors_file = _check_safetensors_container  # public name for the other file tools

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_declared_sizes(path: Path) -> None:
    """Refuse a header whose tensors claim more bytes than the file holds, before anything is read or allocated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)  # n <= size was checked by _check_safetensors_container
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdloraError(f"corrupt safetensors header in {path}: {exc}") from None
    if not isinstance(header, dict):
        raise SdloraError(f"corrupt safetensors header in {path}: not a JSON object")
    data = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, (start, end) = entry["shape"], entry["data_offsets"]
            count = math.prod(int(d) for d in shape)
            ok = all(isinstance(d, int) and d >= 0 for d in (*shape, start, end)) and start <= end <= data
            ok = ok and (entry["dtype"] not in _ITEMSIZE or count * _ITEMSIZE[entry["dtype"]] == end - start)
        except (TypeError, ValueError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise SdloraError(f"corrupt safetensors header in {path}: tensor {key!r} declares a shape, dtype or offsets "
                              f"that do not fit the file's {data} data bytes")


def _unsupported(key: str, path: Path) -> SdloraError:
    for pattern, kind in _UNSUPPORTED:
        if pattern.search(key):
            return SdloraError(f"unsupported adapter type in {path}: {kind} (e.g. {key!r}); sdlora reads LoRA, LoCon, LoHa, LoKr, DoRA and .diff")
    return SdloraError(
        f"unrecognised key {key!r} in {path}: expected kohya lora_down/lora_up/alpha or peft lora_A/lora_B keys"
    )


def _peft_module_name(base: str, has_te2: bool) -> str:
    """Kohya name for a peft/diffusers module path such as 'unet.down_blocks.0...to_q' or 'base_model.model.x'."""
    owner, _, rest = base.partition(".")
    prefix = _PEFT_OWNERS.get(owner)
    if prefix is None:
        rest = base
    rest = rest.removeprefix("base_model.model.")
    if prefix is None:
        prefix = "lora_te" if rest.startswith(_TE_ROOTS) else "lora_unet"
    if prefix != "lora_unet" and not rest.startswith("text_model."):
        rest = "text_model." + rest  # transformers 5 dropped the wrapper; kohya names keep transformers 4 paths
    if prefix == "lora_te" and has_te2:
        prefix = "lora_te1"  # SDXL: diffusers' text_encoder is kohya's te1
    return kohya_name(prefix, rest)


def _peft_alphas(path: Path, metadata: dict[str, str]) -> dict[str, object]:
    """peft adapter config for alphas: diffusers' `lora_adapter_metadata` entry, else a sibling adapter_config.json."""
    raw = metadata.get("lora_adapter_metadata")
    sibling = path.with_name("adapter_config.json")
    try:
        if raw:
            return json.loads(raw)
        if sibling.is_file():
            return json.loads(sibling.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise SdloraError(f"cannot read the peft adapter config for {path}: {exc}") from exc
    return {}


def _peft_alpha(config: dict[str, object], base: str) -> float | None:
    """Alpha for one peft module from a (possibly 'unet.'-prefixed) peft config: alpha_pattern first, then lora_alpha."""
    owner, _, rest = base.partition(".")
    prefixes = [f"{owner}.", ""] if owner in _PEFT_OWNERS else [""]
    module = (rest if owner in _PEFT_OWNERS else base).removeprefix("base_model.model.")
    for p in prefixes:
        pattern = config.get(f"{p}alpha_pattern")
        if isinstance(pattern, dict):
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?{key}$", module):
                    return float(value)
        if f"{p}lora_alpha" in config:
            return float(config[f"{p}lora_alpha"])
    return None


def _classify(key: str, has_te2: bool) -> tuple[str, str, str | None] | None:
    """(kohya module name, part, peft module path or None) for one key, None when no layout knows it."""
    if (m := _KOHYA_KEY.match(key)) and m["suffix"] in _KOHYA_SUFFIX:
        return m["name"], _KOHYA_SUFFIX[m["suffix"]], None
    if _KOHYA_KEY.match(key):
        return None
    if m := _OLD_DIFFUSERS_KEY.match(key):
        base = m["base"] if m["te"] else f"{m['base']}.{'to_out.0' if m['proj'] == 'to_out' else m['proj']}"
        return _peft_module_name(base, has_te2), m["part"].removesuffix(".weight"), None
    if m := _PEFT_KEY.match(key):
        return _peft_module_name(m["base"], has_te2), "down" if m["ab"] == "A" else "up", m["base"]
    if m := _PEFT_MAGNITUDE.match(key):
        return _peft_module_name(m["base"], has_te2), "dora_scale", m["base"]
    if key.endswith(".alpha") and not any(p.search(key) for p, _ in _UNSUPPORTED):
        return _peft_module_name(key.removesuffix(".alpha"), has_te2), "alpha", None
    return None


def load_adapter(path: str | Path) -> AdapterFile:
    """Load an adapter file (kohya, peft/diffusers, old diffusers attn-processor, LyCORIS) into kohya-named fp32
    modules, validating every key: plain LoRA pairs go to `modules`, every other type to `deltas`."""
    path = Path(path)
    _check_safetensors_container(path)
    _check_declared_sizes(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = f.keys()  # safe_open is not iterable
            raw = {key: f.get_tensor(key) for key in names}
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncated data
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SdloraError(f"corrupt safetensors header or data in {path}: {reason}") from exc

    has_te2 = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in raw)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    peft_bases: dict[str, str] = {}
    for key, tensor in raw.items():
        hit = _classify(key, has_te2)
        if hit is None:
            raise _unsupported(key, path)
        name, part, peft_base = hit
        if peft_base is not None:
            peft_bases[name] = peft_base
        if not tensor.is_floating_point():
            raise SdloraError(f"{key} in {path} has non-float dtype {tensor.dtype}")
        if part in parts.setdefault(name, {}):
            raise SdloraError(f"duplicate {part} weights for {name} in {path}")
        parts[name][part] = tensor.to(torch.float32)

    peft_config = _peft_alphas(path, metadata) if peft_bases else {}
    modules: dict[str, ModuleWeights] = {}
    deltas: dict[str, DeltaWeights] = {}
    for name, p in parts.items():
        if (kind := family_of(set(p))) != "LoRA":
            alpha = _module_alpha(p, name, path, peft_config, peft_bases)
            delta = DeltaWeights(kind, {k: v.contiguous() for k, v in p.items() if k != "alpha"}, alpha)
            delta.validate(f"{name} in {path}")
            deltas[name] = delta
            continue
        if "down" not in p or "up" not in p:
            have = " and ".join(k for k in ("down", "up", "alpha") if k in p)
            missing = "lora_up" if "down" in p else "lora_down"
            raise SdloraError(f"incomplete LoRA module in {path}: {name} has {have} but no {missing}")
        down, up = p["down"].contiguous(), p["up"].contiguous()
        _check_pair(name, down, up, str(path))
        alpha = _module_alpha(p, name, path, peft_config, peft_bases)
        modules[name] = ModuleWeights(down=down, up=up, alpha=float(down.shape[0]) if not alpha else alpha)
    if not modules and not deltas:
        raise SdloraError(f"{path} holds no LoRA weights")
    return AdapterFile(modules=modules, metadata=metadata, path=path, deltas=deltas)


def _module_alpha(
    p: dict[str, torch.Tensor], name: str, path: Path, peft_config: dict[str, object], peft_bases: dict[str, str]
) -> float | None:
    """The module's alpha key, else its peft config entry, else None (callers read None as 'alpha = rank')."""
    if "alpha" in p:
        if p["alpha"].numel() != 1:
            raise SdloraError(f"alpha of {name} in {path} is not a scalar (shape {list(p['alpha'].shape)})")
        return float(p["alpha"].item())
    if name in peft_bases:
        return _peft_alpha(peft_config, peft_bases[name])
    return None
