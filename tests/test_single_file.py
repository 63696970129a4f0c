"""Single-file SD1.x bases in the original LDM layout: exact round trips, real key names, offline use, safe refusals."""

from __future__ import annotations

import json
import pickle
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.errors import SdloraError
from sdlora.models.base import load_base
from sdlora.models.single_file import (
    TE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    ldm_state_dict,
    load_single_file,
    save_single_file,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(tiny, path, dtype=torch.float32)
    return path


def _components(base):
    return {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoders["text_encoder"]}


def _public(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def _unet_out(base) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return base.unet(x.to(base.unet.dtype), 500, encoder_hidden_states=cond.to(base.unet.dtype)).sample


# ---------------------------------------------------------------- round trips on the tiny base


def test_fp32_round_trip_is_bit_identical(tiny, tiny_file):
    loaded = load_base(str(tiny_file))
    assert loaded.family.version == "sd_v1" and loaded.path == tiny_file
    for name, module in _components(tiny).items():
        a, b = module.state_dict(), _components(loaded)[name].state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _public(loaded.unet.config) == _public(tiny.unet.config)  # GroupNorm groups etc. from the file's hints
    assert _public(loaded.vae.config) == _public(tiny.vae.config)
    assert torch.equal(_unet_out(loaded), _unet_out(tiny))
    assert loaded.resolution == tiny.resolution


def test_fp16_save_rounds_weights_and_keeps_vae_fp32_under_fp16(tiny, tmp_path):
    path = tmp_path / "half.safetensors"
    save_single_file(tiny, path)  # default fp16
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    loaded = load_base(str(path))  # fp32 precision: fp16 values upcast
    for name, module in _components(tiny).items():
        a, b = module.state_dict(), _components(loaded)[name].state_dict()
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), name
    half = load_base(str(path), "fp16")
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert half.text_encoders["text_encoder"].dtype == torch.float16


def test_real_ldm_key_names(tiny_file):
    with safe_open(str(tiny_file), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight").ndim == 4  # 1x1 conv, as in LDM
    for k in [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler after a block without attention
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # ... and after one with attention
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.decoder.up.3.block.1.norm1.weight",  # tiny VAE: 1 layer per block, 2 in the decoder
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert k in keys, k
    assert not any(".resnets." in k or "down_blocks" in k or "to_out.0" in k and "first_stage" in k for k in keys)


# ---------------------------------------------------------------- the full SD1.5 architecture, names only


def test_sd15_key_set_round_trips_through_diffusers_converters():
    """SD1.5 modules on the meta device (no memory): our LDM names go back through diffusers' own readers exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO / "scripts"))
    from make_random_sd15 import TEXT, UNET, VAE

    with torch.device("meta"):
        unet, vae, te = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), CLIPTextModel(CLIPTextConfig(**TEXT))
    ldm = ldm_state_dict(unet, vae, te)
    counts = {p: sum(k.startswith(p) for k in ldm) for p in (UNET_PREFIX, VAE_PREFIX, TE_PREFIX)}
    # v1-5-pruned: 686 UNet and 248 VAE tensors; its 197 CLIP entries include the int position_ids buffer,
    # which transformers no longer saves (non-persistent), so 196 real weights here.
    assert counts == {UNET_PREFIX: 686, VAE_PREFIX: 248, TE_PREFIX: 196}

    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae.state_dict().items()}
    back = {k.removeprefix("text_model.") if not hasattr(te, "text_model") else k: v
            for k, v in convert_ldm_clip_checkpoint(ldm).items()}
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in te.state_dict().items()}

    # the configs read from the shapes alone are SD1.5's
    part = lambda p: {k[len(p):]: v for k, v in ldm.items() if k.startswith(p)}  # noqa: E731
    u = infer_unet_config(part(UNET_PREFIX))
    assert {k: u[k] for k in UNET} == {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()}
    v = infer_vae_config(part(VAE_PREFIX))
    assert {k: v[k] for k in VAE} == {k: list(x) if isinstance(x, tuple) else x for k, x in VAE.items()}
    t = infer_text_config(part(TE_PREFIX))
    assert {k: t[k] for k in TEXT} == TEXT


# ---------------------------------------------------------------- train and generate on a single file, offline


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network use in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_train_and_generate_on_single_file(tiny_file, style_dir, tmp_path, no_network, capsys):
    from sdlora.cli.main import main

    for extra in sorted(style_dir.glob("*.png"))[2:]:  # two images are enough to show it runs
        extra.unlink()
        extra.with_suffix(".txt").unlink()
    assert main(["train", "--base", str(tiny_file), "--images", str(style_dir), "--steps", "3", "--rank", "2",
                 "--resolution", "64", "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    adapter = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert adapter.exists()
    with safe_open(str(adapter), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    assert main(["generate", "--base", str(tiny_file), "--prompt", "sks sketch", "--lora", f"{adapter}:0.8",
                 "--steps", "2", "--width", "64", "--height", "64", "--output", str(tmp_path / "img"), "--device", "cpu"]) == 0
    assert list((tmp_path / "img").glob("*.png"))


# ---------------------------------------------------------------- refusals: one line, nothing executed

MARKER = "sdlora_pwned_marker"


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("form", ["torch-zip", "raw-pickle-2", "raw-pickle-4"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / MARKER
    path = tmp_path / "model.ckpt"
    if form == "torch-zip":
        torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Evil(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Evil(marker), f, protocol=int(form[-1]))
    pickle.loads(pickle.dumps(Evil(tmp_path / "control")))  # the payload really does run when unpickled...
    assert (tmp_path / "control").exists()
    with pytest.raises(SdloraError) as e:
        load_base(str(path))
    msg = _one_line(e)
    assert "refusing to unpickle model.ckpt" in msg and "add_safe_globals" not in msg
    if form != "raw-pickle-4":  # protocol 4 already stops at its FRAME opcode, before the global
        assert "Unsupported global" in msg and "exec" in msg
    assert not marker.exists()  # ...but not here


def test_ckpt_with_non_tensor_objects_is_refused(tmp_path):
    import argparse

    path = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(SdloraError) as e:
        load_single_file(path)
    msg = _one_line(e)
    assert "refusing to unpickle trainer.ckpt" in msg and "argparse.Namespace" in msg


def test_weights_only_ckpt_loads_from_shapes_alone(tmp_path):
    """A .ckpt has no sdlora hints: a small SD1-shaped model (32 GroupNorm groups, 64-dim CLIP heads) loads exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.models.tiny import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": [32] * 4, "norm_num_groups": 32, "sample_size": 64})
    vae = AutoencoderKL(**{**VAE_CONFIG, "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 32, "sample_size": 512})
    te = CLIPTextModel(CLIPTextConfig(**{**TEXT_CONFIG, "num_attention_heads": 1, "pad_token_id": 1}))
    path = tmp_path / "plain.ckpt"
    state = ldm_state_dict(unet, vae, te) | {  # what real v1-5 files carry besides the weights
        TE_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None],
        "alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999)}
    torch.save({"state_dict": state, "global_step": 7, "epoch": "1"}, path)
    loaded = load_single_file(path)
    for a, b in [(unet, loaded.unet), (vae, loaded.vae), (te, loaded.text_encoders["text_encoder"])]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _public(loaded.unet.config) == _public(unet.config) and _public(loaded.vae.config) == _public(vae.config)
    assert loaded.text_encoders["text_encoder"].config.num_attention_heads == 1


def test_text_renamed_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("not tensors at all, just some notes\n" * 4)
    with pytest.raises(SdloraError) as e:
        load_base(str(path))
    assert "model.safetensors is not a valid .safetensors file" in _one_line(e)


@pytest.mark.parametrize("name, keys, needle", [
    ("sd2.safetensors", ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"],
     "SD 2.x checkpoint"),
    ("sdxl.safetensors", ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"],
     "SDXL checkpoint"),
    ("lora.safetensors", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "looks like a LoRA"),
    ("vaeless.safetensors", ["model.diffusion_model.input_blocks.0.0.weight", TE_PREFIX + "text_model.x"],
     "no first_stage_model.* weights"),
])
def test_other_architectures_are_refused(tmp_path, name, keys, needle):
    path = tmp_path / name
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    with pytest.raises(SdloraError) as e:
        load_base(str(path))
    assert needle in _one_line(e) and name in str(e.value)


def test_other_suffixes_are_refused(tmp_path):
    for name, needle in [("model.bin", "diffusers folder"), ("model.pth.tar", "neither")]:
        path = tmp_path / name
        path.write_bytes(b"x")
        with pytest.raises(SdloraError) as e:
            load_base(str(path))
        assert needle in _one_line(e)


def test_save_refuses_unfused_lora_and_non_safetensors(tiny, tmp_path):
    from sdlora.formats.kohya import load_adapter
    from sdlora.lora.mixer import LoraMixer

    with pytest.raises(SdloraError, match="safetensors only"):
        save_single_file(tiny, tmp_path / "x.ckpt")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    out_f, in_f = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.shape
    lora = tmp_path / "k.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(2, in_f), f"{name}.lora_up.weight": torch.randn(out_f, 2),
               f"{name}.alpha": torch.tensor(2.0)}, str(lora))
    base = load_base("tiny")
    mixer = LoraMixer(base)
    mixer.add(load_adapter(lora), 1.0)
    with pytest.raises(SdloraError, match="fuse them first"):
        save_single_file(base, tmp_path / "lora.safetensors")
    with mixer.fused():  # a fused mix is written as plain weights under the original names
        save_single_file(base, tmp_path / "merged.safetensors", dtype=torch.float32)
        expected = {k: v.clone() for k, v in ldm_state_dict(base.unet, base.vae, base.text_encoders["text_encoder"]).items()}
    merged = load_base(str(tmp_path / "merged.safetensors"))
    got = ldm_state_dict(merged.unet, merged.vae, merged.text_encoders["text_encoder"])
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not all(torch.equal(got[k], v) for k, v in ldm_state_dict(tiny.unet, tiny.vae, tiny.text_encoders["text_encoder"]).items())
    assert json.loads(safe_open(str(tmp_path / "merged.safetensors"), "pt").metadata()["sdlora.config_hints"])["unet"]["norm_num_groups"] == 16
