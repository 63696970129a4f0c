"""Module selection and counts on the real SD1.5 architecture (built on the meta device: no memory)."""

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.lora.targets import text_encoder_targets, unet_targets

SD15_UNET = dict(
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
)


@pytest.fixture(scope="module")
def sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    return unet, te


def test_sd15_counts_match_kohya(sd15):
    unet, te = sd15
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the real SD1.5 UNet size
    assert len(unet_targets(unet, "all-linear")) == 192  # kohya's LoRA-LierLa count for SD1.x
    assert len(unet_targets(unet, "attn")) == 128
    assert len(unet_targets(unet, "cross-attn")) == 64
    assert len(text_encoder_targets(te, mlp=True)) == 72
    assert len(text_encoder_targets(te)) == 48
    names = {t.kohya_name for t in unet_targets(unet, "all-linear")}
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in {t.kohya_name for t in text_encoder_targets(te, mlp=True)}


def test_sd15_conv_counts(sd15):
    """LoCon on SD1.5: 22 ResnetBlock2D x (conv1, conv2, time_emb_proj) + 14 conv_shortcut + 3 down- + 3 upsamplers."""
    from sdlora.lora.targets import uses_conv_rank

    unet = sd15[0]
    conv = unet_targets(unet, "conv")
    assert len(conv) == 86
    assert len(unet_targets(unet, "all-linear,conv")) == 278  # kohya's LoRA-C3Lier set for SD1.x
    assert len(unet_targets(unet, "conv,cross-attn,cross-attn")) == 86 + 64  # a union: duplicates count once
    assert sum(uses_conv_rank(t.layer) for t in conv) == 50  # the 3x3 convs take --conv-rank
    names = {t.kohya_name for t in conv}
    assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_up_blocks_3_resnets_2_conv_shortcut",
            "lora_unet_mid_block_resnets_1_time_emb_proj", "lora_unet_up_blocks_2_upsamplers_0_conv"} <= names
    assert not any(n.startswith(("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding")) for n in names)


def test_a_renamed_layer_fails_loudly(sd15):
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    attn = te.get_submodule("encoder.layers.1.self_attn")
    attn.query = attn.q_proj  # simulate a library rename of one projection
    del attn.q_proj
    with pytest.raises(SdloraError, match="room for 8 .* but 7 were found"):
        text_encoder_targets(te)
    with pytest.raises(SdloraError, match="unknown --targets"):
        unet_targets(sd15[0], "everything")
