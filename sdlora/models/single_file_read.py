"""Opening an SD1.x single-file checkpoint safely and offline, and refusing what is not one.

Only formats that cannot run code are read: `.safetensors`, or `.ckpt`/`.pt`/`.pth` through
`torch.load(weights_only=True)` (pickles are never executed). A file that is another architecture (SDXL, SD 2.x),
a LoRA, or an incomplete checkpoint gets one line saying what it is. Turning the tensors into diffusers components,
and writing them back, is sdlora.models.single_file.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from sdlora.errors import SdloraError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = "cond_stage_model.transformer."
TORCH_SUFFIXES = {".ckpt", ".pt", ".pth"}


def check_suffix(path: Path) -> None:
    """Only formats that cannot run code get past here: safetensors, or torch zips/pickles read weights-only."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in TORCH_SUFFIXES:
        return
    if suffix == ".bin":
        raise SdloraError(f"{path.name}: a .bin base is one component of a diffusers folder; pass the folder instead")
    raise SdloraError(f"{path.name}: single-file bases must be .safetensors (or .ckpt/.pt/.pth read weights-only)")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The SD1 tensors of a single-file checkpoint and its safetensors metadata; refuses other architectures."""
    path = Path(path)
    check_suffix(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                keys = list(f.keys())
                check_architecture(keys, path.name)
                return {k: f.get_tensor(k) for k in keys if k.startswith((UNET_PREFIX, VAE_PREFIX, TE_PREFIX))}, metadata
        except (SafetensorError, OSError) as e:
            raise SdloraError(f"{path.name} is not a valid .safetensors file ({str(e).splitlines()[0]})") from None
    state = _torch_load(path)
    check_architecture(list(state), path.name)
    return {k: v for k, v in state.items() if k.startswith((UNET_PREFIX, VAE_PREFIX, TE_PREFIX))}, {}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """weights_only=True: torch's restricted unpickler allows tensors and plain containers, never a code call."""
    try:
        with warnings.catch_warnings():  # torch's note about unusual pickle protocols is not for our users
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \d+)", str(e))
        why = m.group(0) if m else (str(e).splitlines() or ["not a weights-only pickle"])[0]
        raise SdloraError(
            f"refusing to unpickle {path.name}: it holds more than plain tensors ({why}); "
            "only weights-only checkpoints load, convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as e:  # truncated, not a torch file at all...
        raise SdloraError(f"could not read {path.name} as a torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SdloraError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def check_architecture(keys: list[str], name: str) -> None:
    """Refuse anything but a complete SD1.x checkpoint, naming what it is instead."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        raise SdloraError(f"{name} is an SDXL checkpoint (conditioner.embedders.* keys); single-file bases must be SD 1.x")
    if has("cond_stage_model.model."):
        raise SdloraError(
            f"{name} is an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.* keys); "
            "single-file bases must be SD 1.x: pass an SD2 diffusers folder instead"
        )
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k for k in keys):
        raise SdloraError(f"{name} looks like a LoRA, not a base model; pass it with --lora")
    missing = [p for p in (UNET_PREFIX, VAE_PREFIX, TE_PREFIX) if not has(p)]
    if len(missing) == 3:
        raise SdloraError(f"{name} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    if missing:
        raise SdloraError(f"{name} is not a complete SD 1.x checkpoint: no {', '.join(p + '*' for p in missing)} weights")
