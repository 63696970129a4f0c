"""Reading other adapter formats: LoHa, LoKr, Tucker LoCon, DoRA, full diffs, peft and the old diffusers
attention-processor layout. Files are built by hand for real modules of the tiny base, and each layer's output is
checked against base + strength * ΔW x with ΔW computed here from the published formula."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from sdlora.errors import SdloraError
from sdlora.formats.kohya import load_adapter
from sdlora.lora.mixer import LoraMixer
from sdlora.models.base import load_base

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # Linear (cross-attention key)
LIN_PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 3x3, C -> C
CONV_PATH = "down_blocks.0.resnets.0.conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


@pytest.fixture(scope="module")
def dims(base):
    """(OUT, IN) of the Linear and C of the 3x3 conv, read from the tiny base so its sizes may change."""
    out, inp = base.unet.get_submodule(LIN_PATH).weight.shape
    c = base.unet.get_submodule(CONV_PATH).weight.shape[0]
    assert out % 4 == 0 and inp % 8 == 0 and c % 4 == 0
    return out, inp, c


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _save(path, tensors):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _apply(layer, x, dw):
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, dw)
    return F.conv2d(x, dw, None, layer.stride, layer.padding)


def _input(layer, seed=1):
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, 5, layer.in_features, generator=_g(seed))
    return torch.randn(2, layer.in_channels, 8, 8, generator=_g(seed))


def _check_layer(base, path, module_path, expected_dw, strength=0.7):
    """Load through the mixer; compare the layer with base + strength * ΔW x, at 0 (bit-exact) and fused."""
    warnings = []
    mixer = LoraMixer(base, warn=warnings.append)
    name = mixer.load(path, strength)
    host = base.unet.get_submodule(module_path)
    x = _input(host.base)
    try:
        with torch.no_grad():
            y_base = host.base(x)
            expected = y_base + strength * _apply(host.base, x, expected_dw)
            torch.testing.assert_close(host(x), expected, rtol=1e-5, atol=1e-5)
            with mixer.fused():
                torch.testing.assert_close(host(x), expected, rtol=1e-4, atol=1e-4)
            mixer.set_strength(name, 0.0)
            assert torch.equal(host(x), y_base)
    finally:
        mixer.remove(name)  # the base is shared by the module's tests
    assert not warnings


def test_loha_linear_and_conv(base, dims, tmp_path):
    out, inp, ch = dims
    g = _g(2)
    r = 4
    w = {k: torch.randn(*s, generator=g) * 0.3 for k, s in
         (("w1a", (out, r)), ("w1b", (r, inp)), ("w2a", (out, r)), ("w2b", (r, inp)))}
    c = {k: torch.randn(*s, generator=g) * 0.3 for k, s in
         (("w1a", (ch, r)), ("w1b", (r, ch * 9)), ("w2a", (ch, r)), ("w2b", (r, ch * 9)))}
    tensors = {f"{LIN}.hada_w1_a": w["w1a"], f"{LIN}.hada_w1_b": w["w1b"], f"{LIN}.hada_w2_a": w["w2a"],
               f"{LIN}.hada_w2_b": w["w2b"], f"{LIN}.alpha": torch.tensor(2.0),
               f"{CONV}.hada_w1_a": c["w1a"], f"{CONV}.hada_w1_b": c["w1b"], f"{CONV}.hada_w2_a": c["w2a"],
               f"{CONV}.hada_w2_b": c["w2b"]}  # no alpha: scale 1
    path = _save(tmp_path / "loha.safetensors", tensors)
    loaded = load_adapter(path)
    assert not loaded.modules and loaded.deltas[LIN].kind == "LoHa"
    dw_lin = (w["w1a"] @ w["w1b"]) * (w["w2a"] @ w["w2b"]) * (2.0 / r)
    dw_conv = ((c["w1a"] @ c["w1b"]) * (c["w2a"] @ c["w2b"])).reshape(ch, ch, 3, 3)
    _check_layer(base, path, LIN_PATH, dw_lin)
    _check_layer(base, path, CONV_PATH, dw_conv, strength=-0.5)


def test_loha_tucker_conv(base, dims, tmp_path):
    ch = dims[2]
    g = _g(3)
    r = 3
    t1, t2 = torch.randn(r, r, 3, 3, generator=g) * 0.2, torch.randn(r, r, 3, 3, generator=g) * 0.2
    w1a, w2a = torch.randn(r, ch, generator=g), torch.randn(r, ch, generator=g)  # Tucker layout: [rank, out]
    w1b, w2b = torch.randn(r, ch, generator=g), torch.randn(r, ch, generator=g)
    path = _save(tmp_path / "lohat.safetensors", {
        f"{CONV}.hada_t1": t1, f"{CONV}.hada_t2": t2, f"{CONV}.hada_w1_a": w1a, f"{CONV}.hada_w1_b": w1b,
        f"{CONV}.hada_w2_a": w2a, f"{CONV}.hada_w2_b": w2b, f"{CONV}.alpha": torch.tensor(1.0)})

    def rebuild(t, a, b):  # W[o, i, k, l] = sum_pq a[p, o] t[p, q, k, l] b[q, i]
        out = torch.zeros(ch, ch, 3, 3)
        for p in range(r):
            for q in range(r):
                out += a[p][:, None, None, None] * b[q][None, :, None, None] * t[p, q][None, None]
        return out

    _check_layer(base, path, CONV_PATH, rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b) / r)


def test_lokr_full_and_decomposed(base, dims, tmp_path):
    out, inp, ch = dims
    g = _g(4)
    w1 = torch.randn(4, 8, generator=g)
    w2a, w2b = torch.randn(out // 4, 2, generator=g), torch.randn(2, inp // 8, generator=g)
    k = ch // 4
    cw1, cw2 = torch.randn(4, 4, generator=g), torch.randn(k, k, 3, 3, generator=g) * 0.1
    path = _save(tmp_path / "lokr.safetensors", {
        f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2_a": w2a, f"{LIN}.lokr_w2_b": w2b, f"{LIN}.alpha": torch.tensor(1.0),
        f"{CONV}.lokr_w1": cw1, f"{CONV}.lokr_w2": cw2, f"{CONV}.alpha": torch.tensor(8.0)})  # both full: alpha unused
    assert load_adapter(path).deltas[CONV].kind == "LoKr"
    _check_layer(base, path, LIN_PATH, torch.kron(w1, w2a @ w2b) * (1.0 / 2))
    conv_dw = torch.zeros(ch, ch, 3, 3)
    for i in range(4):
        for j in range(4):
            conv_dw[i * k:(i + 1) * k, j * k:(j + 1) * k] = cw1[i, j] * cw2
    _check_layer(base, path, CONV_PATH, conv_dw)


def test_locon_conv_and_tucker_mid(base, dims, tmp_path):
    ch = dims[2]
    g = _g(5)
    down, mid, up = torch.randn(4, ch, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g), torch.randn(ch, 4, 1, 1, generator=g)
    path = _save(tmp_path / "tucker.safetensors", {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid,
                                                   f"{CONV}.lora_up.weight": up, f"{CONV}.alpha": torch.tensor(2.0)})
    dw = torch.tensordot(torch.tensordot(up[:, :, 0, 0], mid, dims=([1], [0])), down[:, :, 0, 0], dims=([1], [0]))
    _check_layer(base, path, CONV_PATH, dw.permute(0, 3, 1, 2) * 0.5)  # [o, k, l, i] -> [o, i, k, l]
    # plain LoCon (kxk down, 1x1 up) stays a LoRA module
    plain = _save(tmp_path / "locon.safetensors", {f"{CONV}.lora_down.weight": torch.randn(4, ch, 3, 3, generator=g),
                                                   f"{CONV}.lora_up.weight": torch.randn(ch, 4, 1, 1, generator=g)})
    assert set(load_adapter(plain).modules) == {CONV}


@pytest.mark.parametrize("orientation", ["output", "input"])
def test_dora(base, dims, tmp_path, orientation):
    out, inp, _ = dims
    g = _g(6)
    down, up = torch.randn(4, inp, generator=g) * 0.2, torch.randn(out, 4, generator=g) * 0.2
    m = torch.rand(out, 1, generator=g) + 0.5 if orientation == "output" else torch.rand(1, inp, generator=g) + 0.5
    path = _save(tmp_path / "dora.safetensors", {f"{LIN}.lora_down.weight": down, f"{LIN}.lora_up.weight": up,
                                                 f"{LIN}.alpha": torch.tensor(2.0), f"{LIN}.dora_scale": m})
    delta = load_adapter(path).deltas[LIN]
    assert delta.kind == "DoRA" and delta.orientation == orientation
    w = base.unet.get_submodule(LIN_PATH)
    w = (w.base if hasattr(w, "base") else w).weight.detach().float()
    v = w + 0.5 * up @ down
    norm = v.norm(dim=1, keepdim=True) if orientation == "output" else v.norm(dim=0, keepdim=True)
    _check_layer(base, path, LIN_PATH, m * v / norm - w)


def test_full_diff(base, dims, tmp_path):
    dw = torch.randn(*dims[:2], generator=_g(7)) * 0.05
    path = _save(tmp_path / "diff.safetensors", {f"{LIN}.diff": dw})
    _check_layer(base, path, LIN_PATH, dw, strength=1.0)
    bias = _save(tmp_path / "diffb.safetensors", {f"{LIN}.diff": dw, f"{LIN}.diff_b": torch.zeros(dims[0])})
    with pytest.raises(SdloraError, match=r"unsupported adapter type .*\.diff_b"):
        load_adapter(bias)


def test_delta_text_encoder_strength_is_separate(base, dims, tmp_path):
    g = _g(8)
    te = base.text_encoders["text_encoder"]
    q = next(m for n, m in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    n_out, n_in = q.weight.shape
    path = _save(tmp_path / "te.safetensors", {f"{TE}.diff": torch.randn(n_out, n_in, generator=g),
                                               f"{LIN}.diff": torch.randn(*dims[:2], generator=g)})
    ids = base.family.tokenize(base, ["a red circle"])["text_encoder"]
    with torch.no_grad():
        before = te(ids)[0]
        mixer = LoraMixer(base)
        name = mixer.load(path, 1.0, te_strength=0.0)
        assert torch.equal(te(ids)[0], before)
        mixer.set_strength(name, 1.0, te_strength=0.5)
        assert not torch.equal(te(ids)[0], before)
    mixer.remove(name)


def test_old_diffusers_processor_and_peft_layouts(base, dims, tmp_path):
    out, inp, _ = dims
    g = _g(9)
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    down, up = torch.randn(4, inp, generator=g), torch.randn(out, 4, generator=g)
    n_out = base.unet.get_submodule(f"{blk}.attn1.to_out.0").weight.shape[0]
    odown, oup = torch.randn(4, n_out, generator=g), torch.randn(n_out, 4, generator=g)
    te_in = base.text_encoders["text_encoder"].config.hidden_size
    old = _save(tmp_path / "old.safetensors", {
        f"unet.{blk}.attn2.processor.to_k_lora.down.weight": down,
        f"unet.{blk}.attn2.processor.to_k_lora.up.weight": up,
        f"{blk}.attn1.processor.to_out_lora.down.weight": odown,  # without the "unet." prefix
        f"{blk}.attn1.processor.to_out_lora.up.weight": oup,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.randn(2, te_in, generator=g),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.randn(te_in, 2, generator=g),
    })
    assert set(load_adapter(old).modules) == {LIN, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", TE}
    _check_layer(base, old, LIN_PATH, up @ down)  # no alpha: alpha = rank
    _check_layer(base, old, f"{blk}.attn1.to_out.0", oup @ odown)

    peft = _save(tmp_path / "peft.safetensors", {f"unet.{LIN_PATH}.lora_A.weight": down, f"unet.{LIN_PATH}.lora_B.weight": up,
                                                 f"unet.{LIN_PATH}.alpha": torch.tensor(1.0)})
    _check_layer(base, peft, LIN_PATH, up @ down / 4)


@pytest.mark.parametrize(("key", "kind"), [(f"{LIN}.oft_blocks", "OFT"), (f"{LIN}.a1.weight", "GLoRA")])
def test_unsupported_types_name_themselves(tmp_path, key, kind):
    path = _save(tmp_path / "x.safetensors", {key: torch.zeros(2, 2)})
    with pytest.raises(SdloraError, match=f"unsupported adapter type .*{kind}") as err:
        load_adapter(path)
    assert "\n" not in str(err.value)


def test_incomplete_loha_is_refused(tmp_path):
    path = _save(tmp_path / "x.safetensors", {f"{LIN}.hada_w1_a": torch.zeros(32, 2)})
    with pytest.raises(SdloraError, match="incomplete LoHa module .*missing hada_w1_b, hada_w2_a, hada_w2_b"):
        load_adapter(path)


def test_delta_that_does_not_fit_is_reported(base, dims, tmp_path):
    path = _save(tmp_path / "x.safetensors", {f"{LIN}.diff": torch.zeros(dims[0], dims[1] + 1)})
    with pytest.raises(SdloraError, match="0 of 1 modules match"):
        LoraMixer(base).load(path)


def test_generate_cli_with_a_loha(dims, tmp_path):
    from sdlora.cli.main import main

    out, inp, _ = dims
    g = _g(10)
    path = _save(tmp_path / "loha.safetensors", {f"{LIN}.hada_w1_a": torch.randn(out, 2, generator=g),
                                                 f"{LIN}.hada_w1_b": torch.randn(2, inp, generator=g),
                                                 f"{LIN}.hada_w2_a": torch.randn(out, 2, generator=g),
                                                 f"{LIN}.hada_w2_b": torch.randn(2, inp, generator=g)})
    out = tmp_path / "imgs"
    assert main(["generate", "--prompt", "a circle", "--lora", f"{path}:0.7", "--steps", "2", "--output", str(out)]) == 0
    assert list(out.glob("*.png"))
