"""What the user may change about a loaded base: its VAE (`--vae`) and its noise schedule (`--v-prediction`,
`--zero-terminal-snr`).

SDXL's VAE overflows in fp16 (NaN images), so under fp16 a VAE runs in fp32 unless its config says
`force_upcast: false`, diffusers' own flag that fp16-safe re-trainings such as madebyollin/sdxl-vae-fp16-fix set.
A replacement VAE must have the base's architecture; a single file gets the base VAE's config (scaling factor
included) and may be in the original (LDM) or diffusers key layout.
Zero terminal SNR is diffusers' `rescale_betas_zero_snr` (Lin et al. 2023), which the DPM++, Euler, Euler-a and DDIM
samplers honour (PNDM does not, so it is refused); sampling then starts from the last timestep ("trailing" spacing), as
the paper prescribes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdlora.errors import SdloraError


def vae_dtype(config, dtype: torch.dtype) -> torch.dtype:
    """fp16 only for a VAE that declares itself fp16-safe; bf16 and fp32 have the range SD VAEs need."""
    if dtype != torch.float16:
        return dtype
    return torch.float16 if config.get("force_upcast", True) is False else torch.float32


def load_vae(spec: str, base_vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A VAE from a diffusers folder, a hub id (cache, else online) or one .safetensors file, checked against the base's."""
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            config = AutoencoderKL.load_config(path, subfolder=sub)
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=vae_dtype(config, dtype))
        elif path.suffix.lower() == ".safetensors":
            vae = _vae_from_file(path, base_vae, dtype)
        elif spec.count("/") == 1 and not path.exists():
            vae = _vae_from_hub(spec, dtype)
        else:
            raise SdloraError(f"--vae {spec}: not found (expected a diffusers VAE folder, a .safetensors file or a hub id)")
    except (OSError, ValueError) as e:
        raise SdloraError(f"--vae {spec}: could not load a VAE ({str(e).splitlines()[0]})") from None
    for key in ("latent_channels", "block_out_channels"):
        if list(_listed(vae.config[key])) != list(_listed(base_vae.config[key])):
            raise SdloraError(f"--vae {spec}: its {key} {vae.config[key]} differ from the base VAE's "
                              f"{base_vae.config[key]}; it belongs to another model family")
    return vae.requires_grad_(False).eval()


def _listed(v):
    return v if isinstance(v, (list, tuple)) else [v]


def _vae_from_hub(repo_id: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL

    for local in (True, False):
        try:
            config = AutoencoderKL.load_config(repo_id, local_files_only=local)
            return AutoencoderKL.from_pretrained(repo_id, torch_dtype=vae_dtype(config, dtype), local_files_only=local)
        except OSError:
            continue
    raise SdloraError(f"--vae {repo_id}: not in the local Hugging Face cache and could not be downloaded")


def _vae_from_file(path: Path, base_vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    from sdlora.models.single_file import _assemble
    from sdlora.models.single_file_sgm import check_complete

    check_complete(path)
    state = load_file(str(path))
    state = {k.removeprefix("first_stage_model.").removeprefix("vae."): v for k, v in state.items()}
    config = {k: v for k, v in dict(base_vae.config).items() if not k.startswith("_")}
    if any(k.startswith("encoder.down.") for k in state):  # the original layout (A1111/ComfyUI VAE files)
        state = convert_ldm_vae_checkpoint(state, config)
    return _assemble(lambda: AutoencoderKL.from_config(config), state, vae_dtype(config, dtype), "VAE", path)


def configure_schedule(scheduler, v_prediction: bool = False, zero_terminal_snr: bool = False):
    """The training scheduler with the user's prediction type / zero-terminal-SNR rescaling applied (or as it was)."""
    changes = {}
    if v_prediction and scheduler.config.get("prediction_type") != "v_prediction":
        changes["prediction_type"] = "v_prediction"
    if zero_terminal_snr and not scheduler.config.get("rescale_betas_zero_snr", False):
        changes["rescale_betas_zero_snr"] = True
    if not changes:
        return scheduler
    return type(scheduler).from_config(scheduler.config, **changes)


def inference_overrides(train_config, scheduler_class: str) -> dict:
    """Keyword overrides for a sampling scheduler built from the training schedule's config."""
    if not train_config.get("rescale_betas_zero_snr", False):
        return {}
    if scheduler_class == "PNDMScheduler":
        raise SdloraError("the PNDM sampler cannot follow a zero-terminal-SNR schedule; use dpm++, euler, euler-a or ddim")
    return {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
