"""--fp8-base: frozen UNet weights stored as float8 and up-cast per layer (sdlora/models/fp8.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from sdlora.errors import SdloraError
from sdlora.lora.layer import LoraAdapter, LoraHost
from sdlora.models.fp8 import FP8, dequantize, layer_weight, store_fp8


def _layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(8 * 16, 12)).requires_grad_(False)


def _saved_dtypes(fn) -> list[tuple[torch.dtype, tuple]]:
    """(dtype, shape) of every tensor autograd saves for the backward while `fn` runs."""
    seen = []

    def pack(t):
        seen.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def test_fp8_layers_compute_with_the_dequantized_weight_and_save_only_fp8_for_backward():
    ref = _layers()
    model = copy.deepcopy(ref)
    assert store_fp8(model) == 3
    weights = [m.weight for m in model if hasattr(m, "weight")]
    assert all(w.dtype == FP8 for w in weights)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = model(x)
    # the same function as the plain layers run on the dequantized weights, in value and in input gradient
    deq = copy.deepcopy(ref)
    for src, dst in zip(model, deq):
        if hasattr(src, "weight"):
            dst.weight.copy_(layer_weight(src))
    x2 = x.detach().clone().requires_grad_()
    expect = deq(x2)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    (out ** 2).sum().backward()
    (expect ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    # and close to the original weights: e4m3 keeps 3 mantissa bits, the per-channel scale keeps the range
    rel = (model(x) - ref(x)).norm() / ref(x).norm()
    assert 0 < rel < 0.05
    # what the backward keeps: fp8 weights and their small scales, never an up-cast copy of a weight
    big = {tuple(w.shape) for w in weights}
    saved = _saved_dtypes(lambda: model(x.detach().requires_grad_()))
    assert [d for d, s in saved if s in big] == [FP8] * 3


def test_store_fp8_keeps_trainable_and_the_in_out_convs():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in, self.mid, self.conv_out = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    m = Tiny().requires_grad_(False)
    m.mid.requires_grad_(True)
    assert store_fp8(m) == 0  # a trainable layer and the latent in/out convs stay as they are
    m.mid.requires_grad_(False)
    assert store_fp8(m) == 1 and m.mid.weight.dtype == FP8 and m.conv_in.weight.dtype == torch.float32


def test_quantize_clamps_to_the_fp8_range_and_rounds_small_weights_per_channel():
    w = torch.tensor([[1e-4, -2e-4, 3e-4], [500.0, -1.0, 0.0]])
    layer = nn.Linear(3, 2).requires_grad_(False)
    layer.weight.copy_(w)
    store_fp8(layer)
    back = dequantize(layer.weight, layer.fp8_scale, torch.float32)
    assert torch.isfinite(back).all()  # e4m3fn has no inf: 500 / scale stays within +-448
    torch.testing.assert_close(back, w, rtol=0.07, atol=1e-9)  # row 0 keeps its tiny values thanks to its own scale
    small = torch.tensor([[1e-4, -2e-4, 3e-4], [0.5, -1.0, 0.0]])
    half = nn.Linear(3, 2).half().requires_grad_(False)
    half.weight.copy_(small)
    store_fp8(half)  # an fp16 scale of 3e-4 / 448 would be zero; it is kept in fp32, the layer computes in fp16
    back = layer_weight(half)
    assert back.dtype == torch.float16 and half.fp8_scale.dtype == torch.float32
    assert back[0].abs().min() > 0
    torch.testing.assert_close(back.float(), small, rtol=0.07, atol=1e-7)


def test_lora_host_on_an_fp8_layer_mixes_unfused_and_refuses_to_fuse():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).requires_grad_(False)
    store_fp8(layer)
    host = LoraHost(layer, "lora_unet_x")
    adapter = LoraAdapter(layer, 4)
    nn.init.normal_(adapter.up.weight, std=0.1)
    adapter.requires_grad_(False)
    host.add("a", adapter, 0.7)
    x = torch.randn(3, 16)
    expect = F.linear(x, layer_weight(layer, torch.float32), layer.bias) + 0.7 * adapter(x)
    with torch.no_grad():
        torch.testing.assert_close(host(x), expect, rtol=1e-5, atol=1e-5)  # low-rank path
        LoraHost.merged_inference = True
        try:
            torch.testing.assert_close(host(x), expect, rtol=1e-5, atol=1e-5)  # the GPU's merged copy
        finally:
            LoraHost.merged_inference = None
    before = layer.weight.clone()
    with pytest.raises(SdloraError, match="fused into base weights stored in fp8"):
        host.fuse()
    assert not host.fused and torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))


def _train(images, out, **kw):
    from sdlora import make_config, train

    cfg = make_config(images=str(images), output=str(out), steps=4, rank=4, progress=False, seed=5, device="cpu",
                      save_dtype="fp32", **kw)
    train(cfg, warn=lambda m: None, info=lambda m: None)
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return losses, tensors, meta


def test_training_with_fp8_base_matches_full_precision_and_writes_the_same_file(tmp_path):
    from tests.conftest import SKETCH

    images = tmp_path / "img"
    images.mkdir()
    for png in sorted(SKETCH.glob("*.png"))[:4]:
        (images / png.name).write_bytes(png.read_bytes())
        (images / png.with_suffix(".txt").name).write_bytes(png.with_suffix(".txt").read_bytes())
    ref_loss, ref, ref_meta = _train(images, tmp_path / "fp32")
    loss, got, meta = _train(images, tmp_path / "fp8", fp8_base=True)
    assert all(torch.isfinite(torch.tensor(loss)))
    assert loss != ref_loss  # the fp8 weights are in effect...
    assert len(loss) == 4 and torch.allclose(torch.tensor(loss), torch.tensor(ref_loss), rtol=0.05, atol=2e-3)  # ...and close
    # the same kohya file: keys, shapes and dtypes; different values only because the base weights differ a little
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    ups = [k for k in got if k.endswith("lora_up.weight")]
    assert all(got[k].abs().max() > 0 for k in ups)  # trained
    assert meta["ss_fp8_base"] == "True" and ref_meta["ss_fp8_base"] == "False"
    assert set(meta) == set(ref_meta)


def test_place_unet_stores_the_unet_in_fp8_and_halves_its_bytes():
    from sdlora.models.base import load_base
    from sdlora.training.setup import place_unet

    base = load_base("tiny", "bf16")
    before = sum(p.numel() * p.element_size() for p in base.unet.parameters())
    said = []
    place_unet(base, torch.device("cpu"), True, said.append)
    linear = [m for m in base.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sum(m.weight.dtype == FP8 for m in linear) == len(linear) - 2  # all but conv_in / conv_out
    assert base.unet.dtype == torch.bfloat16  # what diffusers' pipelines read stays the compute dtype
    after = sum(p.numel() * p.element_size() for p in base.unet.parameters())
    assert after < 0.6 * before and "float8_e4m3fn" in said[0]
