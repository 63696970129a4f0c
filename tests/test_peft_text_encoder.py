"""A text-encoder LoRA made the way diffusers' DreamBooth-LoRA script makes one (transformers' `add_adapter` with a
peft LoraConfig, saved by `save_lora_weights`) loads in sdlora and gives the same text embeddings.

This is the path that needs a working peft/transformers pair: transformers 5.24+ refuses `add_adapter` with
peft < 0.22, which is why pyproject's test extra pins transformers below 5.24 while peft 0.22 is not released.
"""

from __future__ import annotations

import pytest
import torch

from sdlora.formats.kohya import load_adapter
from sdlora.lora.mixer import LoraMixer
from sdlora.models.base import load_base

peft = pytest.importorskip("peft")


def test_peft_text_encoder_lora_loads_with_the_same_embeddings(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    theirs = load_base("tiny")
    te = theirs.text_encoders["text_encoder"]
    modules = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=modules, init_lora_weights=False)  # B random, not 0
    te.add_adapter(config)  # transformers' PeftAdapterMixin: what needs peft new enough for this transformers
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, text_encoder_lora_layers=get_peft_model_state_dict(te),
        text_encoder_lora_adapter_metadata=config.to_dict(),
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    adapter = load_adapter(file)
    layers = te.config.num_hidden_layers
    assert len(adapter.modules) == 6 * layers  # attention and MLP of every layer: kohya's 72 on CLIP-L's 12 layers
    assert all(name.startswith("lora_te_text_model_encoder_layers_") for name in adapter.modules)
    assert {m.alpha for m in adapter.modules.values()} == {4.0}  # read from the saved adapter metadata

    ours = load_base("tiny")
    LoraMixer(ours).add(adapter, 1.0)
    ids = ours.family.tokenize(ours, ["sks pastel, a large red circle in the center of a white background"])["text_encoder"]
    plain = load_base("tiny").text_encoders["text_encoder"]
    with torch.no_grad():
        expected, got, before = te(ids)[0], ours.text_encoders["text_encoder"](ids)[0], plain(ids)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - before).abs().max() > 1e-3  # the adapter changed the embeddings: the match is not trivial
