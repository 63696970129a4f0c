"""Per-block strength (LoRA Block Weight): block indexing, presets, the spec and tag grammars, exactness, merging."""

import pytest
import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.formats.deltas import compose_lora
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter
from sdlora.lora.blocks import LAYOUTS, block_id, block_table, check_fits, format_block_weights, parse_block_weights
from sdlora.lora.layer import LoraHost
from sdlora.lora.mixer import LoraMixer
from sdlora.lora.specs import extract_prompt_loras, parse_lora_spec
from sdlora.lora.targets import all_lora_layers
from sdlora.models.base import load_base

# Blocks switched off below: BASE (text encoder), attention blocks and blocks only a LoCon reaches (IN03, IN10, OUT02).
OFF = {"BASE", "IN03", "IN04", "IN05", "IN10", "M00", "OUT02", "OUT04", "OUT11"}


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def _unet_names(base) -> list[str]:
    return list(all_lora_layers(base.unet, "lora_unet", te=False))


def _locon_file(path, base, seed=0):
    """A LoCon + text-encoder LoRA on every block layer of the tiny base, strong random weights."""
    g = torch.Generator().manual_seed(seed)
    layers = {**all_lora_layers(base.unet, "lora_unet", te=False),
              **all_lora_layers(base.text_encoders["text_encoder"], "lora_te", te=True)}
    mods = {}
    for name, (_, layer) in layers.items():
        if block_id(name) is None or not (name.startswith("lora_unet") or "self_attn" in name):
            continue  # conv_in, conv_out, time embedding: outside every block, never targeted by kohya
        r = 2
        layer = layer.base if isinstance(layer, LoraHost) else layer  # wrapped by an earlier test's mixer
        if isinstance(layer, nn.Conv2d):
            down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g) * 0.2
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(r, layer.in_features, generator=g) * 0.2
            up = torch.randn(layer.out_features, r, generator=g) * 0.2
        mods[name] = ModuleWeights(down, up, float(r))
    save_adapter(path, mods, {"ss_output_name": path.stem, "ss_base_model_version": "sd_v1"}, torch.float32)
    return path


def _vector_off(off: set[str]) -> tuple[float, ...]:
    return tuple(0.0 if b in off else 1.0 for b in LAYOUTS[26])


def test_sd1_blocks_follow_the_extension_indexing(base):
    names = _unet_names(base)
    blocks = {n: block_id(n) for n in names}
    expect = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01", "lora_unet_down_blocks_0_resnets_1_conv1": "IN02",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03", "lora_unet_down_blocks_1_attentions_0_proj_in": "IN04",
        "lora_unet_down_blocks_2_attentions_1_proj_out": "IN08", "lora_unet_down_blocks_2_downsamplers_0_conv": "IN09",
        "lora_unet_down_blocks_3_resnets_0_conv1": "IN10", "lora_unet_down_blocks_3_resnets_1_conv2": "IN11",
        "lora_unet_mid_block_attentions_0_proj_in": "M00", "lora_unet_mid_block_resnets_1_conv1": "M00",
        "lora_unet_up_blocks_0_resnets_0_conv1": "OUT00", "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
        "lora_unet_up_blocks_1_attentions_0_proj_in": "OUT03", "lora_unet_up_blocks_2_upsamplers_0_conv": "OUT08",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k": "OUT11",
    }
    for name, block in expect.items():
        assert blocks[name] == block, name
    # the extension's 17 blocks are exactly the SD1 blocks that hold a transformer (what a plain LoRA touches)
    with_attention = {b for n, b in blocks.items() if "_attentions_" in n}
    assert with_attention == set(LAYOUTS[17]) - {"BASE"}
    # a LoCon reaches every UNet block but IN00 (conv_in, never targeted)
    assert {b for b in blocks.values() if b} == set(LAYOUTS[26]) - {"BASE", "IN00"}
    assert blocks["lora_unet_conv_in"] is None and blocks["lora_unet_time_embedding_linear_1"] is None
    assert block_id("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == "BASE"


def test_sdxl_sgm_names_map_to_their_block_numbers():
    assert block_id("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "IN04"
    assert block_id("lora_unet_input_blocks_8_0_emb_layers_1") == "IN08"
    assert block_id("lora_unet_middle_block_1_proj_in") == "M00"
    assert block_id("lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2") == "OUT00"
    assert block_id("lora_unet_output_blocks_5_1_proj_out") == "OUT05"
    assert block_id("lora_te1_text_model_encoder_layers_0_mlp_fc1") == block_id("lora_te2_x") == "BASE"
    # SDXL's attention blocks under diffusers names land in the same SGM slots (3 down blocks of 2 layers)
    assert block_id("lora_unet_down_blocks_1_attentions_0_proj_in") == "IN04"
    assert block_id("lora_unet_up_blocks_0_attentions_2_proj_in") == "OUT02"


def test_presets_vectors_and_lengths():
    outall = parse_block_weights("OUTALL")
    assert outall == parse_block_weights("sd-outall") == (1.0,) + (0.0,) * 7 + (1.0,) * 9
    assert format_block_weights(outall) == "OUTALL" and format_block_weights((0.5,) + (1.0,) * 16).startswith("0.5,1,")
    table = block_table(parse_block_weights("SDXL-MIDALL"))
    assert table["M00"] == 1 and table["BASE"] == 1 and table["IN04"] == 0 and table["OUT00"] == 0
    table = block_table(outall)
    assert table["OUT03"] == 1 and table["OUT00"] == 0 and table["IN03"] == 0  # unlisted blocks are 0, as to26 does
    with pytest.raises(SdloraError, match="has 3 values"):
        parse_block_weights("1,0,1")
    with pytest.raises(SdloraError, match="expected a preset"):
        parse_block_weights("OUTSIDE")
    with pytest.raises(SdloraError, match="SDXL model: use 12 or 20"):
        check_fits(outall, "sdxl")
    with pytest.raises(SdloraError, match="SD1/SD2 model"):
        check_fits(parse_block_weights("SDXL-ALL"), "sd1")


def test_spec_and_a1111_tag_grammar(tmp_path, base):
    s = parse_lora_spec("C:/x/a.safetensors:0.8:lbw=OUTALL")
    assert (s.path, s.strength, s.te_strength, s.blocks) == ("C:/x/a.safetensors", 0.8, None, parse_block_weights("OUTALL"))
    vec = ",".join(["1"] + ["0"] * 7 + ["0.5"] * 9)
    s = parse_lora_spec(f"a.safetensors:0.7:0.2:lbw={vec}")
    assert (s.strength, s.te_strength, s.blocks[-1]) == (0.7, 0.2, 0.5)
    assert parse_lora_spec("a.safetensors:lbw=INALL").strength == 1.0
    with pytest.raises(SdloraError, match="lbw '1,2'"):
        parse_lora_spec("a.safetensors:1:lbw=1,2")
    _locon_file(tmp_path / "style.safetensors", base)
    prompt, specs = extract_prompt_loras(
        f"a circle <lora:style:0.9:lbw=MIDD>, <lora:style:0.5:OUTS>, <lora:style:1:{vec}>, <lora:style:0.3>", tmp_path)
    assert prompt == "a circle"
    assert [s.strength for s in specs] == [0.9, 0.5, 1.0, 0.3]
    assert specs[0].blocks == parse_block_weights("MIDD") and specs[1].blocks == parse_block_weights("OUTS")
    assert specs[2].blocks[-1] == 0.5 and specs[3].blocks is None


def _probe(host: LoraHost) -> torch.Tensor:
    b = host.base
    g = torch.Generator().manual_seed(3)
    shape = (2, b.in_features) if isinstance(b, nn.Linear) else (1, b.in_channels, 8, 8)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("merged", [False, True])
def test_a_block_at_zero_leaves_its_layers_exactly_at_the_base(base, tmp_path, monkeypatch, merged):
    monkeypatch.setattr(LoraHost, "merged_inference", merged)
    f = _locon_file(tmp_path / "locon.safetensors", base)
    mixer = LoraMixer(base)
    name = mixer.load(f, 0.8, blocks=_vector_off(OFF))
    hosts = dict(zip(mixer._host_keys[name], mixer.loaded[name]))
    assert {block_id(k) for k in hosts} == set(LAYOUTS[26]) - {"IN00"}  # every block has layers, convs included
    with torch.no_grad():
        for key, host in hosts.items():
            x = _probe(host)
            same = torch.equal(host(x), host.base(x))
            assert same == (block_id(key) in OFF), key
        # a new vector applies in place: the merged copies stay the same tensors (captured CUDA graphs stay valid)
        ptrs = {k: h._merged.data_ptr() for k, h in hosts.items() if h._merged is not None}
        mixer.set_blocks(name, _vector_off({"OUT05"}))
        mixer.set_strength(name, 0.5)
        assert ptrs == {k: h._merged.data_ptr() for k, h in hosts.items() if h._merged is not None}
        for key, host in hosts.items():
            x = _probe(host)
            assert torch.equal(host(x), host.base(x)) == (block_id(key) == "OUT05"), key
        assert mixer.settings[name] == (0.5, None, _vector_off({"OUT05"}))
    mixer.remove(name)


def test_merge_bakes_a_block_vector_into_the_file(base, tmp_path):
    from sdlora.lora.specs import LoraSpec
    from sdlora.tools.merge import merge_loras

    f = _locon_file(tmp_path / "a.safetensors", base)
    spec = parse_lora_spec(f"{f}:0.5:lbw=OUTALL")
    out = tmp_path / "outall.safetensors"
    merge_loras([spec], out, save_dtype="fp32")
    src, merged = load_adapter(f), load_adapter(out)
    table = block_table(parse_block_weights("OUTALL"))
    assert set(merged.modules) == {n for n in src.modules if table[block_id(n)] != 0}
    def delta(m):
        return compose_lora(m.up, m.down.reshape(m.rank, *m.down.shape[1:])) * m.scale

    for name, m in merged.modules.items():
        assert torch.allclose(delta(m), delta(src.modules[name]) * 0.5, atol=1e-6), name
    assert "lbw=OUTALL" in merged.metadata["modelspec.merged_from"]
    with pytest.raises(SdloraError, match="every module's strength is 0"):
        merge_loras([LoraSpec(str(f), 1.0, None, parse_block_weights("NONE"))], tmp_path / "none.safetensors")


def test_cli_refuses_a_bad_vector_in_one_line(tmp_path, capsys):
    from sdlora.cli.main import main

    rc = main(["generate", "--prompt", "x", "--lora", "a.safetensors:1:lbw=1,2,3", "--output", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err.strip().startswith("sdlora: error: lbw '1,2,3' has 3 values")
    rc = main(["merge", "--lora", "a.safetensors:lbw=OUTSIDE", "--output", str(tmp_path / "m.safetensors")])
    assert rc == 2 and "expected a preset" in capsys.readouterr().err
