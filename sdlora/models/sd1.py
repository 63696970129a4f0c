"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, epsilon or v-prediction, `lora_te_` keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdlora.errors import SdloraError
from sdlora.models.family import ModelFamily

if TYPE_CHECKING:
    from sdlora.models.base import Components


class SD1Family(ModelFamily):
    """SD1 and SD2 share everything but the text encoder's width (768 vs 1024) and, for 768-v, the prediction type."""

    name = "sd1"

    @classmethod
    def matches(cls, components: set[str]) -> bool:
        return "text_encoder" in components and "text_encoder_2" not in components

    @classmethod
    def load_folder(cls, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from sdlora.models.base import Components

        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
            te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
            tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except (OSError, ValueError, KeyError) as e:
            raise SdloraError(f"could not load base model from {path}: {str(e).splitlines()[0]}") from None
        return Components(unet, vae, {"text_encoder": te}, {"text_encoder": tok}, sched, cls)

    @classmethod
    def from_components(cls, parts: Components) -> SD1Family:
        v_pred = parts.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        gelu = parts.text_encoders["text_encoder"].config.hidden_act == "gelu"  # OpenCLIP (SD2), not CLIP's quick_gelu
        version = "sd_v2" if parts.unet.config.cross_attention_dim == 1024 or gelu else "sd_v1"
        return cls(version, v_pred)
