"""SDXL end to end on a random tiny SDXL base: load (folder and SGM file), train a LoRA through sdlora.train with
either, both or neither text encoder, generate with it through `sdlora generate --lora`; SD 2.x files train too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdlora.errors import SdloraError
from sdlora.models.base import load_base
from sdlora.models.sdxl import SDXLFamily
from sdlora.models.single_file_sgm_write import save_sgm_file
from tests.sdxl_folder import TEXT_1, TEXT_2, UNET, sd2_parts, shared_sdxl_folder


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return shared_sdxl_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_dir, tmp_path_factory):
    """A LoRA on both text encoders and the UNet, trained once for the tests that read or use it."""
    from tests.conftest import SKETCH

    images = tmp_path_factory.mktemp("xl-images")
    for png in sorted(SKETCH.glob("*.png"))[:8]:
        (images / png.name).write_bytes(png.read_bytes())
        (images / png.with_suffix(".txt").name).write_bytes(png.with_suffix(".txt").read_bytes())
    return _train(str(sdxl_dir), images, tmp_path_factory.mktemp("xl-lora") / "out")


def _train(base: str, images, out, **kw):
    from sdlora import make_config, train

    cfg = make_config(images=str(images), base=base, output=str(out), steps=3, rank=2, unet_lr=1e-2, progress=False,
                      resolution=64, targets="all-linear", seed=3, save_dtype="fp32", **kw)
    return train(cfg, warn=lambda m: None, info=lambda m: None).adapter


def _modules(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_load_base_reads_sdxl_folders_and_single_files(sdxl_dir, tmp_path):
    base = load_base(str(sdxl_dir))
    assert isinstance(base.family, SDXLFamily) and base.resolution == 128
    assert base.family.version == "sdxl_base_v1-0" and not base.family.v_prediction
    path = tmp_path / "xl.safetensors"
    save_sgm_file(base.unet, base.vae, base.text_encoders, path, dtype=torch.float32)
    single = load_base(str(path))
    assert isinstance(single.family, SDXLFamily)
    ids = single.family.tokenize(single, ["a red circle"])
    with torch.no_grad():
        a, b = base.family.encode_text(base, ids), single.family.encode_text(single, ids)
    assert all(torch.equal(a[k], b[k]) for k in a)
    half = load_base(str(sdxl_dir), "fp16")
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    v = load_base(str(path), v_prediction=True, zero_terminal_snr=True)
    assert v.family.v_prediction and v.noise_scheduler.config.rescale_betas_zero_snr


@pytest.mark.parametrize("encoders", ["both", "te2", "none"])
def test_sdxl_lora_trains_through_sdlora_train(encoders, sdxl_dir, sdxl_lora, style_dir, tmp_path):
    kw = {"te2": {"te1_lr": 0.0, "te2_lr": 5e-3}, "none": {"text_encoder": False}}.get(encoders)
    tensors, meta = _modules(sdxl_lora if kw is None else _train(str(sdxl_dir), style_dir, tmp_path / "out", **kw))
    names = {k.split(".")[0] for k in tensors}
    te1 = {n for n in names if n.startswith("lora_te1_")}
    te2 = {n for n in names if n.startswith("lora_te2_")}
    unet = {n for n in names if n.startswith("lora_unet_")}
    # fixture depths (1, 1, 2), 2 layers per block: transformer blocks down 2 + 4, mid 2, up 6 + 3 = 17, in 11
    # Transformer2DModels; all-linear = 10 per block (attn1/attn2 q/k/v/out, ff x2) + proj_in/out per model
    assert UNET["transformer_layers_per_block"] == [1, 1, 2] and len(unet) == 17 * 10 + 11 * 2
    # all-linear takes kohya's whole text-encoder set: q/k/v/out + fc1/fc2 per layer
    assert len(te1) == (6 * TEXT_1["num_hidden_layers"] if encoders == "both" else 0)
    assert len(te2) == (6 * TEXT_2["num_hidden_layers"] if encoders != "none" else 0)
    assert names == unet | te1 | te2 and not any(n.startswith("lora_te_") for n in names)
    # kohya's SDXL names: the original (SGM) UNet layout, not diffusers' paths
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in unet
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in unet
    assert "lora_unet_output_blocks_0_1_proj_out" in unet
    assert not any("down_blocks" in n or "mid_block" in n for n in unet)
    trained = [n for n in te2 | unet if tensors[f"{n}.lora_up.weight"].abs().sum() > 0]
    assert len(trained) > len(unet) // 2  # three steps move the up matrices away from their zero start
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_generate_with_an_sdxl_lora(sdxl_dir, sdxl_lora, tmp_path):
    from sdlora.cli.main import main

    lora, images = sdxl_lora, {}
    for name, spec in (("base", []), ("lora", ["--lora", f"{lora}:1"]), ("zero", ["--lora", f"{lora}:0"])):
        out = tmp_path / name
        assert main(["generate", "--base", str(sdxl_dir), "--prompt", "sks sketch, a red circle", "--steps", "2",
                     "--width", "64", "--height", "64", "--seed", "5", "--output", str(out), *spec]) == 0
        (png,) = out.glob("*.png")
        images[name] = np.asarray(Image.open(png))
    assert images["base"].shape == (64, 64, 3)
    assert np.array_equal(images["base"], images["zero"])  # strength 0 is the base, bit for bit
    assert not np.array_equal(images["base"], images["lora"])


def test_sd2_single_file_trains_with_lora_te_and_ss_v2(style_dir, tmp_path):
    parts = sd2_parts(4)
    path = tmp_path / "sd2-768-v.safetensors"
    save_sgm_file(parts.unet, parts.vae, parts.text_encoders, path, dtype=torch.float32, prediction_type="v_prediction")
    tensors, meta = _modules(_train(str(path), style_dir, tmp_path / "out"))
    prefixes = {k.split(".")[0].split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te"}
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_tiny_xl_before_its_build_is_one_line(monkeypatch, tmp_path):
    from sdlora.models import tiny_xl

    monkeypatch.setattr(tiny_xl, "SHIPPED_DIR", tmp_path / "missing")
    with pytest.raises(SdloraError, match="tiny-xl base is not built yet"):
        load_base("tiny-xl")


def test_refiner_file_through_load_base(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(SdloraError, match="SDXL refiner .* sdlora trains on base models"):
        load_base(str(path))
