"""SDXL LoRA files: kohya's SGM names (checked against diffusers' converter and kohya's rules), kohya's module
counts on the real SDXL architecture, and files that sdlora, diffusers and kohya-style writers all read alike.

The real SDXL 1.0 models are built on the meta device from sdlora/assets/sdxl (no memory); numbers are compared on
a small random model with SDXL's block pattern (tests/sdxl_models.py).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from sdlora.cli.main import main
from sdlora.errors import SdloraError
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter
from sdlora.formats.metadata import training_metadata
from sdlora.formats.names_sdxl import SDXL_NAMES, SgmNameTable
from sdlora.lora.mixer import LoraMixer
from sdlora.lora.targets import text_encoder_targets, unet_targets, uses_conv_rank

from .sdxl_models import SMALL_UNET, meta_sdxl, outputs, sdxl_base, sdxl_pipeline, small_sdxl


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The small model's layers are far too small for a second thread to pay its synchronisation (on a busy
    2-core machine a forward pass took 40 s with two threads, 0.5 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def meta():
    return meta_sdxl()


@pytest.fixture(scope="module")
def parts():
    return small_sdxl()


def _all_targets(unet, te1, te2, names, targets="all-linear,conv"):
    return (unet_targets(unet, targets, names) + text_encoder_targets(te1, "lora_te1", mlp=True)
            + text_encoder_targets(te2, "lora_te2", mlp=True))


def _random_modules(targets, seed=1) -> dict[str, ModuleWeights]:
    """Random LoRA weights for every target: rank 4 / alpha 2 on Linear and 1x1, rank 2 / alpha 1 on 3x3 convs."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for t in targets:
        layer = t.layer
        rank, alpha = (2, 1.0) if uses_conv_rank(layer) else (4, 2.0)
        if isinstance(layer, torch.nn.Linear):
            down, up = torch.randn(rank, layer.in_features, generator=g), torch.randn(layer.out_features, rank, generator=g)
        else:
            down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g)
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=g)
        mods[t.kohya_name] = ModuleWeights(down * 0.1, up * 0.1, alpha)
    return mods


@pytest.fixture(scope="module")
def xl_file(parts, tmp_path_factory):
    """An sdlora SDXL LoCon file (all-linear + conv, both text encoders with MLP) for the small model."""
    names = SgmNameTable.from_unet_config(SMALL_UNET)
    mods = _random_modules(_all_targets(parts["unet"], parts["text_encoder"], parts["text_encoder_2"], names))
    path = tmp_path_factory.mktemp("xl") / "xl.safetensors"
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.title": "xl"}
    save_adapter(path, mods, meta, torch.float32)
    return path


@pytest.fixture(scope="module")
def xl_ours(parts, xl_file):
    """sdlora's mixer with the file at strength 1: outputs of the small model."""
    return _ours(parts, xl_file)


@pytest.fixture(scope="module")
def xl_pipe(parts, xl_file):
    """diffusers' StableDiffusionXLPipeline with the file loaded by its own load_lora_weights."""
    pipe = sdxl_pipeline(parts)
    pipe.load_lora_weights(str(xl_file), adapter_name="x")
    return pipe, outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)


def _ours(parts, *files):
    base = sdxl_base(parts)
    mixer = LoraMixer(base)
    for f in files:
        mixer.load(f)
    return outputs(base.unet, base.text_encoders["text_encoder"], base.text_encoders["text_encoder_2"])


def _assert_same(a: dict, b: dict, tol=1e-4):
    for key in a:
        assert (a[key] - b[key]).abs().max() < tol, key


def _lora_a_count(model, adapter="x") -> int:
    return sum(1 for n, _ in model.named_modules() if n.endswith(f"lora_A.{adapter}"))


# --- the real SDXL architecture ---------------------------------------------------------------------------------


def test_configs_build_the_real_sdxl_sizes(meta):
    unet, te1, te2 = meta
    sizes = [sum(p.numel() for p in m.parameters()) for m in meta]
    assert sizes == [2_567_463_684, 123_060_480, 694_659_840]  # SDXL 1.0 base UNet, CLIP ViT-L, OpenCLIP bigG
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size == 2048


def test_module_counts_and_names_match_kohya(meta):
    unet, te1, te2 = meta
    names = SgmNameTable.from_unet_config(unet.config)
    assert names.layout == SDXL_NAMES.layout  # the default table is the real model's
    linear = unet_targets(unet, "all-linear", names)
    assert len(linear) == 722  # kohya's LoRA-LierLa count for SDXL: 70 transformer blocks x 10 + 11 x proj_in/out
    assert len(text_encoder_targets(te1, "lora_te1", mlp=True)) == 72
    assert len(text_encoder_targets(te2, "lora_te2", mlp=True)) == 192
    assert len(unet_targets(unet, "attn", names)) == 560 and len(unet_targets(unet, "cross-attn", names)) == 280
    by_name = {t.kohya_name: t for t in linear}
    for n in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
              "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2", "lora_unet_input_blocks_8_1_proj_out",
              "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0"):
        assert n in by_name, n
    assert isinstance(by_name["lora_unet_middle_block_1_proj_in"].layer, torch.nn.Linear)  # SDXL: linear projections
    assert sum(n.startswith("lora_unet_middle_block_1_transformer_blocks_") for n in by_name) == 10 * 10
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in {t.kohya_name for t in text_encoder_targets(te2, "lora_te2", True)}

    conv = unet_targets(unet, "conv", names)
    # 17 ResBlocks x (in_layers.2, out_layers.3, emb_layers.1) + 11 skip connections + 2 down- and 2 upsamplers
    assert len(conv) == 66 and len(unet_targets(unet, "all-linear,conv", names)) == 788
    assert sum(uses_conv_rank(t.layer) for t in conv) == 17 * 2 + 4
    conv_names = {t.kohya_name for t in conv}
    assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_4_0_skip_connection",
            "lora_unet_middle_block_2_emb_layers_1", "lora_unet_output_blocks_8_0_out_layers_3",
            "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv"} <= conv_names
    assert not any(n.startswith(("lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed")) for n in conv_names)


def _kohya_sdxl_prefix(path: str) -> str:
    """kohya's SDXL UNet naming rule (sd-scripts library/sdxl_model_util.py, its SDXL-only arithmetic), written
    here independently of sdlora's layout-derived table: a diffusers module path in the SGM layout."""
    import re

    res = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)$", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}.{res.get(rest, rest)}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv$", path):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op"
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)$", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}.{res.get(rest, rest)}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv$", path):
        return f"output_blocks.{3 * int(m[1]) + 2}.2.conv"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)$", path):
        idx = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block.{idx}.{res.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"
    raise AssertionError(path)


def test_names_are_kohyas_rule_on_the_real_layout(meta):
    unet = meta[0]
    targets = unet_targets(unet, "all-linear,conv", SDXL_NAMES)
    for t in targets:
        assert t.kohya_name == "lora_unet_" + _kohya_sdxl_prefix(t.module_path).replace(".", "_"), t.module_path
        assert SDXL_NAMES.module_path(t.kohya_name) == ("unet", t.module_path)


def test_training_injection_names_modules_like_kohya(parts):
    """What training writes for an SDXL-architecture family: inject_lora with the family's table, then the pairs
    collected for the file carry kohya's SGM names, one per targeted layer."""
    from sdlora.lora.inject import inject_lora, lora_weights
    from sdlora.lora.spec import NetworkSpec

    base = sdxl_base(parts)
    spec = NetworkSpec(rank=2, targets="all-linear,conv", te_mlp=True)
    unet_hosts, te_hosts = inject_lora(base.unet, base.text_encoders, base.family.te_prefixes, spec, seed=0,
                                       names=base.family.names)
    written = set(lora_weights(unet_hosts + te_hosts))
    kohya = {"lora_unet_" + _kohya_sdxl_prefix(t.module_path).replace(".", "_")
             for t in unet_targets(parts["unet"], "all-linear,conv")}
    kohya |= {t.kohya_name for t in text_encoder_targets(parts["text_encoder"], "lora_te1", True)}
    kohya |= {t.kohya_name for t in text_encoder_targets(parts["text_encoder_2"], "lora_te2", True)}
    assert written == kohya and len(written) == 397


LAYOUTS = {
    "small-sdxl": SMALL_UNET,
    # SD 1.x's pattern at another depth: attention outermost, an attention-free innermost block, one resnet per block
    "one-resnet-sd1-pattern": dict(sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                   cross_attention_dim=32, attention_head_dim=2,
                                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}


@pytest.mark.parametrize("layout", ["sdxl-1.0", *LAYOUTS])
def test_sgm_table_inverts_diffusers_own_converter(meta, layout):
    """A state dict renamed to SGM paths by the table goes back, tensor for tensor, through diffusers'
    convert_ldm_unet_checkpoint; and the table's reading of every SGM name is where diffusers put the tensor."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = meta[0] if layout == "sdxl-1.0" else UNet2DConditionModel(**LAYOUTS[layout])
    names = SgmNameTable.from_unet_config(unet.config)
    state = unet.state_dict()
    sgm, sgm_module = {}, {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        sgm[f"model.diffusion_model.{names.sgm_path(module)}.{param}"] = tensor
        sgm_module[key] = names.sgm_path(module)
    back = convert_ldm_unet_checkpoint(sgm, unet.config)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)
    assert len(set(sgm_module.values())) == len({k.rsplit(".", 1)[0] for k in state})  # no two modules share a name
    for key, sgm_path in sgm_module.items():
        rest = sgm_path.replace(".", "_")
        assert names.unet_path(rest) == key.rsplit(".", 1)[0]
    if layout == "one-resnet-sd1-pattern":
        assert names.layout != SDXL_NAMES.layout  # a table computed, not SDXL's copied
        assert names.sgm_path("up_blocks.0.upsamplers.0.conv") == "output_blocks.1.1.conv"  # no attention before it


def test_both_name_forms_read_back_to_the_module(meta):
    unet = meta[0]
    for path, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            sgm_name = SDXL_NAMES.unet_name(path)
            diffusers_name = "lora_unet_" + path.replace(".", "_")
            assert SDXL_NAMES.module_path(sgm_name) == ("unet", path)
            assert SDXL_NAMES.module_path(diffusers_name) == ("unet", path)
            assert SDXL_NAMES.canonical(diffusers_name) == sgm_name


# --- metadata ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_pred", [False, True])
def test_sdxl_metadata(v_pred):
    meta = training_metadata(
        output_name="s", base_model_version="sdxl_base_v1-0", v_prediction=v_pred, rank=4, alpha=4, network_args={},
        resolution=(1024, 1024), unet_lr=1e-4, te_lr=None, learning_rate=1e-4, optimizer="adamw", lr_scheduler="constant",
        lr_warmup_steps=0, max_grad_norm=1.0, steps=1, max_train_steps=1, epoch=1, num_epochs=1, batch_size=1,
        grad_accum=1, num_batches_per_epoch=1, num_train_images=1, seed=0, mixed_precision="bf16",
        gradient_checkpointing=False, noise_offset=0.0, min_snr_gamma=None, flip_aug=False, enable_bucket=True,
        bucket_info=None, tag_frequency={}, dataset_dirs={}, training_started_at=0.0, training_finished_at=1.0,
        sd_model_name="sdxl", comment="", trigger_phrase=None, title=None, description=None, zero_terminal_snr=v_pred)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    # kohya's sai_model_spec: SDXL keeps one architecture name; v-prediction is told by prediction_type
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")
    assert meta["modelspec.resolution"] == "1024x1024" and meta["ss_resolution"] == "(1024, 1024)"
    assert meta["ss_zero_terminal_snr"] == str(v_pred)


# --- interop with diffusers and kohya-style writers --------------------------------------------------------------


def test_diffusers_consumes_every_key_and_agrees_with_sdlora(parts, xl_file, xl_pipe, xl_ours):
    adapter = load_adapter(xl_file)
    pipe, theirs = xl_pipe
    counts = {k: sum(n.startswith(p) for n in adapter.modules) for k, p in
              (("unet", "lora_unet_"), ("te1", "lora_te1_"), ("te2", "lora_te2_"))}
    assert counts["unet"] == 367 and counts["te1"] == 12 and counts["te2"] == 18  # LoCon: convs came along
    assert (_lora_a_count(pipe.unet), _lora_a_count(pipe.text_encoder), _lora_a_count(pipe.text_encoder_2)) == (
        counts["unet"], counts["te1"], counts["te2"])
    ours = xl_ours
    _assert_same(ours, theirs)
    plain = outputs(parts["unet"], parts["text_encoder"], parts["text_encoder_2"])
    assert all((ours[k] - plain[k]).abs().max() > 1e-2 for k in ours)  # every part was changed by the LoRA


def test_a_diffusers_written_sdxl_file_loads_in_sdlora(parts, xl_file, xl_pipe, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    pipe, theirs = xl_pipe
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, **{f"{k}_lora_layers": get_peft_model_state_dict(m, adapter_name="x") for k, m in components.items()},
        **{f"{k}_lora_adapter_metadata": m.peft_config["x"].to_dict() for k, m in components.items()})
    written = tmp_path / "pytorch_lora_weights.safetensors"
    keys = safetensors.torch.load_file(written).keys()
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in keys)  # diffusers paths, not SGM

    _assert_same(_ours(parts, written), theirs)
    back = tmp_path / "kohya.safetensors"
    assert main(["convert", str(written), "--to", "kohya", "--output", str(back)]) == 0
    ours, orig = load_adapter(back).modules, load_adapter(xl_file).modules
    assert ours.keys() == orig.keys()  # kohya's SGM names again
    for k in orig:
        assert torch.equal(ours[k].down, orig[k].down) and torch.equal(ours[k].up, orig[k].up) and ours[k].alpha == orig[k].alpha


def _kohya_style_file(path, parts):
    """A kohya-format SDXL LoRA written without sdlora's writer or name table: kohya's naming rule, fp16 tensors,
    fp16 0-dim alphas, every transformer linear, both encoders' attention and MLP."""
    g = torch.Generator().manual_seed(4)
    tensors, n = {}, 0
    owners = (("lora_unet", parts["unet"]), ("lora_te1", parts["text_encoder"]), ("lora_te2", parts["text_encoder_2"]))
    for prefix, model in owners:
        for path_, m in model.named_modules():
            in_tf = ".transformer_blocks." in path_ or path_.endswith(("proj_in", "proj_out"))
            in_te = ".self_attn." in path_ or ".mlp." in path_
            if not isinstance(m, torch.nn.Linear) or not (in_tf if prefix == "lora_unet" else in_te):
                continue
            p = _kohya_sdxl_prefix(path_) if prefix == "lora_unet" else path_
            if prefix != "lora_unet" and not p.startswith("text_model."):
                p = "text_model." + p  # kohya's transformers 4 paths
            name = f"{prefix}.{p}".replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = (torch.randn(8, m.in_features, generator=g) * 0.1).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(m.out_features, 8, generator=g) * 0.1).half()
            tensors[f"{name}.alpha"] = torch.tensor(1.0).half()  # kohya's default: dim 8, alpha 1
            n += 1
    safetensors.torch.save_file(tensors, path, {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    return n


def test_a_kohya_style_sdxl_file_loads_in_sdlora_like_in_diffusers(parts, tmp_path):
    f = tmp_path / "kohya_xl.safetensors"
    n = _kohya_style_file(f, parts)
    adapter = load_adapter(f)
    assert len(adapter.modules) == n and all(m.alpha == 1.0 and m.rank == 8 for m in adapter.modules.values())
    names = SgmNameTable.from_unet_config(SMALL_UNET)
    ours_names = {t.kohya_name for t in _all_targets(parts["unet"], parts["text_encoder"], parts["text_encoder_2"],
                                                      names, "all-linear")}
    assert set(adapter.modules) == ours_names  # what sdlora trains is what kohya names
    warnings = []
    base = sdxl_base(parts)
    LoraMixer(base, warn=warnings.append).load(f)
    assert not warnings
    ours = outputs(base.unet, base.text_encoders["text_encoder"], base.text_encoders["text_encoder_2"])
    pipe = sdxl_pipeline(parts)
    pipe.load_lora_weights(str(f), adapter_name="x")
    _assert_same(ours, outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2))


# --- the file tools ----------------------------------------------------------------------------------------------


def test_inspect_an_sdxl_file(xl_file, capsys):
    assert main(["inspect", str(xl_file), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["architecture"] == "sdxl" and r["format"] == "kohya LoCon" and r["modules"] == 397
    t = r["targets"]
    assert list(t)[:1] == ["input_blocks.1"] and "mid" in t and "output_blocks.8" in t
    assert t["text encoder 1"] == 12 and t["text encoder 2"] == 18
    names = list(load_adapter(xl_file).modules)
    assert t["input_blocks.4"] == sum(n.startswith("lora_unet_input_blocks_4_") for n in names) > 0
    assert t["mid"] == sum(n.startswith("lora_unet_middle_block_") for n in names) > 0
    assert main(["inspect", str(xl_file)]) == 0
    assert "architecture: sdxl (SDXL key names" in capsys.readouterr().out


def test_convert_sdxl_to_diffusers_and_back(parts, xl_file, xl_ours, tmp_path, capsys):
    diff, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert main(["convert", str(xl_file), "--to", "diffusers", "--output", str(diff)]) == 0
    capsys.readouterr()
    reports = []
    for f in (xl_file, diff):  # inspect groups the diffusers-layout file by SGM blocks too
        assert main(["inspect", str(f), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[1]["architecture"] == "sdxl" and reports[1]["format"] == "peft/diffusers LoCon"
    assert reports[1]["targets"] == reports[0]["targets"]
    keys = safetensors.torch.load_file(diff).keys()
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)
    assert any(k.startswith("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.") for k in keys)
    pipe = sdxl_pipeline(parts)
    pipe.load_lora_weights(str(diff), adapter_name="x")
    _assert_same(outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2), xl_ours)
    assert main(["convert", str(diff), "--to", "kohya", "--output", str(back)]) == 0
    a, b = load_adapter(xl_file).modules, load_adapter(back).modules
    assert a.keys() == b.keys() and all(torch.equal(a[k].up, b[k].up) and a[k].alpha == b[k].alpha for k in a)


def _dense(m: ModuleWeights) -> torch.Tensor:
    return m.scale * (m.up.flatten(1).double() @ m.down.flatten(1).double())


def test_merge_resize_meta_on_sdxl_files(xl_file, tmp_path):
    full = load_adapter(xl_file)
    some = sorted(full.modules)[::8]  # every block kind, both encoders, convs and linears; fewer SVDs
    assert any("_op" in n or "_conv" in n for n in some) and any(n.startswith("lora_te2_") for n in some)
    kohya = tmp_path / "k.safetensors"
    save_adapter(kohya, {n: full.modules[n] for n in some}, dict(full.metadata), torch.float32)
    # the same LoRA in diffusers' layout merges module for module with the kohya file
    diff = tmp_path / "d.safetensors"
    assert main(["convert", str(kohya), "--to", "diffusers", "--output", str(diff)]) == 0
    merged = tmp_path / "m.safetensors"
    assert main(["merge", "--lora", f"{kohya}:0.75", "--lora", f"{diff}:0.25", "--output", str(merged),
                 "--save-dtype", "fp32"]) == 0
    m = load_adapter(merged)
    assert sorted(m.modules) == some
    for n in some:  # 0.75 + 0.25 of one LoRA is that LoRA
        torch.testing.assert_close(_dense(m.modules[n]), _dense(full.modules[n]), rtol=1e-5, atol=1e-6)
    assert m.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert m.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    small = tmp_path / "r.safetensors"
    assert main(["resize", str(diff), "--rank", "1", "--output", str(small)]) == 0
    r = load_adapter(small)
    assert sorted(r.modules) == some and {w.rank for w in r.modules.values()} == {1}  # kohya names again

    assert main(["meta", str(small), "--set", "trigger_phrase=sks xl"]) == 0
    assert load_adapter(small).metadata["modelspec.trigger_phrase"] == "sks xl"


def test_files_for_the_other_family_are_refused_with_the_reason(parts, xl_file, tmp_path):
    from sdlora.models.base import load_base

    with pytest.raises(SdloraError, match=r"does not fit this base: it is an SDXL LoRA .* SD 1.x"):
        LoraMixer(load_base("tiny")).load(xl_file)
    sd1 = tmp_path / "sd1.safetensors"
    save_adapter(sd1, {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": ModuleWeights(
        torch.ones(4, 32), torch.ones(32, 4), 4.0)}, {"ss_base_model_version": "sd_v1"})
    with pytest.raises(SdloraError, match=r"it is an SD 1.x/2.x LoRA \(one text encoder: lora_te_ keys\) and the base "
                                          r"small-sdxl is SDXL"):
        LoraMixer(sdxl_base(parts)).load(sd1)
    # UNet-only, diffusers paths: the names do not tell, the cross-attention width does
    unet_only = tmp_path / "unet_only.safetensors"
    save_adapter(unet_only, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": ModuleWeights(
        torch.ones(4, 768), torch.ones(64, 4), 4.0)}, {})
    with pytest.raises(SdloraError, match=r"take a 768-wide text context, SD 1.x, the base small-sdxl \(SDXL\) gives 96"):
        LoraMixer(sdxl_base(parts)).load(unet_only)
    from sdlora.lora.specs import LoraSpec
    from sdlora.tools.merge import merge_loras

    no_meta = tmp_path / "sd1_no_meta.safetensors"
    save_adapter(no_meta, dict(load_adapter(sd1).modules), {})
    with pytest.raises(SdloraError, match=r"xl.safetensors is an SDXL LoRA \(SDXL key names.* an SD 1.x LoRA \(one text"):
        merge_loras([LoraSpec(str(xl_file)), LoraSpec(str(no_meta))], tmp_path / "no.safetensors")
