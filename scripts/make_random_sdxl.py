"""Write an SDXL-architecture diffusers folder with random weights (SDXL 1.0 base's real configs: a 2.6B-parameter
UNet, CLIP ViT-L and OpenCLIP bigG text encoders, the SDXL VAE), for benchmarks at 1024 px.

No real weights can be downloaded here; the configs are the ones bundled in sdlora/assets/sdxl, so module layout,
sizes and compute are SDXL's. `--small` writes the same layout at tiny widths (CPU smoke tests).

Usage: python scripts/make_random_sdxl.py OUT_DIR [--dtype bf16] [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdlora.models.sdxl import CONFIG_DIR, bundled_config  # noqa: E402
from sdlora.models.tiny import TOKENIZER_DIR  # noqa: E402

# The same block pattern at CPU size: SDXL's down/up block types, transformer depth growing with depth, linear
# proj_in/out, text-time conditioning (pooled width + 6 time ids), two encoders whose widths add up to the context.
SMALL_TEXT_1 = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
                "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
SMALL_TEXT_2 = SMALL_TEXT_1 | {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3, "hidden_act": "gelu",
                               "projection_dim": 24, "pad_token_id": 1}
SMALL_UNET_CHANGES = {"sample_size": 16, "block_out_channels": [16, 32, 32], "transformer_layers_per_block": [1, 1, 2],
                      "attention_head_dim": [2, 2, 4], "cross_attention_dim": 80, "addition_time_embed_dim": 8,
                      "projection_class_embeddings_input_dim": 24 + 6 * 8, "norm_num_groups": 8}
SMALL_VAE_CHANGES = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 128}


def configs(small: bool) -> dict[str, dict]:
    """unet, vae, text_encoder, text_encoder_2 configs: SDXL 1.0 base's, or the small variant."""
    out = {k: bundled_config(k) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    if small:
        out["unet"] |= SMALL_UNET_CHANGES
        out["vae"] |= SMALL_VAE_CHANGES
        out["text_encoder"], out["text_encoder_2"] = dict(SMALL_TEXT_1), dict(SMALL_TEXT_2)
    return out


def write_random_sdxl(out: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", small: bool = False) -> Path:
    """Random-weight SDXL-layout diffusers folder (seed 0) that StableDiffusionXLPipeline.from_pretrained loads."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = configs(small)
    out = Path(out)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()):,}", flush=True)
        unet.to(dtype).save_pretrained(out / "unet")
        del unet
        AutoencoderKL(**cfg["vae"]).to(dtype).save_pretrained(out / "vae")
        CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).to(dtype).save_pretrained(out / "text_encoder")
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        te2.to(dtype).save_pretrained(out / "text_encoder_2")
        del te2
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(out / "tokenizer")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!").save_pretrained(out / "tokenizer_2")  # as SDXL's
    EulerDiscreteScheduler.from_config(bundled_config("scheduler")).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text((CONFIG_DIR / "model_index.json").read_text())
    json.loads((out / "model_index.json").read_text())  # the bundled index is valid JSON
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny widths, same layout (for CPU tests)")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    write_random_sdxl(Path(args.out), dtype, args.device, args.small)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
