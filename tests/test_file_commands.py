"""`sdlora inspect`, `sdlora meta` and `sdlora convert` on real (trained) and hand-built files."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdlora.cli.main import main
from sdlora.formats.kohya import ModuleWeights, file_sha256, load_adapter, save_adapter, tensor_hashes
from sdlora.formats.names import kohya_name as kohya_module_name
from sdlora.lora.mixer import LoraMixer
from sdlora.models.base import load_base
from sdlora.tools.convert import module_path


def _split(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + n], raw[8 + n :]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _hashes_verify(path: Path) -> bool:
    meta = load_adapter(path).metadata
    return tensor_hashes(safetensors.torch.load_file(path), meta) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])


# --- inspect ---------------------------------------------------------------------------------------------------


def test_inspect_trained_file_json_and_text(trained_lora, capsys):
    rc, out, _ = _run(capsys, "inspect", str(trained_lora), "--json")
    assert rc == 0
    r = json.loads(out)
    adapter = load_adapter(trained_lora)
    assert r["format"] == "kohya LoRA" and r["architecture"] == "sd_v1"
    assert r["modules"] == len(adapter.modules)
    assert r["rank"] == {"min": 4, "max": 4, "most_common": 4}
    assert r["alpha"]["most_common"] == next(iter(adapter.modules.values())).alpha
    assert sum(r["targets"].values()) == len(adapter.modules)
    n_te = sum(1 for n in adapter.modules if n.startswith("lora_te_"))
    assert r["targets"].get("text encoder", 0) == n_te
    assert any(b.startswith("down_blocks.") for b in r["targets"]) and "mid" in r["targets"]
    assert r["trigger_words"] == ["sks sketch"]
    assert r["top_tags"] and all(c >= 1 for _, c in r["top_tags"])
    assert r["training"]["ss_steps"] == "30" and r["training"]["ss_seed"] == "7"
    h = r["hashes"]
    assert h["sha256"] == file_sha256(trained_lora) and h["autov2"] == h["sha256"][:10]
    assert h["sshs_verified"] is True and h["sshs_model_hash"] == h["tensor_sha256"]
    assert h["autov3"] == h["tensor_sha256"][:12] and h["modelspec_hash_sha256"] == "0x" + h["tensor_sha256"]
    assert r["dtypes"] == ["F32"] and r["size_bytes"] == trained_lora.stat().st_size
    assert r["zero_modules"] == 0

    rc, text, _ = _run(capsys, "inspect", str(trained_lora))
    assert rc == 0
    for label in ("format:       kohya LoRA", "architecture: sd_v1", "rank 4", "trigger:      sks sketch", "top tags:",
                  "steps: 30", f"AutoV2 {h['autov2']}", "(verified)"):
        assert label in text, label
    assert "warning" not in text


def test_inspect_counts_untrained_modules_and_names_lycoris(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    other = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "z.safetensors"
    save_adapter(path, {name: ModuleWeights(torch.randn(2, 64), torch.zeros(48, 2), 1.0),
                        other: ModuleWeights(torch.randn(2, 96), torch.randn(96, 2), 1.0)}, {})
    rc, out, _ = _run(capsys, "inspect", str(path))
    assert rc == 0 and "warning: 1 of 2 modules have all-zero weights (untrained)" in out and name in out

    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({f"{name}.hada_w1_a": torch.ones(48, 2), f"{name}.hada_w1_b": torch.ones(2, 64),
                                 f"{name}.hada_w2_a": torch.ones(48, 2), f"{name}.hada_w2_b": torch.ones(2, 64),
                                 f"{name}.alpha": torch.tensor(1.0)}, loha)
    rc, out, _ = _run(capsys, "inspect", str(loha), "--json")
    r = json.loads(out)
    assert r["format"] == "kohya LoHa" and r["types"] == {"LoHa": 1} and r["rank"]["max"] == 2


# --- meta ------------------------------------------------------------------------------------------------------


def test_meta_edits_in_place_and_keeps_tensor_bytes(trained_lora, tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    shutil.copy(trained_lora, path)
    _, data_before = _split(path)
    before = load_adapter(path).metadata

    rc, out, _ = _run(capsys, "meta", str(path), "--set", "trigger_phrase=my style, sketchy",
                      "--set", "description=Pencil sketches", "--set", "modelspec.author=me")
    assert rc == 0
    header, data = _split(path)
    assert data == data_before and header.startswith(b'{"') and len(header) % 8 == 0
    meta = load_adapter(path).metadata
    assert meta["modelspec.trigger_phrase"] == "my style, sketchy"
    assert meta["modelspec.description"] == "Pencil sketches" and meta["modelspec.author"] == "me"
    assert meta["sshs_model_hash"] == before["sshs_model_hash"] and meta["sshs_legacy_hash"] == before["sshs_legacy_hash"]
    assert _hashes_verify(path) and "recomputed" not in out
    assert f"sha256 {file_sha256(path)}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]  # no temp file left

    rc, out, _ = _run(capsys, "meta", str(path), "--set", "ss_output_name=renamed", "--unset", "description")
    assert rc == 0 and "recomputed sshs_model_hash and sshs_legacy_hash" in out
    meta = load_adapter(path).metadata
    assert meta["ss_output_name"] == "renamed" and "modelspec.description" not in meta
    assert _split(path)[1] == data_before and _hashes_verify(path)


def test_meta_failure_leaves_the_file_untouched(trained_lora, tmp_path, monkeypatch, capsys):
    path = tmp_path / "a.safetensors"
    shutil.copy(trained_lora, path)
    original = path.read_bytes()

    def boom(tmp, *_a, **_k):  # the disk fills up once the new file is written, before it replaces the old one
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr("sdlora.formats.header._keep_mode_and_owner", boom)
    rc, _, err = _run(capsys, "meta", str(path), "--set", "title=x")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("sdlora: error: cannot access ") and "No space left" in err
    assert path.read_bytes() == original and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp, no lock
    monkeypatch.undo()

    for argv, msg in ((["--set", "colour=red"], "unknown metadata key 'colour'"),
                      (["--set", "sshs_model_hash=0"], "computed from the tensors"),
                      (["--set", "novalue"], "expected KEY=VALUE"),
                      (["--unset", "modelspec.license"], "no such metadata key")):
        rc, _, err = _run(capsys, "meta", str(path), *argv)
        assert rc == 2 and msg in err and err.count("\n") == 1
    assert path.read_bytes() == original


# --- convert ---------------------------------------------------------------------------------------------------


def test_module_paths_of_every_tiny_layer_roundtrip():
    base = load_base("tiny")
    for model, prefix, owner in ((base.unet, "lora_unet", "unet"), (base.text_encoders["text_encoder"], "lora_te", "text_encoder")):
        for path, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                canonical = path if owner == "unet" or path.startswith("text_model.") else f"text_model.{path}"
                assert module_path(kohya_module_name(prefix, canonical)) == (owner, canonical)


def _random_locon(template: Path, path: Path, base) -> Path:
    """The trained file's modules with strong random weights, plus a 3x3 conv (LoCon) module and mixed alphas."""
    g = torch.Generator().manual_seed(3)
    mods = {k: ModuleWeights(torch.randn(w.down.shape, generator=g) * 0.3, torch.randn(w.up.shape, generator=g) * 0.3,
                             w.alpha if i % 3 else 2.0)
            for i, (k, w) in enumerate(load_adapter(template).modules.items())}
    conv = base.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    mods["lora_unet_down_blocks_0_resnets_0_conv1"] = ModuleWeights(
        torch.randn(2, conv.in_channels, 3, 3, generator=g) * 0.3, torch.randn(conv.out_channels, 2, 1, 1, generator=g) * 0.3, 1.0)
    save_adapter(path, mods, dict(load_adapter(template).metadata), torch.float16)
    return path


def _unet_out(base):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    ids = base.family.tokenize(base, ["a red circle"])["text_encoder"]
    with torch.no_grad():
        return base.unet(x, torch.tensor([500, 20]), encoder_hidden_states=ctx).sample, base.text_encoders["text_encoder"](ids)[0]


def test_convert_roundtrip_and_diffusers_loads_the_output(trained_lora, tmp_path, capsys):
    pytest.importorskip("peft")
    ours = load_base("tiny")
    kohya = _random_locon(trained_lora, tmp_path / "k.safetensors", ours)
    diff = tmp_path / "d.safetensors"
    rc, out, _ = _run(capsys, "convert", str(kohya), "--to", "diffusers", "--output", str(diff))
    assert rc == 0 and out.splitlines()[0] == str(diff) and f"sha256 {file_sha256(diff)}" in out
    keys = safetensors.torch.load_file(diff).keys()
    assert all(k.startswith(("unet.", "text_encoder.text_model.encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    assert _hashes_verify(diff)

    back = tmp_path / "k2.safetensors"
    assert main(["convert", str(diff), "--to", "kohya", "--output", str(back)]) == 0
    assert _split(back)[1] == _split(kohya)[1]  # tensor bytes identical (fp16 kept, alphas exact)
    assert load_adapter(back).metadata == load_adapter(kohya).metadata
    a, b = load_adapter(kohya).modules, load_adapter(back).modules
    assert a.keys() == b.keys() and all(a[k].alpha == b[k].alpha for k in a)

    # diffusers' own loader on the converted file == sdlora's mixer on the kohya file
    LoraMixer(ours).load(kohya, 1.0)
    theirs = load_base("tiny")
    pipe = theirs.pipeline()
    pipe.load_lora_weights(str(diff), adapter_name="x")
    n_unet = sum(1 for n, _ in theirs.unet.named_modules() if n.endswith("lora_A"))
    n_te = sum(1 for n, _ in theirs.text_encoders["text_encoder"].named_modules() if n.endswith("lora_A"))
    assert n_unet + n_te == len(a) and n_te == sum(1 for k in a if k.startswith("lora_te_"))
    (u1, t1), (u2, t2) = _unet_out(ours), _unet_out(theirs)
    torch.testing.assert_close(u2, u1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t2, t1, rtol=1e-5, atol=1e-5)
    plain = load_base("tiny")
    assert (u1 - _unet_out(plain)[0]).abs().max() > 1e-2  # the LoRA changed the output


def test_convert_refuses_loha_and_bad_inputs(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({f"{name}.hada_w1_a": torch.ones(48, 2), f"{name}.hada_w1_b": torch.ones(2, 64),
                                 f"{name}.hada_w2_a": torch.ones(48, 2), f"{name}.hada_w2_b": torch.ones(2, 64)}, loha)
    rc, _, err = _run(capsys, "convert", str(loha), "--to", "diffusers")
    assert rc == 2 and "LoHa modules are full weight updates" in err and err.count("\n") == 1
    assert not (tmp_path / "loha.diffusers.safetensors").exists()


@pytest.mark.parametrize("command", [["inspect"], ["meta"], ["meta", "--set", "title=x"], ["convert", "--to", "kohya"]])
def test_cli_one_line_errors_for_missing_and_non_safetensors_files(tmp_path, capsys, command):
    missing = tmp_path / "nope.safetensors"
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors at all, just words")
    for path, msg in ((missing, "adapter file not found"), (text, "is not a .safetensors file")):
        rc, out, err = _run(capsys, command[0], str(path), *command[1:])
        assert rc == 2 and err.startswith("sdlora: error: ") and msg in err and err.count("\n") == 1, err
