"""A loaded base model (`--base`): its diffusers/transformers components plus the family that knows what differs.

The trainer and the generator only talk to a `BaseModel` and its `ModelFamily` (sdlora/models/family.py), so a new
generation (SDXL: two text encoders, pooled embeddings, time ids) is a new family, not a second loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.models.family import ModelFamily
from sdlora.util import DTYPE_NAMES, torch_dtype


@dataclass
class Components:
    """What a source yields, before the family wraps it: text encoders and tokenizers keyed by diffusers names."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, object]
    scheduler: object  # the training (DDPM-family) scheduler
    family: type[ModelFamily]


@dataclass
class BaseModel:
    name: str  # what the user passed (recorded as ss_sd_model_name)
    path: Path  # the diffusers folder (or single .safetensors/.ckpt file) it was loaded from
    family: ModelFamily
    unet: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, object]
    noise_scheduler: object  # the training (DDPM-family) scheduler
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native training resolution in pixels."""
        return self.family.native_resolution(self)

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.text_encoders.values()]

    def to(self, device: torch.device | str) -> BaseModel:
        for m in self.modules():
            m.to(device)
        return self

    def pipeline(self, scheduler: str | None = None):
        """The family's diffusers pipeline sharing this base's modules (no copy, no reload)."""
        return self.family.pipeline(self, make_inference_scheduler(self.noise_scheduler.config, scheduler))


INFERENCE_SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
}


def make_inference_scheduler(train_config, name: str | None):
    """Sampling scheduler built from the base's noise schedule (so prediction type carries over)."""
    import diffusers

    name = name or "dpm++"
    if name not in INFERENCE_SCHEDULERS:
        raise SdloraError(f"unknown scheduler '{name}'; choose one of {', '.join(INFERENCE_SCHEDULERS)}")
    from sdlora.models.overrides import inference_overrides

    cls = INFERENCE_SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(train_config, **inference_overrides(train_config, cls))


def load_base(base: str = "tiny", precision: str = "fp32", device: str | torch.device = "cpu", vae: str | None = None,
              v_prediction: bool = False, zero_terminal_snr: bool = False) -> BaseModel:
    """Load every component of a base in `precision`; the VAE stays fp32 under fp16 (SD VAEs overflow) unless a
    replacement `vae` declares itself fp16-safe. `v_prediction` / `zero_terminal_snr` change the noise schedule
    (sdlora/models/overrides.py)."""
    from sdlora.models import family_of_folder
    from sdlora.models.sources import resolve_base_path

    _quiet_libraries()
    if precision not in DTYPE_NAMES:
        raise SdloraError(f"unknown precision '{precision}'; choose fp32, fp16 or bf16")
    dtype = torch_dtype(precision)
    path = resolve_base_path(base)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    if path.is_file():  # SD 1.x, SD 2.x or SDXL in the original layouts, told apart by their keys
        from sdlora.models.single_file_sgm import load_checkpoint_file

        parts = load_checkpoint_file(path, dtype, vae_dtype, "v_prediction" if v_prediction else None)
    else:
        parts = family_of_folder(base, path).load_folder(path, dtype, vae_dtype)
    if vae or v_prediction or zero_terminal_snr:
        from sdlora.models.overrides import configure_schedule, load_vae

        parts.scheduler = configure_schedule(parts.scheduler, v_prediction, zero_terminal_snr)
        parts.vae = load_vae(vae, parts.vae, dtype) if vae else parts.vae
    for m in (parts.unet, parts.vae, *parts.text_encoders.values()):
        m.requires_grad_(False)
        m.eval()
    bm = BaseModel(name=base, path=path, family=parts.family.from_components(parts), unet=parts.unet, vae=parts.vae,
                   text_encoders=parts.text_encoders, tokenizers=parts.tokenizers, noise_scheduler=parts.scheduler,
                   dtype=dtype)
    return bm.to(device)


def _quiet_libraries() -> None:
    """Weight-loading progress bars and info logs from the libraries would bury sdlora's own output."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def read_index(path: Path) -> dict:
    """A diffusers folder's model_index.json."""
    import json

    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise SdloraError(f"unreadable model_index.json in {path}: {e}") from None
