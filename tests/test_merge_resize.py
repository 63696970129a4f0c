"""LoCon training, `sdlora merge` and `sdlora resize`: every result is checked against deltas computed here.

The reference for a module is its update s * (alpha/rank) * up @ down as a dense fp64 matrix; errors are
recomputed from the written files, independently of the code under test.
"""

import json
import math

import pytest
import torch

from sdlora.cli.main import main
from sdlora.errors import SdloraError
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter
from sdlora.lora.mixer import LoraMixer
from sdlora.lora.specs import LoraSpec
from sdlora.lora.targets import all_lora_layers
from sdlora.models.base import load_base
from sdlora.tools.merge import bake_into_base, merge_loras
from sdlora.tools.resize import resize_file

from .conftest import quick_config

# One module of each kind: Linear, 1x1 conv (SD1 proj_in), 3x3 conv, strided 3x3 conv, time-embedding Linear, TE.
NAMES = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_down_blocks_0_downsamplers_0_conv",
    "lora_unet_mid_block_resnets_0_time_emb_proj",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
]


def dense(m: ModuleWeights, s: float = 1.0) -> torch.Tensor:
    return s * m.scale * (m.up.flatten(1).double() @ m.down.flatten(1).double())


@pytest.fixture(scope="module")
def layers():
    base = load_base("tiny")
    found = {**all_lora_layers(base.unet, "lora_unet", te=False), **all_lora_layers(base.text_encoders["text_encoder"], "lora_te", te=True)}
    return {n: found[n][1] for n in NAMES}


def make_lora(path, layers, names, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for n in names:
        layer = layers[n]
        if isinstance(layer, torch.nn.Linear):
            down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
        else:
            down_shape, up_shape = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
        fan_in = math.prod(down_shape[1:])
        down = torch.randn(down_shape, generator=g) / math.sqrt(fan_in)
        up = torch.randn(up_shape, generator=g) * 0.2
        modules[n] = ModuleWeights(down=down, up=up, alpha=alpha)
    save_adapter(path, modules, {"ss_base_model_version": "sd_v1", "modelspec.title": path.stem}, torch.float32)
    return path


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory, layers):
    d = tmp_path_factory.mktemp("loras")
    a = make_lora(d / "a.safetensors", layers, NAMES, rank=4, alpha=2.0, seed=1)
    b = make_lora(d / "b.safetensors", layers, NAMES[1:4] + NAMES[6:], rank=3, alpha=6.0, seed=2)  # a subset
    return a, b


def expected_sum(specs):
    out = {}
    for spec in specs:
        f = load_adapter(spec.path)
        for n, m in f.modules.items():
            s = spec.te_strength if n.startswith("lora_te") and spec.te_strength is not None else spec.strength
            out[n] = out.get(n, 0) + dense(m, s)
    return out


# ---------------------------------------------------------------- LoCon training


@pytest.fixture(scope="module")
def locon(tmp_path_factory):
    from sdlora.training.loop import train

    from .conftest import SKETCH

    root = tmp_path_factory.mktemp("locon")
    imgs = root / "images"
    imgs.mkdir()
    for png in sorted(SKETCH.glob("*.png"))[:2]:
        (imgs / png.name).write_bytes(png.read_bytes())
        (imgs / png.with_suffix(".txt").name).write_bytes(png.with_suffix(".txt").read_bytes())
    cfg = quick_config(imgs, root / "out", steps=3, targets="cross-attn,conv", conv_rank=8, conv_alpha=4,
                       save_dtype="fp32", unet_lr=1e-2)
    return train(cfg).adapter


def test_conv_targets_write_kohya_locon_keys(locon):
    f = load_adapter(locon)
    conv1 = f.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv1.down.ndim == 4 and conv1.down.shape[0] == 8 and conv1.down.shape[2:] == (3, 3)
    assert conv1.up.shape[1:] == (8, 1, 1) and conv1.alpha == 4.0
    assert f.modules["lora_unet_down_blocks_0_downsamplers_0_conv"].rank == 8
    shortcut = [n for n in f.modules if n.endswith("conv_shortcut")]
    assert shortcut and all(f.modules[n].rank == 4 and f.modules[n].alpha == 4.0 for n in shortcut)  # 1x1: main rank
    assert f.modules["lora_unet_mid_block_resnets_0_time_emb_proj"].down.shape[0] == 4
    assert not [n for n in f.modules if "conv_in" in n or "conv_out" in n or "time_embedding" in n]
    args = json.loads(f.metadata["ss_network_args"])
    assert args["conv_dim"] == "8" and args["conv_alpha"] == "4" and args["targets"] == "cross-attn,conv"


def test_diffusers_loads_a_trained_locon_like_sdlora(locon):
    """diffusers' load_lora_weights takes the LoCon file and gives the same UNet and text-encoder outputs."""
    torch.manual_seed(0)
    x, t, enc = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 64)
    ids = torch.randint(0, 1000, (1, 77))
    ours = load_base("tiny")
    with torch.no_grad():
        y0 = ours.unet(x, t, enc).sample
    LoraMixer(ours).load(locon, 0.7)
    theirs = load_base("tiny")
    pipe = theirs.pipeline()
    pipe.load_lora_weights(str(locon), adapter_name="locon")
    pipe.set_adapters(["locon"], adapter_weights=[0.7])
    assert type(theirs.unet.down_blocks[0].resnets[0].conv1).__module__.startswith("peft")
    with torch.no_grad():
        y_ours, y_theirs = ours.unet(x, t, enc).sample, theirs.unet(x, t, enc).sample
        te_ours, te_theirs = ours.text_encoders["text_encoder"](ids)[0], theirs.text_encoders["text_encoder"](ids)[0]
    assert (y_ours - y0).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(y_theirs, y_ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(te_theirs, te_ours, atol=1e-5, rtol=0)


def test_conv_options_are_validated(tmp_path):
    with pytest.raises(SdloraError, match="need conv in --targets"):
        quick_config(tmp_path, tmp_path / "o", conv_rank=8)
    with pytest.raises(SdloraError, match="invalid targets 'all-linear,everything'"):
        quick_config(tmp_path, tmp_path / "o", targets="all-linear,everything")
    cfg = quick_config(tmp_path, tmp_path / "o", targets="all-linear, conv", rank=8, alpha=2)
    assert cfg.conv_dims() == (8, 2.0)  # without --conv-rank the convs behave like the other layers


# ---------------------------------------------------------------- LoRA + LoRA


def test_exact_merge_equals_the_sum_of_deltas(tmp_path, two_loras):
    a, b = two_loras
    specs = [LoraSpec(str(a), 0.8), LoraSpec(str(b), -0.5, 0.3)]
    out = tmp_path / "ab.safetensors"
    merge_loras(specs, out, save_dtype="fp32")
    merged = load_adapter(out)
    want = expected_sum(specs)
    assert set(merged.modules) == set(want)
    for n, d in want.items():
        m = merged.modules[n]
        assert m.alpha == m.rank  # scales folded into up
        torch.testing.assert_close(dense(m), d, atol=1e-5, rtol=0)
    assert merged.modules[NAMES[2]].down.shape[0] == 7 and merged.modules[NAMES[0]].rank == 4
    assert merged.modules[NAMES[2]].up.shape[1:] == (7, 1, 1)
    assert merged.metadata["modelspec.merged_from"] == "a:0.8, b:-0.5:0.3"
    assert merged.metadata["sshs_model_hash"] and merged.metadata["ss_network_dim"] == "Dynamic"


def test_svd_merge_reports_the_error_of_the_written_file(tmp_path, two_loras):
    a, b = two_loras
    specs = [LoraSpec(str(a), 1.0), LoraSpec(str(b), 0.5)]
    out = tmp_path / "ab2.safetensors"
    result = merge_loras(specs, out, rank=2)  # fp16 file: the error includes its rounding
    merged = load_adapter(out)
    want = expected_sum(specs)
    err = {n: (dense(merged.modules[n]) - d).norm() ** 2 for n, d in want.items()}
    norm = {n: d.norm() ** 2 for n, d in want.items()}
    overall = math.sqrt(sum(err.values()) / sum(norm.values()))
    assert result.report.rel_error == pytest.approx(overall, rel=1e-6)
    worst = max(want, key=lambda n: err[n] / norm[n])
    assert result.report.worst[0] == worst
    assert result.report.worst[1] == pytest.approx(math.sqrt(err[worst] / norm[worst]), rel=1e-6)
    assert 0.01 < overall < 1 and all(m.rank <= 2 for m in merged.modules.values())
    conv = merged.modules[NAMES[2]]
    assert conv.down.shape[0] == 2 and conv.down.shape[2:] == (3, 3) and conv.up.shape[1:] == (2, 1, 1)


# ---------------------------------------------------------------- resize


def test_resize_to_full_rank_is_exact_and_keeps_the_scale(tmp_path, two_loras):
    a, _ = two_loras
    out = tmp_path / "full.safetensors"
    _, report = resize_file(a, out, rank=4, save_dtype="fp32")
    old, new = load_adapter(a), load_adapter(out)
    for n, m in old.modules.items():
        assert new.modules[n].scale == pytest.approx(m.scale)  # kohya's rule: alpha/rank kept
        torch.testing.assert_close(dense(new.modules[n]), dense(m), atol=1e-5, rtol=0)
    assert report.rel_error < 1e-5 and min(report.energy.values()) == pytest.approx(1.0)
    assert new.metadata["sshs_model_hash"] != old.metadata["sshs_model_hash"]
    assert "resized by sdlora from rank 4 to 4" in new.metadata["ss_training_comment"]


def test_resize_error_is_the_discarded_singular_values(tmp_path, two_loras):
    a, _ = two_loras
    out = tmp_path / "r2.safetensors"
    _, report = resize_file(a, out, rank=2, save_dtype="fp32")
    new = load_adapter(out)
    assert new.metadata["ss_network_dim"] == "2" and new.metadata["ss_network_alpha"] == "1"
    for n, m in load_adapter(a).modules.items():
        s = torch.linalg.svdvals(dense(m))
        lost = math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum()))
        assert report.errors[n] == pytest.approx(lost, rel=1e-4, abs=1e-6)
        assert float((dense(new.modules[n]) - dense(m)).norm() / dense(m).norm()) == pytest.approx(lost, rel=1e-4)


def test_resize_by_energy_keeps_the_smallest_rank_over_the_threshold(tmp_path, two_loras):
    a, _ = two_loras
    _, report = resize_file(a, tmp_path / "e.safetensors", energy=0.9, save_dtype="fp32")
    new = load_adapter(tmp_path / "e.safetensors")
    for n, m in load_adapter(a).modules.items():
        s2 = torch.linalg.svdvals(dense(m)) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        k = new.modules[n].rank
        assert kept[k - 1] >= 0.9 and (k == 1 or kept[k - 2] < 0.9)
        assert report.energy[n] == pytest.approx(float(kept[k - 1]))
    assert min(report.energy.values()) >= 0.9


# ---------------------------------------------------------------- bake into a base


def test_baked_folder_equals_base_plus_loras(tmp_path, two_loras):
    a, b = two_loras
    specs = [LoraSpec(str(a), 0.8), LoraSpec(str(b), -0.5, 0.3)]
    out = tmp_path / "baked"
    bake_into_base("tiny", specs, out, save_dtype="fp32")
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "merge_info.json").read_text())["modelspec.merged_from"] == "tiny, a:0.8, b:-0.5:0.3"
    bake_into_base("tiny", specs, tmp_path / "baked.safetensors", save_dtype="fp32")  # one LDM-layout file
    baked, ref, single = load_base(str(out)), load_base("tiny"), load_base(str(tmp_path / "baked.safetensors"))
    mixer = LoraMixer(ref)
    for s in specs:
        mixer.load(s.path, s.strength, s.te_strength)
    torch.manual_seed(0)
    x, t, enc = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 64)
    ids = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        y, y_ref, y_single = baked.unet(x, t, enc).sample, ref.unet(x, t, enc).sample, single.unet(x, t, enc).sample
        te, te_ref = baked.text_encoders["text_encoder"](ids)[0], ref.text_encoders["text_encoder"](ids)[0]
        mixer.set_strength("a", 0.0)
        mixer.set_strength("b", 0.0)
        y_base = ref.unet(x, t, enc).sample
    assert (y_ref - y_base).abs().max() > 1e-2  # the LoRAs change the output
    # fp32 weights with the deltas folded in vs. the unfused forward: float rounding only (measured ~1e-6)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(te, te_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_single, y_ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(tmp_path, two_loras, capsys):
    a, _ = two_loras
    assert main(["resize", str(a), "--rank", "9", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert main(["merge", "--lora", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "m.safetensors")]) == 2
    assert main(["merge", "--base", "tiny", "--lora", str(a), "--rank", "2", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sdlora: error: --rank 9 is larger than the file's rank (4): resize only reduces",
        f"sdlora: error: adapter file not found: {tmp_path / 'missing.safetensors'}",
        "sdlora: error: --rank applies to combining LoRAs into one file; baking into --base is always exact",
    ]


def test_cli_merge_and_resize_write_files(tmp_path, two_loras, capsys):
    a, b = two_loras
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--lora", f"{a}:1", "--lora", f"{b}:0.5", "--rank", "3", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "relative Frobenius error overall" in captured.err
    assert main(["resize", str(out), "--energy", "0.95"]) == 0
    assert (tmp_path / "m-e0.95.safetensors").is_file()
    assert main(["resize", str(out), "--energy", "0.95"]) == 2  # exists: refuses without --overwrite
