"""Random-weight SDXL-architecture models small enough for CPU tests, written as real diffusers folders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from sdlora.models.tiny import TOKENIZER_DIR

TEXT_1 = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
          "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
TEXT_2 = TEXT_1 | {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3,
                   "hidden_act": "gelu", "projection_dim": 24, "pad_token_id": 1}
UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 2, 4], "cross_attention_dim": 80,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8, "norm_num_groups": 8,
}
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
       "latent_channels": 4, "norm_num_groups": 8, "sample_size": 128, "scaling_factor": 0.13025}
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
             "timestep_spacing": "leading"}
INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
         "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random init leaves norms at 1/0 and some layers at zero; noise everywhere makes every weight count in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def write_sdxl_folder(root: Path, seed: int = 0, prediction_type: str = "epsilon", unet: dict | None = None,
                      text_2: dict | None = None) -> Path:
    """A complete random SDXL diffusers folder (fp32) that StableDiffusionXLPipeline.from_pretrained loads."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    root = Path(root)
    _perturb(UNet2DConditionModel(**(unet or UNET)), seed).save_pretrained(root / "unet")
    _perturb(AutoencoderKL(**VAE), seed + 1).save_pretrained(root / "vae")
    _perturb(CLIPTextModel(CLIPTextConfig(**TEXT_1)), seed + 2).save_pretrained(root / "text_encoder")
    _perturb(CLIPTextModelWithProjection(CLIPTextConfig(**(text_2 or TEXT_2))), seed + 3).save_pretrained(root / "text_encoder_2")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(root / "tokenizer")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!").save_pretrained(root / "tokenizer_2")
    EulerDiscreteScheduler.from_config(SCHEDULER | {"prediction_type": prediction_type}).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(INDEX, indent=2))
    return root


def shared_sdxl_folder(tmp_path_factory) -> Path:
    """One random SDXL folder per test session, whichever test file asks first (writing one takes ~10 s)."""
    root = tmp_path_factory.getbasetemp() / "sdxl-shared"
    if not (root / "model_index.json").exists():
        write_sdxl_folder(root)
    return root


def sd2_parts(seed: int) -> SimpleNamespace:
    """A small random SD 2.x-shaped base: linear proj_in/out, one OpenCLIP-style (gelu) text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=48, attention_head_dim=[2, 4], use_linear_projection=True)
    te = CLIPTextModel(CLIPTextConfig(**(TEXT_1 | {"hidden_size": 48, "num_attention_heads": 3, "hidden_act": "gelu"})))
    return SimpleNamespace(unet=unet.eval(), vae=AutoencoderKL(**VAE).eval(), text_encoders={"text_encoder": te.eval()})
