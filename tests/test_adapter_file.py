"""Tests for the kohya LoRA file writer/reader, the atomic writer and the metadata builder."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdlora import util as atomic
from sdlora.errors import SdloraError
from sdlora.formats.kohya import (
    AdapterFile,
    ModuleWeights,
    file_sha256,
    kohya_name,
    load_adapter,
    save_adapter,
    tensor_hashes,
)
from sdlora.formats.metadata import training_metadata

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_0_attentions_0_proj_in"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _modules(seed: int = 0) -> dict[str, ModuleWeights]:
    g = torch.Generator().manual_seed(seed)
    return {
        LINEAR: ModuleWeights(torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g), alpha=2.0),
        CONV: ModuleWeights(torch.randn(4, 8, 1, 1, generator=g), torch.randn(8, 4, 1, 1, generator=g), alpha=1.0),
        TE: ModuleWeights(torch.randn(2, 12, generator=g), torch.randn(12, 2, generator=g), alpha=0.5),
    }


def _tensor_region(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n :]


def _header(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


# --- roundtrip and file layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_roundtrip_preserves_shapes_alpha_and_values(tmp_path: Path, dtype: torch.dtype) -> None:
    mods = _modules()
    path = tmp_path / "a.safetensors"
    save_adapter(path, mods, {"ss_output_name": "a"}, dtype=dtype)

    stored = safetensors.torch.load_file(path)
    assert {t.dtype for t in stored.values()} == {dtype}
    assert stored[f"{LINEAR}.alpha"].shape == torch.Size([])

    loaded = load_adapter(path)
    assert isinstance(loaded, AdapterFile) and loaded.path == path
    assert set(loaded.modules) == set(mods)
    for name, m in mods.items():
        got = loaded.modules[name]
        assert got.down.dtype == torch.float32 and got.up.dtype == torch.float32
        assert got.down.shape == m.down.shape and got.up.shape == m.up.shape
        assert got.alpha == m.alpha and got.rank == m.rank
        torch.testing.assert_close(got.down, m.down.to(dtype).float(), rtol=0, atol=0)
        torch.testing.assert_close(got.up, m.up.to(dtype).float(), rtol=0, atol=0)
    assert loaded.metadata["ss_output_name"] == "a"


def test_key_names_and_header_starts_with_brace_quote(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_adapter(path, _modules(), {"ss_output_name": "a", "modelspec.title": "A"})
    raw = path.read_bytes()
    assert raw[8:10] == b'{"'  # A1111 asserts this
    keys = set(_header(raw)) - {"__metadata__"}
    expected = {f"{n}.{s}" for n in (LINEAR, CONV, TE) for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    assert _header(raw)["__metadata__"]["modelspec.title"] == "A"


def test_kohya_name() -> None:
    assert kohya_name("lora_unet", "down_blocks.0.attn2.to_q") == "lora_unet_down_blocks_0_attn2_to_q"
    assert (
        kohya_name("lora_te_", "text_model.encoder.layers.0.mlp.fc2") == "lora_te_text_model_encoder_layers_0_mlp_fc2"
    )


def test_missing_alpha_means_rank(tmp_path: Path) -> None:
    path = tmp_path / "noalpha.safetensors"
    safetensors.torch.save_file(
        {f"{LINEAR}.lora_down.weight": torch.ones(3, 5), f"{LINEAR}.lora_up.weight": torch.ones(7, 3)}, path
    )
    m = load_adapter(path).modules[LINEAR]
    assert m.alpha == 3.0 and m.rank == 3


def test_save_adds_hashes_and_returns_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    meta = {"ss_output_name": "a"}
    digest = save_adapter(path, _modules(), meta)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)

    stored = load_adapter(path).metadata
    tensor_sha = hashlib.sha256(_tensor_region(path.read_bytes())).hexdigest()
    assert stored["sshs_model_hash"] == tensor_sha  # tensor bytes do not depend on the metadata
    assert stored["modelspec.hash_sha256"] == "0x" + tensor_sha
    assert re.fullmatch(r"0x[0-9a-f]{64}", stored["modelspec.hash_sha256"])
    assert len(stored["sshs_legacy_hash"]) == 8
    assert meta["sshs_model_hash"] == stored["sshs_model_hash"]  # also reported back to the caller


def test_sshs_hashes_match_an_independent_kohya_style_computation(tmp_path: Path) -> None:
    # A file big enough (> 1 MiB + 64 KiB) for the legacy hash to cover real tensor bytes.
    g = torch.Generator().manual_seed(1)
    mods = {LINEAR: ModuleWeights(torch.randn(8, 40000, generator=g), torch.randn(320, 8, generator=g), alpha=4.0)}
    ss_only = {"ss_output_name": "big", "ss_network_dim": "8"}
    path = tmp_path / "big.safetensors"
    save_adapter(path, mods, dict(ss_only), dtype=torch.float32)

    # Rewrite the same tensors with only the ss_ metadata: that buffer is what kohya hashes.
    tensors = safetensors.torch.load_file(path)
    ref = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, ref, metadata=ss_only)
    raw = ref.read_bytes()
    assert len(raw) > 0x110000
    expected_model = hashlib.sha256(_tensor_region(raw)).hexdigest()
    expected_legacy = hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]

    stored = load_adapter(path).metadata
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == (expected_model, expected_legacy)
    assert tensor_hashes(tensors, stored) == (expected_model, expected_legacy)


def test_sshs_hashes_ignore_non_ss_metadata_but_follow_tensors(tmp_path: Path) -> None:
    base = {"ss_output_name": "a"}
    save_adapter(tmp_path / "1.safetensors", _modules(), dict(base, **{"modelspec.title": "one"}))
    save_adapter(tmp_path / "2.safetensors", _modules(), dict(base, **{"modelspec.title": "two", "x": "y"}))
    changed = _modules()
    changed[LINEAR].up[0, 0] += 1.0
    save_adapter(tmp_path / "3.safetensors", changed, dict(base))
    one, two, three = (load_adapter(tmp_path / f"{i}.safetensors").metadata for i in (1, 2, 3))
    assert one["sshs_model_hash"] == two["sshs_model_hash"]
    assert one["sshs_legacy_hash"] == two["sshs_legacy_hash"]
    assert one["sshs_model_hash"] != three["sshs_model_hash"]
    assert file_sha256(tmp_path / "1.safetensors") != file_sha256(tmp_path / "2.safetensors")


def test_save_refuses_bad_modules(tmp_path: Path) -> None:
    with pytest.raises(SdloraError, match="invalid kohya module name"):
        save_adapter(tmp_path / "x.safetensors", {"unet.foo": _modules()[LINEAR]}, {})
    bad = {LINEAR: ModuleWeights(torch.zeros(4, 8), torch.zeros(8, 3), alpha=1.0)}
    with pytest.raises(SdloraError, match="rank mismatch"):
        save_adapter(tmp_path / "x.safetensors", bad, {})
    with pytest.raises(SdloraError, match="must map str to str"):
        save_adapter(tmp_path / "x.safetensors", _modules(), {"ss_network_dim": 4})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


# --- atomic writes ---------------------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    atomic.atomic_write_bytes(path, b"first")
    atomic.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-")
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_save_adapter_failure_does_not_replace_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    save_adapter(path, _modules(), {})
    before = path.read_bytes()

    def failing_write(target: Path, data: bytes) -> None:
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError("disk full")

    monkeypatch.setattr("sdlora.formats.kohya.atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, _modules(seed=5), {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]

    monkeypatch.setattr("safetensors.torch.save", lambda *a, **k: (_ for _ in ()).throw(ValueError("cannot serialise")))
    with pytest.raises(ValueError, match="cannot serialise"):
        save_adapter(path, _modules(seed=6), {})
    assert path.read_bytes() == before


# --- load errors -----------------------------------------------------------------------------------------------


def _save_raw(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file(tensors, path)
    return path


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SdloraError, match="adapter file not found"):
        load_adapter(tmp_path / "nope.safetensors")


def test_load_refuses_non_safetensors(tmp_path: Path) -> None:
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, I am text and not a tensor file")
    with pytest.raises(SdloraError, match=r"is not a \.safetensors file \(no safetensors header\)"):
        load_adapter(text)


def test_load_refuses_pickles_without_unpickling(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (exec, ("raise SystemExit('unpickled!')",))

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Boom()}, protocol=2))
    with pytest.raises(SdloraError, match="not a .safetensors file .*pickle"):
        load_adapter(ckpt)

    pt = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(2)}, pt)  # zip container
    with pytest.raises(SdloraError, match="not a .safetensors file .*zip checkpoint"):
        load_adapter(pt)


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_header_length_resembling_pickle_or_zip_magic_still_loads(tmp_path: Path, first_bytes: bytes) -> None:
    # The 8-byte header length may begin with a pickle's or zip's magic bytes: such files must still load.
    path = tmp_path / "a.safetensors"
    save_adapter(path, _modules(), {"pad": ""})
    unpadded = int.from_bytes(path.read_bytes()[:8], "little")
    # A length just above the unpadded one with the wanted leading bytes (all candidates are multiples of 8).
    target = 0x4B50 if first_bytes == b"PK" else ((unpadded >> 8) + 1) << 8 | 0x80
    for pad in range(target - unpadded - 8, target - unpadded + 8):
        save_adapter(path, _modules(), {"pad": "x" * pad})
        if path.read_bytes().startswith(first_bytes):
            break
    else:
        pytest.fail("could not produce the header length")
    assert load_adapter(path).modules.keys() == _modules().keys()


def test_load_corrupt_header(tmp_path: Path) -> None:
    body = b'{"x": broken json'
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(SdloraError, match="corrupt safetensors"):
        load_adapter(bad)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        # LoHa, LoKr, lora_mid, .diff and DoRA load as deltas (tests/test_formats.py); these stay refused
        (f"{LINEAR}.oft_blocks", "OFT"),
        (f"{LINEAR}.diff_b", "diff_b"),
    ],
)
def test_load_refuses_other_adapter_types(tmp_path: Path, key: str, kind: str) -> None:
    path = _save_raw(tmp_path / "x.safetensors", {key: torch.zeros(2, 2)})
    with pytest.raises(SdloraError, match=f"unsupported adapter type in .*x.safetensors: .*{kind}") as err:
        load_adapter(path)
    assert "\n" not in str(err.value)


def test_load_refuses_incomplete_and_mismatched_modules(tmp_path: Path) -> None:
    only_down = _save_raw(tmp_path / "d.safetensors", {f"{LINEAR}.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(SdloraError, match=f"{LINEAR} has down but no lora_up"):
        load_adapter(only_down)
    only_up = _save_raw(tmp_path / "u.safetensors", {f"{LINEAR}.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(SdloraError, match="no lora_down"):
        load_adapter(only_up)
    mismatch = _save_raw(
        tmp_path / "m.safetensors",
        {f"{LINEAR}.lora_down.weight": torch.zeros(4, 8), f"{LINEAR}.lora_up.weight": torch.zeros(8, 2)},
    )
    with pytest.raises(SdloraError, match="rank mismatch .*lora_down rank 4 but lora_up rank 2"):
        load_adapter(mismatch)


def test_load_refuses_unknown_keys(tmp_path: Path) -> None:
    path = _save_raw(tmp_path / "x.safetensors", {"model.diffusion_model.weight": torch.zeros(2)})
    with pytest.raises(SdloraError, match="unrecognised key 'model.diffusion_model.weight'"):
        load_adapter(path)


# --- peft / diffusers layout -----------------------------------------------------------------------------------


def test_peft_layout_converts_to_kohya_modules(tmp_path: Path) -> None:
    mods = _modules()
    unet_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {
        f"unet.{unet_path}.lora_A.weight": mods[LINEAR].down,
        f"unet.{unet_path}.lora_B.weight": mods[LINEAR].up,
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": mods[CONV].down,
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": mods[CONV].up,
        # transformers 5 module paths (no "text_model.") must still give the kohya name.
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": mods[TE].down,
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": mods[TE].up,
    }
    adapter_meta = {"unet.r": 4, "unet.lora_alpha": 2.0, "unet.alpha_pattern": {"proj_in": 1.0}, "text_encoder.r": 2}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(adapter_meta)})

    loaded = load_adapter(path)
    assert set(loaded.modules) == {LINEAR, CONV, TE}
    for name, m in mods.items():
        torch.testing.assert_close(loaded.modules[name].down, m.down)
        torch.testing.assert_close(loaded.modules[name].up, m.up)
    assert loaded.modules[LINEAR].alpha == 2.0
    assert loaded.modules[CONV].alpha == 1.0  # from alpha_pattern
    assert loaded.modules[TE].alpha == 2.0  # no text_encoder alpha: alpha = rank


def test_peft_base_model_prefix_and_alpha_keys(tmp_path: Path) -> None:
    mods = _modules()
    base = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    path = _save_raw(
        tmp_path / "adapter_model.safetensors",
        {
            f"{base}.lora_A.weight": mods[LINEAR].down,
            f"{base}.lora_B.weight": mods[LINEAR].up,
            f"{base}.alpha": torch.tensor(3.0),
            "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": mods[TE].down,
            "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": mods[TE].up,
        },
    )
    loaded = load_adapter(path)
    assert set(loaded.modules) == {LINEAR, TE}
    assert loaded.modules[LINEAR].alpha == 3.0


# --- metadata --------------------------------------------------------------------------------------------------


def _metadata(**overrides) -> dict[str, str]:
    args = dict(
        output_name="mystyle",
        base_model_version="sd_v1",
        v_prediction=False,
        rank=4,
        alpha=1,
        network_args={"conv_dim": "4"},
        resolution=(512, 512),
        unet_lr=1e-4,
        te_lr=None,
        learning_rate=1e-4,
        optimizer="torch.optim.AdamW",
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_grad_norm=1.0,
        steps=100,
        max_train_steps=200,
        epoch=1,
        num_epochs=2,
        batch_size=2,
        grad_accum=1,
        num_batches_per_epoch=100,
        num_train_images=200,
        seed=42,
        mixed_precision="fp16",
        gradient_checkpointing=True,
        noise_offset=0.0,
        min_snr_gamma=5.0,
        flip_aug=False,
        enable_bucket=True,
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 20}}},
        tag_frequency={"10_mystyle": {"mystyle": 20, "1girl": 3}},
        dataset_dirs={"10_mystyle": {"n_repeats": 10, "img_count": 20}},
        training_started_at=1700000000.5,
        training_finished_at=1700003600.0,
        sd_model_name="v1-5-pruned.safetensors",
        comment="",
        trigger_phrase="mystyle",
        title=None,
        description=None,
        session_id="123",
    )
    args.update(overrides)
    return training_metadata(**args)


def test_training_metadata_values_are_strings_and_json_parses() -> None:
    meta = _metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for key in ("ss_network_args", "ss_bucket_info", "ss_tag_frequency", "ss_dataset_dirs"):
        json.loads(meta[key])
    assert json.loads(meta["ss_tag_frequency"])["10_mystyle"]["1girl"] == 3
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.0"
    assert meta["ss_resolution"] == "(512, 512)"
    assert meta["ss_v2"] == "False" and meta["ss_gradient_checkpointing"] == "True"
    assert meta["ss_text_encoder_lr"] == "None"  # kohya writes str(value)
    assert meta["ss_session_id"] == "123"
    assert meta["modelspec.title"] == "mystyle"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    assert meta["modelspec.trigger_phrase"] == "mystyle"
    assert "modelspec.description" not in meta and "modelspec.encoder_layer" not in meta
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["sdlora_version"] and meta["modelspec.implementation_version"].startswith("sdlora ")


def test_training_metadata_architectures() -> None:
    v1 = _metadata()
    assert v1["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert v1["modelspec.prediction_type"] == "epsilon" and v1["ss_base_model_version"] == "sd_v1"
    v2v = _metadata(base_model_version="sd_v2", v_prediction=True, resolution=(768, 768), clip_skip=2)
    assert v2v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v2v["modelspec.prediction_type"] == "v" and v2v["ss_v2"] == "True"
    assert v2v["modelspec.resolution"] == "768x768" and v2v["modelspec.encoder_layer"] == "2"
    assert _metadata(base_model_version="sd_v2")["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    with pytest.raises(SdloraError, match="unknown base model version"):
        _metadata(base_model_version="sd_v9")


def test_metadata_survives_save_and_load(tmp_path: Path) -> None:
    meta = _metadata()
    save_adapter(tmp_path / "m.safetensors", _modules(), dict(meta))
    stored = load_adapter(tmp_path / "m.safetensors").metadata
    assert {k: stored[k] for k in meta} == meta


# --- diffusers accepts what we write ---------------------------------------------------------------------------


def test_diffusers_loads_kohya_file_for_tiny_sd1_models(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    te = CLIPTextModel(config)
    # kohya names text-encoder modules by transformers 4 paths ("text_model.encoder..."); transformers 5 drops it.
    te_root = "" if any(n.startswith("text_model.") for n, _ in te.named_modules()) else "text_model."

    mods: dict[str, ModuleWeights] = {}
    for model, prefix, root, parents in (
        (unet, "lora_unet", "", Transformer2DModel),
        (te, "lora_te", te_root, (CLIPAttention, CLIPMLP)),
    ):
        for parent_name, parent in model.named_modules():
            if not isinstance(parent, parents):
                continue
            for child_name, child in parent.named_modules():
                if isinstance(child, torch.nn.Linear):
                    down, up = torch.randn(2, child.in_features), torch.randn(child.out_features, 2)
                elif isinstance(child, torch.nn.Conv2d):
                    down = torch.randn(2, child.in_channels, *child.kernel_size)
                    up = torch.randn(child.out_channels, 2, 1, 1)
                else:
                    continue
                mods[kohya_name(prefix, f"{root}{parent_name}.{child_name}")] = ModuleWeights(down, up, alpha=1.0)

    conv_name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    out_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    te_name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {conv_name, out_name, te_name} <= set(mods)
    assert mods[conv_name].down.ndim == 4  # SD1 proj_in is a 1x1 conv
    path = tmp_path / "tiny.safetensors"
    save_adapter(path, mods, {"ss_network_module": "networks.lora"}, dtype=torch.float32)

    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(safetensors.torch.load_file(path)))
    unet_keys = {k.split(".lora")[0].split("_lora")[0].replace(".processor", "") for k in converted}
    assert "unet.down_blocks.0.attentions.0.proj_in" in unet_keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out" in unet_keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_q" in unet_keys
    assert len(converted) == 2 * len(mods) and len(alphas) == len(mods)

    state_dict, network_alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))[:2]
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet, adapter_name="t")
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas, te, adapter_name="t")
    layers = dict(unet.named_modules())
    te_layers = dict(te.named_modules())
    checks = {
        conv_name: layers["down_blocks.0.attentions.0.proj_in"],
        out_name: layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"],
        te_name: te_layers[("" if te_root else "text_model.") + "encoder.layers.0.self_attn.q_proj"],
    }
    for name, layer in checks.items():
        torch.testing.assert_close(layer.lora_A["t"].weight, mods[name].down)
        torch.testing.assert_close(layer.lora_B["t"].weight, mods[name].up)
        assert layer.scaling["t"] == pytest.approx(mods[name].scale)
