"""The SDXL family: conditioning equal to diffusers' pipeline, time ids, the real and tiny configs, tiny-xl's state."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.models.sdxl import SDXLFamily, bundled_config, check_parts
from tests.sdxl_folder import shared_sdxl_folder


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return shared_sdxl_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def parts(sdxl_dir):
    return SDXLFamily.load_folder(sdxl_dir, torch.float32, torch.float32)


@pytest.fixture(scope="module")
def base(parts):
    return SimpleNamespace(text_encoders=parts.text_encoders, tokenizers=parts.tokenizers, unet=parts.unet, vae=parts.vae)


@pytest.fixture(scope="module")
def pipe(parts, base):
    from diffusers import EulerDiscreteScheduler

    return SDXLFamily("sdxl_base_v1-0", False).pipeline(base, EulerDiscreteScheduler.from_config(parts.scheduler.config))


def test_family_facts(parts):
    fam = SDXLFamily.from_components(parts)
    assert (fam.version, fam.v_prediction, fam.name) == ("sdxl_base_v1-0", False, "sdxl")
    assert fam.te_prefixes == {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    assert fam.architecture == "stable-diffusion-xl-v1-base/lora"
    assert fam.names.unet_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert SDXLFamily.matches({"unet", "vae", "text_encoder", "text_encoder_2"})
    assert not SDXLFamily.matches({"unet", "vae", "text_encoder"})
    assert not SDXLFamily.matches({"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"})  # SD3


def test_encode_text_equals_the_pipelines_encode_prompt(base, pipe):
    fam = SDXLFamily("sdxl_base_v1-0", False)
    prompts = ["a red circle on a white background", "two blue squares"]
    ids = fam.tokenize(base, prompts)
    assert ids["text_encoder_2"][0, -1] == 0  # OpenCLIP's tokenizer pads with '!' (id 0), CLIP's with end-of-text
    assert ids["text_encoder"][0, -1] == 49407
    with torch.no_grad():
        text = fam.encode_text(base, ids)
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert text["encoder_hidden_states"].shape == (2, 77, 32 + 48)
    assert text["text_embeds"].shape == (2, 24)
    assert torch.equal(text["encoder_hidden_states"], ref)
    assert torch.equal(text["text_embeds"], ref_pooled)


def test_time_ids_from_size_and_crop_match_the_pipeline(base, pipe):
    fam = SDXLFamily("sdxl_base_v1-0", False)
    ids = fam.size_conditioning((768, 1024), (32, 0), (1024, 1024))
    assert ids.tolist() == [768, 1024, 32, 0, 1024, 1024]
    ref = pipe._get_add_time_ids((768, 1024), (32, 0), (1024, 1024), torch.float32,
                                 text_encoder_projection_dim=base.text_encoders["text_encoder_2"].config.projection_dim)
    assert torch.equal(ids[None], ref)


def test_unet_kwargs_drive_the_unet_as_the_pipeline_does(base, parts):
    fam = SDXLFamily("sdxl_base_v1-0", False)
    with torch.no_grad():
        text = fam.encode_text(base, fam.tokenize(base, ["a star", "a hexagon"]))
        sizes = torch.stack([fam.size_conditioning((128, 128), (0, 0), (128, 128)),
                             fam.size_conditioning((512, 384), (16, 8), (128, 128))])
        kwargs = fam.unet_kwargs(text, sizes)
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = parts.unet(x, 500, **kwargs).sample
        ref = parts.unet(x, 500, encoder_hidden_states=text["encoder_hidden_states"],
                            added_cond_kwargs={"text_embeds": text["text_embeds"], "time_ids": sizes}).sample
        other = parts.unet(x, 500, **fam.unet_kwargs(text, sizes.flip(0))).sample
    assert torch.equal(out, ref)
    assert not torch.allclose(out, other)  # the time ids really condition the UNet
    with pytest.raises(ValueError, match="time ids"):
        fam.unet_kwargs(text, None)


def _meta_sdxl(configs: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        return SimpleNamespace(
            unet=UNet2DConditionModel.from_config(configs["unet"]),
            text_encoders={"text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
                           "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))})


def _bundled() -> dict:
    return {n: bundled_config(n) for n in ("unet", "text_encoder", "text_encoder_2", "vae", "scheduler")}


def test_bundled_configs_are_sdxl_1_0():
    """Parameter counts of SDXL 1.0 base (UNet 2.567B, CLIP-L 123M, bigG 695M) and its conditioning widths."""
    configs = _bundled()
    m = _meta_sdxl(configs)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m.unet) == 2_567_463_684
    assert count(m.text_encoders["text_encoder"]) == 123_060_480
    assert count(m.text_encoders["text_encoder_2"]) == 694_659_840
    check_parts(m.unet, m.text_encoders, "sdxl")  # 768 + 1280 = 2048 context; 1280 pooled + 6 x 256 time ids = 2816
    assert configs["vae"]["scaling_factor"] == 0.13025 and configs["unet"]["sample_size"] * 8 == 1024


def test_tiny_xl_has_sdxls_module_names_and_counts():
    """kohya's counts for SDXL: 722 UNet modules (all-linear), 72 + 192 text-encoder modules (attn + mlp)."""
    from sdlora.lora.targets import text_encoder_targets, unet_targets
    from sdlora.models import tiny_xl

    m = _meta_sdxl({"unet": tiny_xl.UNET_CONFIG, "text_encoder": tiny_xl.TEXT_CONFIG_1,
                    "text_encoder_2": tiny_xl.TEXT_CONFIG_2})
    check_parts(m.unet, m.text_encoders, "tiny-xl")
    unet = unet_targets(m.unet, "all-linear")
    real = unet_targets(_meta_sdxl(_bundled()).unet, "all-linear")
    assert len(unet) == 722 and [t.kohya_name for t in unet] == [t.kohya_name for t in real]
    assert len(text_encoder_targets(m.text_encoders["text_encoder"], "lora_te1", mlp=True)) == 72
    assert len(text_encoder_targets(m.text_encoders["text_encoder_2"], "lora_te2", mlp=True)) == 192
    params = sum(p.numel() for mod in (m.unet, *m.text_encoders.values()) for p in mod.parameters())
    assert params * 2 + 2_600_000 < 30e6  # fp16, with tiny's 2.5 MB VAE: the shipping limit


def test_tiny_xl_is_refused_until_built(monkeypatch, tmp_path):
    from sdlora.models import tiny_xl

    monkeypatch.setattr(tiny_xl, "SHIPPED_DIR", tmp_path / "tiny-xl-base")
    with pytest.raises(SdloraError) as e:
        tiny_xl.tiny_xl_base_dir()
    assert "not built yet" in str(e.value) and "build_tiny_base.py --family sdxl" in str(e.value)
    assert "\n" not in str(e.value)


def test_refiner_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                           "text_encoder": [None, None],
                                                           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(SdloraError, match="SDXL refiner"):
        SDXLFamily.load_folder(tmp_path, torch.float32, torch.float32)


def test_shipped_tiny_xl_loads_as_sdxl_with_its_recorded_build():
    """The shipped tiny-xl is the builder's output: SDXL family, its configs, the scaling factor its log recorded,
    fp16 files within the 30 MB limit, and a pooled + time-id conditioned UNet."""
    import json

    from sdlora.models import tiny_xl
    from sdlora.models.base import load_base

    folder = tiny_xl.tiny_xl_base_dir()
    log = json.loads((folder / "build_log.json").read_text())
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert size < 30e6
    base = load_base("tiny-xl")
    assert base.family.name == "sdxl"
    assert base.vae.config.scaling_factor == pytest.approx(log["vae_scaling_factor"], rel=1e-6)
    assert base.unet.config.addition_embed_type == "text_time"
    for key, value in tiny_xl.UNET_CONFIG.items():  # the shipped UNet is the configured one
        got = base.unet.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (list(value) if isinstance(value, (list, tuple)) else value), key
    assert log["eval_prompts"] == 200 and 0 <= log["eval_colour_acc"] <= 1
    assert log["eval_colour_acc"] >= 0.8 and log["eval_shape_acc"] >= 0.7  # the recorded build meets tiny's bar
