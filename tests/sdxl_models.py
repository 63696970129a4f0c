"""Random SDXL-shaped models for the file tests: the real SDXL configs on the meta device (sizes and counts, no
memory) and a small random model with SDXL's block pattern (two CLIP encoders, text-time conditioning, linear
proj_in/out, transformer depth growing with depth, no attention in the outer blocks)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "sdlora" / "assets"
SDXL_CONFIGS = ASSETS / "sdxl"

VOCAB = 1000  # the tests feed token ids directly; the tokenizers are there for the pipeline's constructor
SMALL_UNET = dict(
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 4), cross_attention_dim=96,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
)


def meta_sdxl():
    """(unet, text_encoder, text_encoder_2) of SDXL 1.0 base from sdlora/assets/sdxl, on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2"))
    return unet, te1, te2


def small_sdxl(seed: int = 0) -> dict:
    """Components of a small random SDXL-shaped model (fp32, CPU), keyed by diffusers' pipeline names."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    clip = dict(vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                pad_token_id=VOCAB - 1)
    parts = {
        "unet": UNet2DConditionModel(**SMALL_UNET),
        "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, projection_dim=32, **clip)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, projection_dim=32,
            hidden_act="gelu", **clip)),
        "vae": AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1),
        "scheduler": EulerDiscreteScheduler.from_pretrained(SDXL_CONFIGS / "scheduler"),
        "tokenizer": CLIPTokenizer.from_pretrained(ASSETS / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(ASSETS / "tokenizer"),
    }
    for key in ("unet", "text_encoder", "text_encoder_2", "vae"):
        parts[key].eval().requires_grad_(False)
    return parts


def _copies(parts: dict) -> dict:
    """Deep copies of the models; the tokenizers (read-only, slow to copy) are shared."""
    return {k: v if k.startswith("tokenizer") else copy.deepcopy(v) for k, v in parts.items()}


def sdxl_pipeline(parts: dict):
    """diffusers' StableDiffusionXLPipeline over deep copies of `parts` (what diffusers' loader may modify)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**_copies(parts))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_base(parts: dict, name: str = "small-sdxl"):
    """An sdlora BaseModel of the SDXL family over deep copies of `parts`."""
    from sdlora.models.base import BaseModel, Components
    from sdlora.models.sdxl import SDXLFamily

    p = _copies(parts)
    tes = {"text_encoder": p["text_encoder"], "text_encoder_2": p["text_encoder_2"]}
    toks = {"text_encoder": p["tokenizer"], "text_encoder_2": p["tokenizer_2"]}
    family = SDXLFamily.from_components(Components(p["unet"], p["vae"], tes, toks, p["scheduler"], SDXLFamily))
    return BaseModel(name=name, path=Path(name), family=family, unet=p["unet"], vae=p["vae"], text_encoders=tes,
                     tokenizers=toks, noise_scheduler=p["scheduler"], dtype=torch.float32)


def outputs(unet, te1, te2, seed: int = 0) -> dict[str, torch.Tensor]:
    """The UNet's prediction under SDXL conditioning and both text encoders' outputs, for fixed random inputs
    (one 8x8 latent, 16 tokens: every layer runs, in little time)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 16, SMALL_UNET["cross_attention_dim"], generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = torch.randint(0, VOCAB, (1, 16), generator=g)
    with torch.no_grad():
        out2 = te2(ids, output_hidden_states=True)
        return {
            "unet": unet(x, torch.tensor([500]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample,
            "te1": te1(ids)[0], "te2": out2.hidden_states[-2], "te2_pooled": out2.text_embeds,
        }
