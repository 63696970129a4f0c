"""End-to-end training on the embedded base: file contents, resume, interrupts, failures."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.errors import SdloraError
from sdlora.models.base import load_base
from sdlora.training.loop import resume_config, train

from .conftest import quick_config


def test_thirty_step_run_writes_a_complete_kohya_file(trained_lora):
    tensors = load_file(trained_lora)
    with safe_open(str(trained_lora), "pt") as f:
        meta = f.metadata()
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unet = [n for n in names if n.startswith("lora_unet_")]
    te = [n for n in names if n.startswith("lora_te_")]
    # tiny base has SD1.5's 16 transformer blocks x 4 cross-attn layers, and 12 CLIP layers x q/k/v/out
    assert len(unet) == 64 and len(te) == 48
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in unet
    assert "lora_te_text_model_encoder_layers_11_self_attn_q_proj" in te
    for n in names:
        down, up, alpha = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"], tensors[f"{n}.alpha"]
        assert down.shape[0] == 4 and up.shape[1] == 4 and alpha.dim() == 0 and float(alpha) == 4.0
        assert torch.isfinite(down).all() and torch.isfinite(up).all()
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    width = load_base("tiny").unet.config.block_out_channels[0]
    assert tuple(tensors[f"{q}.lora_down.weight"].shape) == (4, width)  # [rank, in]
    assert tuple(tensors[f"{q}.lora_up.weight"].shape) == (width, 4)  # [out, rank]
    assert any(float(tensors[f"{n}.lora_up.weight"].abs().max()) > 0 for n in unet)  # it trained
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "30" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_seed"] == "7"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "sks sketch"
    assert json.loads(meta["ss_tag_frequency"])["images"]["sks sketch"] == 8
    log = [json.loads(line) for line in (trained_lora.parent / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and all(math.isfinite(r["loss"]) for r in log)


def _final(result):
    return load_file(result.adapter)


def test_resume_after_two_interrupts_is_bit_identical(tmp_path, style_dir):
    kw = dict(steps=30, save_dtype="fp32", lr_scheduler="cosine", lr_warmup_steps=5, batch_size=2, grad_accum=2, flip=True)
    straight = train(quick_config(style_dir, tmp_path / "a", **kw))

    first = train(quick_config(style_dir, tmp_path / "b", interrupt_at_step=11, **kw))
    assert first.interrupted and first.steps == 11 and first.checkpoint.name == "step-000011"
    cfg, _ = resume_config({"interrupt_at_step": 23, "progress": False}, str(tmp_path / "b"))
    second = train(cfg)
    assert second.interrupted and second.steps == 23
    cfg, _ = resume_config({"progress": False}, str(tmp_path / "b"))
    resumed = train(cfg)
    assert not resumed.interrupted and resumed.steps == 30

    a, b = _final(straight), _final(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert log_a == log_b  # every step's loss and lr, in order, once


def test_existing_output_is_refused_without_overwrite(tmp_path, style_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SdloraError, match="already exists"):
        train(quick_config(style_dir, out, steps=1))
    assert (out / "keep.txt").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, style_dir, monkeypatch):
    import sdlora.training.step as tr

    real = tr.F.mse_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(tr.F, "mse_loss", poisoned)
    with pytest.raises(SdloraError, match="loss became nan at step 5"):
        train(quick_config(style_dir, tmp_path / "o", steps=10, save_every=2))
    ckpt = tmp_path / "o" / "checkpoints" / "step-000004" / "lora.safetensors"
    assert all(torch.isfinite(t).all() for t in load_file(ckpt).values())


def test_rank_larger_than_layer_is_refused(tmp_path, style_dir):
    with pytest.raises(SdloraError, match="larger than layer"):
        train(quick_config(style_dir, tmp_path / "o", rank=4096, steps=1))


def test_user_folder_is_never_written(tmp_path, style_dir):
    before = {p: p.stat().st_mtime_ns for p in style_dir.rglob("*")}
    train(quick_config(style_dir, tmp_path / "o", steps=2, cache_latents="disk", sample_prompt=["a red circle"], sample_every=1, sample_steps=2))
    assert {p: p.stat().st_mtime_ns for p in style_dir.rglob("*")} == before
    assert sorted(p.name for p in (tmp_path / "o" / "samples").iterdir()) == ["step-000001-0.png", "step-000002-0.png"]
    assert len(list((tmp_path / "o" / "cache").glob("latents-*.safetensors"))) == 1


def test_validation_loss_is_logged_and_the_best_adapter_kept(tmp_path, style_dir):
    result = train(quick_config(style_dir, tmp_path / "o", steps=12, validation_split=0.25, validation_every=4))
    log = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert [r["step"] for r in log if "val_loss" in r] == [4, 8, 12]
    assert all(math.isfinite(v) for v in vals)
    best = tmp_path / "o" / "lora-best.safetensors"
    with safe_open(str(best), "pt") as f:
        assert float(f.metadata()["sdlora_validation_loss"]) == pytest.approx(min(vals), abs=1e-6)
    assert result.adapter.exists()
    # 2 of the 8 images were held out: the training set shrank accordingly
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "6"


def test_validation_numbers_are_reproducible(tmp_path, style_dir):
    """Fixed timesteps and noise: the step-0 adapter (zero up weights) gives the same value every time."""
    from sdlora.data.folder import scan_images
    from sdlora.data.latents import encode_images
    from sdlora.models.base import load_base as lb
    from sdlora.training.validation import make_cases, validation_loss

    base = lb("tiny")
    ex = encode_images(scan_images(style_dir)[:2], base.vae, 128, True, True, False, 0, None, False)
    cases = make_cases(ex, 0, base.vae.config.scaling_factor, 1000)
    from contextlib import nullcontext

    ids = {c: base.family.encode_prompt(base, base.family.tokenize(base, [c])) for c in {x.caption for x in cases}}
    a = validation_loss(cases, base.unet, base.noise_scheduler, lambda caps, sizes: ids[caps[0]], False, nullcontext)
    b = validation_loss(cases, base.unet, base.noise_scheduler, lambda caps, sizes: ids[caps[0]], False, nullcontext)
    assert a == b and math.isfinite(a) and len(cases) == 10
