"""Mixing LoRAs at strengths: exactness at 0, linearity, additivity, fusing, diffusers equivalence."""

import numpy as np
import pytest
import torch

from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter
from sdlora.lora.mixer import LoraMixer
from sdlora.lora.specs import extract_prompt_loras, parse_lora_spec
from sdlora.models.base import load_base
from sdlora.sample.generate import generate_images

PROMPT = "a small red circle on a grey background"


def _random_lora(path, template, seed, scale=0.3):
    """A file with the trained file's layout but strong random updates, so effects are far above noise."""
    g = torch.Generator().manual_seed(seed)
    mods = {
        k: ModuleWeights(torch.randn(w.down.shape, generator=g) * scale, torch.randn(w.up.shape, generator=g) * scale, w.alpha)
        for k, w in load_adapter(template).modules.items()
    }
    save_adapter(path, mods, {"ss_output_name": path.stem}, torch.float32)
    return path


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def _unet_out(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        return base.unet(x, torch.tensor([500, 20]), encoder_hidden_states=ctx).sample


def _te_out(base):
    ids = base.family.tokenize(base, [PROMPT])["text_encoder"]
    with torch.no_grad():
        return base.text_encoders["text_encoder"](ids)[0]


def test_strength_zero_is_the_base_bit_for_bit(base, trained_lora, tmp_path):
    before_img = np.asarray(generate_images(base, PROMPT, seed=5, steps=3)[0])
    before = _unet_out(base)
    mixer = LoraMixer(base)
    name = mixer.load(_random_lora(tmp_path / "r.safetensors", trained_lora, 1), 0.0)
    assert torch.equal(_unet_out(base), before)
    assert np.array_equal(np.asarray(generate_images(base, PROMPT, seed=5, steps=3)[0]), before_img)
    mixer.set_strength(name, 1.0)
    assert not torch.equal(_unet_out(base), before)
    mixer.remove(name)
    assert torch.equal(_unet_out(base), before)


def test_strength_scales_the_delta_linearly_and_two_loras_add(base, trained_lora, tmp_path):
    a = _random_lora(tmp_path / "a.safetensors", trained_lora, 2)
    b = _random_lora(tmp_path / "b.safetensors", trained_lora, 3)
    mixer = LoraMixer(base)
    y0, t0 = _unet_out(base), _te_out(base)
    na = mixer.load(a, 1.0)
    # Only attn2 (and the text encoder) carry LoRAs, so compare one LoRA-carrying layer directly for exact linearity.
    host = base.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    x = torch.randn(3, 77, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_y = host.base(x)
        d1 = host(x) - base_y
        mixer.set_strength(na, 0.5)
        d_half = host(x) - base_y
        mixer.set_strength(na, -1.0)
        d_neg = host(x) - base_y
    torch.testing.assert_close(d_half, 0.5 * d1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_neg, -d1, rtol=1e-5, atol=1e-6)
    mixer.set_strength(na, 0.0)
    nb = mixer.load(b, 0.0)
    with torch.no_grad():
        mixer.set_strength(nb, 1.0)
        db = host(x) - base_y
        mixer.set_strength(na, 1.0)
        dab = host(x) - base_y
    torch.testing.assert_close(dab, d1 + db, rtol=1e-5, atol=1e-5)
    # the text-encoder strength is separate from the UNet one
    mixer.set_strength(na, 1.0, te_strength=0.0)
    mixer.set_strength(nb, 1.0, te_strength=0.0)
    assert torch.equal(_te_out(base), t0)
    assert not torch.equal(_unet_out(base), y0)
    mixer.remove(na)
    mixer.remove(nb)
    assert torch.equal(_unet_out(base), y0)


@pytest.mark.parametrize("merged", [False, True])
def test_set_strengths_in_one_call_is_the_same_as_one_at_a_time(merged, base, trained_lora, tmp_path, monkeypatch):
    """Several LoRAs' strengths in one call (one recompute of the merged weights) give what separate calls give."""
    from sdlora.lora.layer import LoraHost

    monkeypatch.setattr(LoraHost, "merged_inference", merged)
    mixer = LoraMixer(base)
    na = mixer.load(_random_lora(tmp_path / "a.safetensors", trained_lora, 4), 1.0)
    nb = mixer.load(_random_lora(tmp_path / "b.safetensors", trained_lora, 5), 1.0)
    try:
        _unet_out(base)  # builds the inference caches the changes then update in place
        mixer.set_strength(na, 0.5)
        mixer.set_strength(nb, -0.7, te_strength=0.2)
        one_at_a_time = (_unet_out(base), _te_out(base))
        mixer.set_strengths({na: (1.0, None), nb: (1.0, None)})
        assert not torch.equal(_unet_out(base), one_at_a_time[0])
        mixer.set_strengths({na: (0.5, None), nb: (-0.7, 0.2)})
        torch.testing.assert_close(_unet_out(base), one_at_a_time[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_te_out(base), one_at_a_time[1], rtol=1e-5, atol=1e-5)
        assert mixer.settings[nb] == (-0.7, 0.2, None)
    finally:
        mixer.remove(na)
        mixer.remove(nb)


def test_fuse_matches_unfused_and_unfuse_restores_exact_weights(base, trained_lora, tmp_path):
    mixer = LoraMixer(base)
    na = mixer.load(_random_lora(tmp_path / "a.safetensors", trained_lora, 4), 0.7)
    nb = mixer.load(_random_lora(tmp_path / "b.safetensors", trained_lora, 5), -0.4, 0.2)
    weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    unfused = _unet_out(base)
    with mixer.fused():
        fused = _unet_out(base)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
    for k, v in base.unet.state_dict().items():
        assert torch.equal(v, weights[k]), k
    mixer.remove(na)
    mixer.remove(nb)


def test_diffusers_load_lora_weights_gives_the_same_images(trained_lora, tmp_path):
    """Our file through diffusers' own loader (peft) vs sdlora's mixer, same seed and sampler."""
    lora = _random_lora(tmp_path / "d.safetensors", trained_lora, 6, scale=0.5)
    ours_base = load_base("tiny")
    plain = generate_images(ours_base, PROMPT, seed=11, steps=4)[0]
    mixer = LoraMixer(ours_base)
    mixer.load(lora, 0.8)
    pipe = ours_base.pipeline()
    lat = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(11))
    ours = pipe(PROMPT, num_inference_steps=4, latents=lat.clone(), output_type="np").images

    theirs_base = load_base("tiny")
    pipe2 = theirs_base.pipeline()
    pipe2.load_lora_weights(str(lora), adapter_name="style")
    pipe2.set_adapters(["style"], adapter_weights=[0.8])
    n_te = sum(1 for n, _ in pipe2.text_encoder.named_modules() if n.endswith("lora_A"))
    n_unet = sum(1 for n, _ in pipe2.unet.named_modules() if n.endswith("lora_A"))
    assert (n_unet, n_te) == (64, 48)  # diffusers matched every module, text encoder included
    theirs = pipe2(PROMPT, num_inference_steps=4, latents=lat.clone(), output_type="np").images
    # fp32 on CPU: only rounding differs (sdlora folds the scale into one addmm). This strong random LoRA makes
    # sampling chaotic: scaling the LoRA output by (1 + 1e-7) alone moves these pixels by ~1e-3 (measured).
    assert np.abs(ours - theirs).max() < 5e-3
    assert np.abs(ours - theirs).mean() < 2e-4
    assert np.abs(ours - np.asarray(plain, dtype=np.float32) / 255).mean() > 0.01  # and the LoRA did something


def test_misfit_files_are_refused_or_warned(base, trained_lora, tmp_path):
    from sdlora.errors import SdloraError

    w = ModuleWeights(torch.zeros(4, 640), torch.zeros(640, 4), 4.0)
    sdxl = tmp_path / "xl.safetensors"
    save_adapter(sdxl, {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": w, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": w}, {})
    with pytest.raises(SdloraError, match=r"does not fit this base: it is an SDXL LoRA .* SD 1.x"):
        LoraMixer(base).load(sdxl)
    mods = dict(load_adapter(trained_lora).modules)
    mods["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] = w
    partial = tmp_path / "partial.safetensors"
    save_adapter(partial, mods, {})
    warnings = []
    mixer = LoraMixer(base, warn=warnings.append)
    name = mixer.load(partial)
    assert len(warnings) == 1 and "1 of 113 modules do not fit" in warnings[0] and "input_blocks_4" in warnings[0]
    mixer.remove(name)


def test_lora_specs_and_a1111_prompt_tags(trained_lora, tmp_path):
    assert parse_lora_spec("a.safetensors") .strength == 1.0
    s = parse_lora_spec("C:/x/a.safetensors:0.8:-0.5")
    assert (s.path, s.strength, s.te_strength) == ("C:/x/a.safetensors", 0.8, -0.5)
    d = tmp_path / "loras"
    d.mkdir()
    (d / "mystyle.safetensors").write_bytes(trained_lora.read_bytes())
    prompt, specs = extract_prompt_loras("a red circle, <lora:mystyle:0.6>, sketch <lora:mystyle:0.5:0.9>", d)
    assert prompt == "a red circle, sketch"
    assert (specs[0].strength, specs[0].te_strength) == (0.6, 0.6)
    assert (specs[1].te_strength, specs[1].strength) == (0.5, 0.9)  # A1111: <lora:name:te:unet>
    # A1111 also resolves the ss_output_name alias ("lora" for the trained file)
    _, specs = extract_prompt_loras("x <lora:lora:1>", d)
    assert specs[0].path.endswith("mystyle.safetensors")


@pytest.mark.parametrize("merged", [False, True])  # True: the GPU default (one merged weight per layer)
def test_strength_change_updates_inference_weights_in_place_and_structure_changes_are_versioned(merged, monkeypatch):
    """What a captured CUDA graph of the UNet relies on (sdlora/unet_graph.py), checked on the CPU."""
    from torch import nn

    from sdlora.lora.layer import LoraAdapter, LoraHost, structure_version

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    monkeypatch.setattr(LoraHost, "merged_inference", merged)
    host = LoraHost(lin, "x")
    a, b = LoraAdapter(lin, 4), LoraAdapter(lin, 2)
    for ad in (a, b):
        nn.init.normal_(ad.up.weight)
        ad.requires_grad_(False)
    host.add("a", a, 0.7)
    host.add("b", b, 0.2)
    x = torch.randn(3, 16)

    def reference(sa: float, sb: float) -> torch.Tensor:
        return lin(x) + a.up(a.down(x)) * sa + b.up(b.down(x)) * b.scale * sb

    with torch.no_grad():
        torch.testing.assert_close(host(x), reference(0.7, 0.2))
        cache = host._merged if merged else host._stacked[1][1]
        v = structure_version()
        host.set_strength("a", -0.3)  # in place: the same tensor, new values, no new structure
        assert (host._merged if merged else host._stacked[1][1]) is cache and structure_version() == v
        torch.testing.assert_close(host(x), reference(-0.3, 0.2))
        host.set_strength("a", 0.0)
        host.set_strength("b", 0.0)  # all off: the output is the base's, bit for bit
        if not merged:
            assert structure_version() > v  # the low-rank path then skips the layer: a structural change
        assert torch.equal(host(x), lin(x))
        v = structure_version()
        host.fuse()
        assert structure_version() > v
        host.unfuse()
        host.remove("b")
        assert structure_version() > v + 1


def test_unet_graph_wrapper_is_transparent_where_it_cannot_replay(base):
    """On the CPU (and for anything it cannot capture) the sampling wrapper calls the UNet's own forward."""
    from sdlora.sample.unet_graph import UNetGraphs, graphed_unet

    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(2, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = base.unet(x, torch.tensor(500), ctx).sample
        wrapper = UNetGraphs(base.unet)
        assert torch.equal(wrapper.forward(x, torch.tensor(500), ctx).sample, want)
        assert torch.equal(wrapper.forward(x, torch.tensor(500), ctx, return_dict=False)[0], want)
        with graphed_unet(base.unet) as g:
            assert g is None  # no GPU: nothing replaced
            assert torch.equal(base.unet(x, torch.tensor(500), ctx).sample, want)
    assert not wrapper.graphs
