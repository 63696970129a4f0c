"""Write an SD1.5-architecture diffusers folder with random weights (real shapes: 512 px, 860M-parameter UNet).

No real weights can be downloaded here; this gives benchmarks and single-file tests the exact
module layout, sizes and compute of Stable Diffusion 1.5. `--single-file X.safetensors` also writes it
as one checkpoint in the original (LDM) key layout, the way SD1.5 files are downloaded.

Usage: python scripts/make_random_sd15.py OUT_DIR [--dtype fp16] [--device cuda] [--single-file OUT.safetensors]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdlora.models.tiny import SCHEDULER_CONFIG, TOKENIZER_DIR  # noqa: E402

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512, scaling_factor=0.18215,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


# A small model of the same layout, for CPU smoke tests of the benchmark scripts.
SMALL = (
    UNET | dict(sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8),
    VAE | dict(sample_size=64, block_out_channels=(16, 16, 32, 32), norm_num_groups=8),
    TEXT | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64),
)


def write_random_base(out: Path, dtype: torch.dtype = torch.float16, device: str = "cpu", small: bool = False) -> Path:
    """Random-weight SD1.5-layout diffusers folder (seed 0); `small` shrinks every width for CPU tests."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg = SMALL if small else (UNET, VAE, TEXT)
    out = Path(out)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()):,}")
        unet.to(dtype).save_pretrained(out / "unet")
        del unet
        AutoencoderKL(**vae_cfg).to(dtype).save_pretrained(out / "vae")
        CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype).save_pretrained(out / "text_encoder")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(out / "tokenizer")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--single-file", metavar="OUT.safetensors", help="also write an LDM-layout single-file checkpoint")
    ap.add_argument("--small", action="store_true", help="tiny widths, same layout (for CPU tests)")
    args = ap.parse_args()
    out, dtype = Path(args.out), {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    write_random_base(out, dtype, args.device, args.small)
    print(f"wrote {out}")
    if args.single_file:
        from sdlora.models.base import load_base
        from sdlora.models.single_file import save_single_file

        save_single_file(load_base(str(out), "fp32" if dtype == torch.float32 else "fp16"), args.single_file, dtype)
        print(f"wrote {args.single_file}")


if __name__ == "__main__":
    main()
