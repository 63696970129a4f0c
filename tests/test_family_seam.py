"""The model-family seam: a stand-in second family (random weights, two text encoders, one module of its own)
trains, saves and generates through the unchanged loop, file writer and sampler."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora import models
from sdlora.models.family import ModelFamily

TOKENIZER = Path(__file__).resolve().parents[1] / "sdlora" / "assets" / "tokenizer"


class DualClipFamily(ModelFamily):
    """Two small CLIP encoders whose hidden states are concatenated into the UNet's context."""

    name = "dual-clip"
    text_encoder_keys = ("text_encoder", "text_encoder_2")

    @classmethod
    def matches(cls, components):
        return "text_encoder_2" in components

    @classmethod
    def load_folder(cls, path, dtype, vae_dtype):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from sdlora.models.base import Components

        tes = {k: CLIPTextModel.from_pretrained(path, subfolder=k, torch_dtype=dtype) for k in cls.text_encoder_keys}
        toks = {k: CLIPTokenizer.from_pretrained(path, subfolder=k.replace("text_encoder", "tokenizer"))
                for k in cls.text_encoder_keys}
        return Components(UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype),
                          AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype), tes, toks,
                          DDPMScheduler.from_pretrained(path, subfolder="scheduler"), cls)

    @classmethod
    def from_components(cls, parts):
        return cls("sd_v1", False)

    @property
    def te_prefixes(self):
        return {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}

    def encode_text(self, base, input_ids):
        hidden = [base.text_encoders[k](input_ids[k].to(base.text_encoders[k].device))[0] for k in self.text_encoder_keys]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1)}

    def prompt_kwargs(self, base, prompts, negatives):
        with torch.no_grad():
            pos = self.encode_text(base, self.tokenize(base, prompts))["encoder_hidden_states"]
            neg = self.encode_text(base, self.tokenize(base, negatives))["encoder_hidden_states"]
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


def _make_folder(root: Path) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=64,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=8,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4).save_pretrained(root / "vae")
    te = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    for k in ("text_encoder", "text_encoder_2"):
        CLIPTextModel(te).save_pretrained(root / k)
        shutil.copytree(TOKENIZER, root / k.replace("text_encoder", "tokenizer"))
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    index = {"_class_name": "StandInPipeline"} | {k: ["x", "y"] for k in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                                           "tokenizer", "tokenizer_2", "scheduler")}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "FAMILIES", [DualClipFamily, *models.FAMILIES])
    return _make_folder(tmp_path / "base")


@pytest.mark.parametrize("text_encoder", [True, False])
def test_a_second_family_trains_saves_and_generates_unchanged(stand_in, tmp_path, style_dir, text_encoder):
    from safetensors import safe_open

    from sdlora import LoraMixer, generate_images, load_base, make_config, train

    cfg = make_config(images=str(style_dir), base=str(stand_in), output=str(tmp_path / "out"), steps=3, rank=2,
                      unet_lr=1e-2, text_encoder=text_encoder, progress=False, resolution=64)
    result = train(cfg, warn=lambda m: None, info=lambda m: None)
    with safe_open(str(result.adapter), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    prefixes = {n.split("_")[1] for n in names}
    assert prefixes == ({"unet", "te1", "te2"} if text_encoder else {"unet"})
    assert sum(n.startswith("lora_te2_") for n in names) == (2 * 4 if text_encoder else 0)  # 2 layers x q/k/v/out
    assert meta["ss_network_dim"] == "2"  # read from the modules written

    base = load_base(str(stand_in))
    assert isinstance(base.family, DualClipFamily)
    plain = generate_images(base, "sks sketch, a red circle", seed=3, steps=2, width=64, height=64)[0]
    mixer = LoraMixer(base)
    mixer.load(result.adapter, strength=1.0)
    assert len(mixer.loaded[next(iter(mixer.loaded))]) == len(names)  # every module of the file found its layer
    styled = generate_images(base, "sks sketch, a red circle", seed=3, steps=2, width=64, height=64)[0]
    mixer.set_strength(next(iter(mixer.loaded)), 0.0)
    again = generate_images(base, "sks sketch, a red circle", seed=3, steps=2, width=64, height=64)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(again))  # strength 0 is the base, bit for bit
    assert not np.array_equal(np.asarray(plain), np.asarray(styled))
