"""The embedded tiny base: Stable Diffusion 1.x architecture at CPU size, pretrained.

The configs below define it; `scripts/build_tiny_base.py` trains it on the procedural world
(sdlora/world.py) and the result ships as an ordinary diffusers folder in fp16 under
assets/tiny-base, loaded through exactly the same code as any other diffusers folder.
Module names and block layout equal SD1.5's (16 transformer blocks, 1x1-conv proj_in/proj_out,
12 CLIP layers), so LoRA keys are the real ones.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "tokenizer"

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [48, 96, 96, 96],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The looks base (issue 15, scripts/tiny_looks_stages.py): 32x32 latents for 128-px images from a 4x VAE (3 levels),
# a wider UNet for fifteen looks; the text encoder is TEXT_CONFIG's (the CLIP token table kept: 6.3 MB in fp16).
# No attention at the 32x32 level (as SDXL has none at its highest resolution): 1,024-token self-attention there cost
# 4.5x the whole step on a CPU for 18% of the FLOPs; the 16x16 and 8x8 levels carry the text.
LOOKS_UNET_CONFIG = UNET_CONFIG | {"sample_size": 32, "block_out_channels": [64, 128, 128, 128],
                                   "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
LOOKS_VAE_CONFIG = VAE_CONFIG | {"down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
                                 "block_out_channels": [32, 64, 128]}
# The same noise schedule SD1.5 trains with (scaled_linear betas, epsilon prediction).
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


SHIPPED_DIR = Path(__file__).parents[1] / "assets" / "tiny-base"


# `--base NAME` -> the folder shipped in the package
# (tiny-looks: issue 15's base, 32x32 latents, trained on many looks; scripts/build_tiny_base.py --world looks made it)
TINY_BASES = {"tiny": SHIPPED_DIR, "tiny-xl": Path(__file__).parents[1] / "assets" / "tiny-xl-base",
              "tiny-looks": Path(__file__).parents[1] / "assets" / "tiny-looks-base"}


def tiny_base_dir(name: str = "tiny") -> Path:
    """A pretrained tiny base shipped in the package (scripts/build_tiny_base.py made it)."""
    if name == "tiny-xl":  # until its GPU build has run, it says so (sdlora/models/tiny_xl.py)
        from sdlora.models.tiny_xl import tiny_xl_base_dir

        return tiny_xl_base_dir()
    folder = TINY_BASES[name]
    if not (folder / "model_index.json").exists():
        from sdlora.errors import SdloraError

        raise SdloraError(f"the embedded {name} base is missing from {folder}; reinstall sdlora")
    return folder
