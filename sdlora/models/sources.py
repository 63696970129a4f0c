"""Where a base comes from (`--base`): the embedded tiny bases, a diffusers folder, a single file or a hub id."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError


def resolve_base_path(base: str) -> Path:
    """An embedded tiny base, a diffusers folder, a single file, or a hub id (from the local cache, or downloaded when online)."""
    from sdlora.models.tiny import TINY_BASES, tiny_base_dir

    if base in TINY_BASES:
        return tiny_base_dir(base)
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").exists():
            raise SdloraError(f"{p} is not a diffusers model folder (no model_index.json)")
        return p
    if p.suffix.lower() in {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}:
        if not p.is_file():
            raise SdloraError(f"base model file not found: {p}")
        from sdlora.models.single_file import check_suffix

        check_suffix(p)  # an SD 1.x/2.x/SDXL single file in the original layout (sdlora/models/single_file_sgm.py)
        return p
    if p.exists():
        raise SdloraError(f"--base {base} is neither 'tiny', 'tiny-xl', 'tiny-looks', a diffusers folder, a .safetensors/.ckpt file nor a hub id")
    if base.count("/") != 1 or base.startswith((".", "/", "~")):
        raise SdloraError(f"base model not found: {base} (expected 'tiny', 'tiny-xl', 'tiny-looks', a diffusers folder, a single file or a hub id like org/name)")
    return _hub_snapshot(base)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors",
                "text_encoder_2/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated...
        raise SdloraError(
            f"base model '{repo_id}' is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); pass a local diffusers folder with --base PATH instead"
        ) from None
