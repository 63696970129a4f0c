"""The SDXL family: two text encoders, pooled text embeddings and size micro-conditioning (time ids).

SDXL conditions its UNet on the penultimate hidden states of CLIP ViT-L (768) and OpenCLIP bigG (1280) concatenated
(2048 channels of context), and through `added_cond_kwargs` on bigG's pooled, projected embedding plus six time ids:
the image's original size, the top-left corner of the crop taken from it and the target size (all as height, width).
This is exactly what `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` compute, so a LoRA trained
here conditions the UNet as diffusers, ComfyUI and A1111 will when they use it. Derivatives that keep SDXL's
architecture (Pony, Illustrious, NoobAI, including v-prediction ones) are this family too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from sdlora.errors import SdloraError
from sdlora.formats.names_sdxl import SDXL_NAMES, SgmNameTable
from sdlora.models.family import ModelFamily

if TYPE_CHECKING:
    from sdlora.models.base import BaseModel, Components

VERSION = "sdxl_base_v1-0"
CONFIG_DIR = Path(__file__).parents[1] / "assets" / "sdxl"  # SDXL 1.0 base's component configs, folder layout


def bundled_config(component: str) -> dict:
    """SDXL 1.0 base's config of one component (unet, vae, text_encoder, text_encoder_2, scheduler)."""
    import json

    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    data = json.loads((CONFIG_DIR / component / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "torch_dtype")}


class SDXLFamily(ModelFamily):
    name: ClassVar[str] = "sdxl"
    text_encoder_keys: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"

    # ---- recognising and loading
    @classmethod
    def matches(cls, components: set[str]) -> bool:
        """SDXL base folders list a UNet and both encoders; a refiner lists text_encoder_2 alone (load_folder refuses
        it); SD3 and Flux folders have a second encoder too, but a transformer instead of a UNet."""
        return "text_encoder_2" in components and "unet" in components

    @classmethod
    def load_folder(cls, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        """The components of a diffusers SDXL folder (what `StableDiffusionXLPipeline.from_pretrained` reads)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from sdlora.models.base import Components

        index = read_index(path)
        if not index.get("text_encoder") or index["text_encoder"] == [None, None]:
            raise SdloraError(refiner_message(path.name))
        try:
            parts = Components(
                unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype),
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype),
                text_encoders={
                    "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype),
                    "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                        path, subfolder="text_encoder_2", torch_dtype=dtype),
                },
                tokenizers={
                    "text_encoder": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                    "text_encoder_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                },
                scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
                family=cls,
            )
        except (OSError, ValueError, KeyError) as e:
            raise SdloraError(f"could not load the SDXL base from {path}: {str(e).splitlines()[0]}") from None
        check_parts(parts.unet, parts.text_encoders, path.name)
        return parts

    @classmethod
    def from_components(cls, parts: Components) -> SDXLFamily:
        family = cls(VERSION, parts.scheduler.config.get("prediction_type", "epsilon") == "v_prediction")
        family._names = SgmNameTable.from_unet_config(parts.unet.config)  # the layout kohya's SGM names follow
        return family

    # ---- the file
    @property
    def te_prefixes(self) -> dict[str, str]:
        return {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}

    @property
    def names(self) -> SgmNameTable:
        """kohya names the SDXL UNet by its original (SGM) layout: lora_unet_input_blocks_4_1_..."""
        return getattr(self, "_names", SDXL_NAMES)

    # ---- conditioning
    def encode_text(self, base: BaseModel, input_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Penultimate hidden states of both encoders side by side, and encoder 2's pooled projection."""
        hidden = []
        for key in self.text_encoder_keys:
            te = base.text_encoders[key]
            out = te(input_ids[key].to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": out.text_embeds}

    def unet_kwargs(self, text: dict[str, torch.Tensor], size_cond: torch.Tensor | None = None) -> dict:
        if size_cond is None:
            raise ValueError("SDXL conditioning needs the time ids (size_conditioning) of every example")
        pooled = text["text_embeds"]
        time_ids = size_cond.to(pooled.device, pooled.dtype)
        if time_ids.ndim == 1:
            time_ids = time_ids.expand(pooled.shape[0], -1)
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def size_conditioning(self, original_hw: tuple[int, int], crop_tl: tuple[int, int],
                          target_hw: tuple[int, int]) -> torch.Tensor:
        """SDXL's six time ids: original (h, w), crop top-left (top, left), target (h, w), as in the pipeline."""
        return time_ids(original_hw, crop_tl, target_hw)

    # ---- generation
    def pipeline(self, base: BaseModel, scheduler):
        """StableDiffusionXLPipeline over the base's modules; it derives the time ids from the requested size."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=base.vae, unet=base.unet, scheduler=scheduler,
            text_encoder=base.text_encoders["text_encoder"], text_encoder_2=base.text_encoders["text_encoder_2"],
            tokenizer=base.tokenizers["text_encoder"], tokenizer_2=base.tokenizers["text_encoder_2"],
            force_zeros_for_empty_prompt=True,  # SDXL base's setting: an empty negative prompt is all zeros
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def time_ids(original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)


def refiner_message(name: str) -> str:
    return (f"{name} is an SDXL refiner (one OpenCLIP text encoder, aesthetic-score conditioning): it only polishes "
            "SDXL images; sdlora trains on base models (SD 1.x, SD 2.x, SDXL base and derivatives such as Pony or "
            "Illustrious)")


def check_parts(unet, text_encoders: dict, name: str) -> None:
    """The UNet must take what the two encoders give: context width, pooled width + 6 time ids."""
    te1, te2 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]
    context = te1.config.hidden_size + te2.config.hidden_size
    if unet.config.cross_attention_dim != context:
        raise SdloraError(f"{name}: the UNet's cross-attention width {unet.config.cross_attention_dim} is not the "
                          f"two text encoders' {te1.config.hidden_size} + {te2.config.hidden_size}")
    added = unet.config.projection_class_embeddings_input_dim
    want = te2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    if unet.config.addition_embed_type != "text_time" or added != want:
        raise SdloraError(f"{name}: the UNet's added conditioning ({added} wide) is not SDXL's pooled text embedding "
                          f"+ 6 time ids ({want}); refiners (5 time ids) and other variants do not train here")


def read_index(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise SdloraError(f"unreadable model_index.json in {path}: {e}") from None
