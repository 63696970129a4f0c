"""SDXL and SD 2.x single files (SGM / OpenCLIP layouts): exact round trips, diffusers' reader agrees, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.errors import SdloraError
from sdlora.models.sd1 import SD1Family
from sdlora.models.sdxl import SDXLFamily
from sdlora.models.single_file_sgm import classify, load_sgm_file, read_any
from sdlora.models.single_file_sgm_write import save_sgm_file
from tests.sdxl_folder import TEXT_1, sd2_parts, shared_sdxl_folder


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return shared_sdxl_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_parts(sdxl_dir):
    return SDXLFamily.load_folder(sdxl_dir, torch.float32, torch.float32)


@pytest.fixture(scope="module")
def sdxl_file(sdxl_parts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sgm") / "xl.safetensors"
    save_sgm_file(sdxl_parts.unet, sdxl_parts.vae, sdxl_parts.text_encoders, path, dtype=torch.float32)
    return path


def _modules(parts) -> dict:
    return {"unet": parts.unet, "vae": parts.vae, **parts.text_encoders}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def _public(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def test_sdxl_file_has_the_sgm_layout(sdxl_file):
    with safe_open(str(sdxl_file), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # pooled text + time ids embedding
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # fused q/k/v
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert not any(".q_proj." in k for k in keys if k.startswith("conditioner.embedders.1."))
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_sdxl_round_trip_is_bit_identical(sdxl_parts, sdxl_file):
    back = load_sgm_file(sdxl_file)
    assert back.family is SDXLFamily
    _assert_same_weights(_modules(sdxl_parts), _modules(back))
    for name in ("unet", "vae"):
        ours, theirs = _public(getattr(back, name).config), _public(getattr(sdxl_parts, name).config)
        assert {k: ours[k] for k in theirs} == theirs
    assert back.tokenizers["text_encoder_2"].pad_token == "!"
    assert back.tokenizers["text_encoder"].pad_token == "<|endoftext|>"
    assert back.scheduler.config.prediction_type == "epsilon"


def test_diffusers_reads_our_sgm_file_to_the_same_weights(sdxl_parts, sdxl_dir, sdxl_file):
    """diffusers' own single-file reader (given the folder's configs) rebuilds the same modules: the layout is real."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(sdxl_file), config=str(sdxl_dir), local_files_only=True)
    ours = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    _assert_same_weights(_modules(sdxl_parts), ours)


def test_v_prediction_markers_and_ztsnr(sdxl_parts, tmp_path):
    path = tmp_path / "vpred.safetensors"
    save_sgm_file(sdxl_parts.unet, sdxl_parts.vae, sdxl_parts.text_encoders, path,
                  prediction_type="v_prediction", zero_terminal_snr=True)
    with safe_open(str(path), "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())  # what NoobAI-style files carry and ComfyUI reads
    sched = load_sgm_file(path).scheduler
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    assert float(sched.alphas_cumprod[-1]) < 1e-6  # the terminal step is pure noise
    assert load_sgm_file(path, prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"


# ---------------------------------------------------------------- SD 2.x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_round_trip_with_openclip_h_layout(prediction, tmp_path):
    parts = sd2_parts(1)
    path = tmp_path / "sd2.safetensors"
    save_sgm_file(parts.unet, parts.vae, parts.text_encoders, path, dtype=torch.float32,
                  prediction_type=prediction)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["modelspec.architecture"] == ("stable-diffusion-v2-768-v" if prediction == "v_prediction"
                                                          else "stable-diffusion-v2-512")
    layers = TEXT_1["num_hidden_layers"]
    # SD2 uses the penultimate layer: the file holds one more (unused) resblock than diffusers' encoder
    assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in keys
    assert f"cond_stage_model.model.transformer.resblocks.{layers + 1}.attn.in_proj_weight" not in keys
    back = load_sgm_file(path)
    assert back.family is SD1Family and list(back.text_encoders) == ["text_encoder"]
    assert back.family.from_components(back).version == "sd_v2"
    assert back.tokenizers["text_encoder"].pad_token == "!"
    assert back.scheduler.config.prediction_type == prediction
    _assert_same_weights(_modules(parts), _modules(back))


def test_sd2_without_metadata_is_probed_like_a1111(tmp_path):
    """No metadata: the UNet is run once at t=999; a random UNet is no v-model, and the override flag wins."""
    parts = sd2_parts(2)
    path = tmp_path / "sd2.safetensors"
    save_sgm_file(parts.unet, parts.vae, parts.text_encoders, path, dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        hints = {"sdlora.config_hints": f.metadata()["sdlora.config_hints"]}
    save_file(state, str(path), metadata=hints)
    assert load_sgm_file(path).scheduler.config.prediction_type == "epsilon"
    assert load_sgm_file(path, prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"


# ---------------------------------------------------------------- what is refused, in one line


def _fake(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


BAD = {
    "refiner": (["conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
                 "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
                "SDXL refiner"),
    "sd3": (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
             "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"], "Stable Diffusion 3"),
    "flux": (["double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"], "Flux"),
    "unet-only": (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"],
                  "only a UNet"),
    "diffusers-unet": (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "only a UNet"),
    "no-vae": (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x",
                "conditioner.embedders.1.model.x"], "incomplete SDXL checkpoint: no first_stage_model.*"),
    "lora": (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "looks like a LoRA"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_single_files_get_one_line_saying_what_they_are(case, tmp_path):
    keys, what = BAD[case]
    path = _fake(tmp_path / f"{case}.safetensors", keys)
    with pytest.raises(SdloraError) as e:
        read_any(path)
    msg = str(e.value)
    assert what in msg and "\n" not in msg and path.name in msg
    if case != "lora":
        assert "sdlora loads SD 1.x, SD 2.x and SDXL" in msg or "sdlora trains on base models" in msg


def test_half_downloaded_file_is_named_as_such(sdxl_file, tmp_path):
    cut = tmp_path / "partial.safetensors"
    cut.write_bytes(sdxl_file.read_bytes()[: sdxl_file.stat().st_size // 3])
    with pytest.raises(SdloraError, match=r"partial.safetensors is incomplete: .* bytes .*download it again"):
        read_any(cut)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(sdxl_file.read_bytes()[:100])
    with pytest.raises(SdloraError, match="cut short"):
        read_any(stub)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not tensors at all\n" * 4)
    with pytest.raises(SdloraError, match="not a valid .safetensors file"):
        read_any(notes)


def test_classify_tells_the_three_families_apart():
    sd1 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
           "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    sd2 = sd1[:2] + ["cond_stage_model.model.token_embedding.weight"]
    xl = sd1[:2] + ["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.x"]
    assert [classify(k, "f") for k in (sd1, sd2, xl)] == ["sd1", "sd2", "sdxl"]


def test_hints_round_trip_json(sdxl_file):
    with safe_open(str(sdxl_file), "pt") as f:
        hints = json.loads(f.metadata()["sdlora.config_hints"])
    assert set(hints) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert hints["vae"]["scaling_factor"] == pytest.approx(0.13025)
