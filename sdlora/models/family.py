"""What differs between Stable Diffusion generations, behind one interface.

The training loop, the generator, the CUDA-graph replay and the file writer only talk to a `ModelFamily`: it
tokenizes prompts, turns token ids into the UNet's keyword arguments (any nested structure; the step and the graph
replay flatten it), names the text encoders and their kohya prefixes, builds the diffusers pipeline, knows the
native resolution, the modelspec architecture and the kohya name table. Adding a family is one module that
subclasses `ModelFamily` plus one line in `FAMILIES` (sdlora/models/__init__.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from sdlora.formats.metadata import modelspec_architecture
from sdlora.formats.names import NameTable
from sdlora.util import warn_once

if TYPE_CHECKING:
    from sdlora.models.base import BaseModel, Components


class ModelFamily:
    """One SD generation. Subclasses set the class attributes and override the hooks that differ."""

    name: ClassVar[str]  # registry key and what `inspect` prints: "sd1", "sdxl"
    text_encoder_keys: ClassVar[tuple[str, ...]] = ("text_encoder",)  # BaseModel.text_encoders keys (diffusers names)
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"

    def __init__(self, version: str, v_prediction: bool):
        self.version = version  # kohya's ss_base_model_version: "sd_v1", "sd_v2", "sdxl_base_v1-0"
        self.v_prediction = v_prediction

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.version!r}, v_prediction={self.v_prediction})"

    # ---- recognising and loading
    @classmethod
    def matches(cls, components: set[str]) -> bool:
        """Whether a diffusers folder with these model_index components is of this family."""
        raise NotImplementedError

    @classmethod
    def load_folder(cls, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        raise NotImplementedError

    @classmethod
    def from_components(cls, parts: Components) -> ModelFamily:
        """The family instance (version, prediction type) for loaded components."""
        raise NotImplementedError

    # ---- the file
    @property
    def te_prefixes(self) -> dict[str, str]:
        """kohya LoRA prefix -> key of BaseModel.text_encoders."""
        return {"lora_te": "text_encoder"}

    @property
    def names(self) -> NameTable:
        """kohya module name <-> module path, for this family's UNet and text encoders."""
        return NameTable(unet_prefix="lora_unet", te_prefixes=self.te_prefixes)

    @property
    def architecture(self) -> str:
        """modelspec.architecture of a LoRA for this family."""
        return modelspec_architecture(self.version, self.v_prediction)[0]

    def native_resolution(self, base: BaseModel) -> int:
        return int(base.unet.config.sample_size) * base.vae_scale_factor

    # ---- conditioning
    def tokenize(self, base: BaseModel, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per text encoder, padded to the encoder's context (77)."""
        out = {}
        for key in self.text_encoder_keys:
            tok = base.tokenizers[key]
            warn_if_cut(tok, prompts)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            out[key] = ids.input_ids
        return out

    def encode_text(self, base: BaseModel, input_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token ids -> per-prompt text embeddings (batch first), what a frozen text encoder's cache keeps."""
        te = base.text_encoders["text_encoder"]
        return {"encoder_hidden_states": te(input_ids["text_encoder"].to(te.device))[0]}

    def unet_kwargs(self, text: dict[str, torch.Tensor], size_cond: torch.Tensor | None = None) -> dict:
        """Text embeddings (+ per-example size conditioning) -> the UNet's keyword arguments."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def size_conditioning(self, original_hw: tuple[int, int], crop_tl: tuple[int, int],
                          target_hw: tuple[int, int]) -> torch.Tensor | None:
        """Per-example micro-conditioning from an image's original size and crop (SDXL's time ids); None if unused."""
        return None

    def encode_prompt(self, base: BaseModel, cond: dict) -> dict:
        """What the training step calls: `cond` holds token ids per encoder (and "size_cond" where used)."""
        return self.unet_kwargs(self.encode_text(base, cond), cond.get("size_cond"))

    # ---- generation
    def pipeline(self, base: BaseModel, scheduler):
        """A diffusers pipeline of `pipeline_class` sharing the base's modules (no copy, no reload)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = cls(vae=base.vae, unet=base.unet, scheduler=scheduler, **self._pipeline_text_parts(base), **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompt_kwargs(self, base: BaseModel, prompts: list[str], negatives: list[str]) -> dict:
        """How prompts reach the pipeline: as text (the pipeline encodes them), or as `prompt_embeds` where a family
        encodes them itself (long prompts in chunks, encoders a pipeline does not know)."""
        return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}

    def _pipeline_text_parts(self, base: BaseModel) -> dict:
        return {"text_encoder": base.text_encoders["text_encoder"], "tokenizer": base.tokenizers["text_encoder"]}


def warn_if_cut(tokenizer, texts: list[str]) -> None:
    """Training encodes one 77-token window: say once that longer captions lose their end (generate keeps it)."""
    room = tokenizer.model_max_length - 2  # BOS and EOS take two places
    long = [t for t, ids in zip(texts, tokenizer(texts, add_special_tokens=False).input_ids) if len(ids) > room]
    if long:
        warn_once("long-caption", f"{len(long)} of {len(texts)} captions are longer than CLIP's {tokenizer.model_max_length} "
                  f"tokens and are cut there in training (e.g. '{long[0][:60]}...'); put the words that matter first")
