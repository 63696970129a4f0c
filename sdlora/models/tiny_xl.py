"""The embedded tiny SDXL base (`--base tiny-xl`): SDXL's architecture at CPU size, pretrained like `tiny`.

What makes it SDXL and not a small SD1: two text encoders (CLIPTextModel + CLIPTextModelWithProjection) whose
penultimate hidden states are concatenated into the context, the second one's pooled projection plus six time ids
(original size, crop top-left, target size) in `added_cond_kwargs`, three UNet levels with SDXL's block types and
transformer depths (1, 2, 10: 70 transformer blocks, Linear proj_in/proj_out) and 12 + 32 text-encoder layers, so a
LoRA on it has SDXL's module names and counts (722 UNet + 72 + 192 text-encoder modules). Only the widths are small.

The VAE is tiny's (same architecture as SD's; its scaling factor is re-measured by the builder the way SDXL's
0.13025 was chosen: one over the latent standard deviation), text encoder 1 starts from tiny's. The configs live here;
`scripts/build_tiny_base.py --family sdxl` trains the rest and writes `assets/tiny-xl-base` in fp16.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.models.tiny import TEXT_CONFIG

SHIPPED_DIR = Path(__file__).parents[1] / "assets" / "tiny-xl-base"

TEXT_CONFIG_1 = dict(TEXT_CONFIG)  # tiny's CLIP text encoder (its weights are the starting point)
TEXT_CONFIG_2 = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 32,  # SDXL's OpenCLIP bigG depth: kohya's te2 count (192) stays the real one
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",  # OpenCLIP's, where CLIP ViT-L uses quick_gelu
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
TIME_EMBED_DIM = 32  # SDXL: 256 per time id
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 48, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [2, 3, 4],  # diffusers' name for the head count (SDXL: 5, 10, 20); 16 channels per head
    "cross_attention_dim": TEXT_CONFIG_1["hidden_size"] + TEXT_CONFIG_2["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": TEXT_CONFIG_2["projection_dim"] + 6 * TIME_EMBED_DIM,
    "norm_num_groups": 16,
}


def tiny_xl_base_dir() -> Path:
    """The pretrained tiny SDXL base, once the builder has made it; until then one line says how."""
    if not (SHIPPED_DIR / "model_index.json").exists():
        raise SdloraError(
            f"the tiny-xl base is not built yet ({SHIPPED_DIR} is empty): it is made by "
            "`python scripts/build_tiny_base.py --family sdxl --out sdlora/assets/tiny-xl-base` on a GPU; "
            "meanwhile use --base tiny, or an SDXL folder or .safetensors file"
        )
    return SHIPPED_DIR
