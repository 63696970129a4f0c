"""Issue 13's model-side items: prompts over 77 tokens work in `generate` by 75-token chunks (as in A1111 and
ComfyUI), `all-linear` is kohya's full set (text-encoder MLP included), `inspect` reads SD1 from LyCORIS LoHa/LoKr
widths, and the CPU thread count follows the idle cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.torch
import torch

from sdlora.cli.main import main
from sdlora.models.base import load_base
from sdlora.sample.generate import generate_images
from sdlora.sample.prompts import CHUNK, chunk_windows, encode_chunked, long_prompt_embeds, n_chunks
from sdlora.util import choose_cpu_threads, configure_cpu_threads

HEAD = "sks pastel, a large red circle in the center of a white background"
FILLER = ", ".join(f"detail {i}" for i in range(40))  # ~120 tokens


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


# ---------------------------------------------------------------- long prompts


def test_windows_are_bos_75_eos_and_padded():
    ids = list(range(1000, 1000 + 160))
    w = chunk_windows(ids, 3, bos=1, eos=2, pad=0)
    assert w.shape == (3, 77)
    assert w[:, 0].tolist() == [1, 1, 1] and w[0, 1:76].tolist() == ids[:75] and w[0, 76] == 2
    assert w[2, 1:11].tolist() == ids[150:] and w[2, 11] == 2 and w[2, 12:].eq(0).all()


def test_one_window_matches_the_standard_encoding(base):
    tok, te = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
    ours = encode_chunked(te, tok, [HEAD], 1)
    ids = tok([HEAD], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours, te(ids)[0], rtol=0, atol=0)
    assert long_prompt_embeds(base, [HEAD], [""]) is None  # short prompts keep diffusers' own path, bit for bit


def test_long_prompt_uses_every_chunk_and_pads_the_negative(base):
    prompt = f"{FILLER}, {HEAD}"  # the words that matter come after token 77: cut, they would be lost
    tok = base.tokenizers["text_encoder"]
    chunks = n_chunks(tok, [prompt])
    assert chunks >= 2 and len(tok(FILLER, add_special_tokens=False).input_ids) >= CHUNK  # HEAD starts past the cut
    e = long_prompt_embeds(base, [prompt], ["blurry"])
    width = base.text_encoders["text_encoder"].config.hidden_size
    assert e["prompt_embeds"].shape == e["negative_prompt_embeds"].shape == (1, 77 * chunks, width)
    # windows side by side, in order: rows 77k..77k+76 are tokens 75k..75k+74 encoded as a window of their own
    ids = tok(prompt, add_special_tokens=False).input_ids
    te = base.text_encoders["text_encoder"]
    with torch.no_grad():
        for k in range(chunks):
            window = chunk_windows(ids[k * CHUNK :], 1, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
            torch.testing.assert_close(e["prompt_embeds"][:, 77 * k : 77 * (k + 1)], te(window)[0], rtol=0, atol=0)
        blank = chunk_windows([], chunks, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert torch.equal(e["negative_prompt_embeds"][:, 77:], te(blank)[0][1:].reshape(1, -1, width))  # padding

    long_img = np.asarray(generate_images(base, prompt, seed=3, steps=4)[0], dtype=np.float32)
    cut = tok.decode(ids[:CHUNK])  # what the pipeline alone would have kept
    cut_img = np.asarray(generate_images(base, cut, seed=3, steps=4)[0], dtype=np.float32)
    assert np.abs(long_img - cut_img).mean() > 1.0  # the words past token 77 changed the picture


def test_generate_cli_takes_a_long_prompt_and_training_warns_once(capsys, tmp_path, base):
    rc = main(["generate", "--prompt", f"{FILLER}, {HEAD}", "--negative", "ugly, " * 50, "--steps", "2",
               "--output", str(tmp_path / "img")])
    out, err = capsys.readouterr()
    assert rc == 0 and len(list((tmp_path / "img").glob("*.png"))) == 1, err
    assert "longer than CLIP" not in err  # nothing is cut in generate
    import sdlora.util

    sdlora.util._WARNED.discard("long-caption")
    base.family.tokenize(base, [HEAD, f"{FILLER}, {HEAD}"])
    base.family.tokenize(base, [f"{FILLER}, {HEAD}"])
    err = capsys.readouterr().err
    assert err.count("longer than CLIP's 77 tokens") == 1 and "1 of 2 captions" in err


def test_training_keeps_every_token_of_a_long_sample_prompt(base):
    """With the text-encoder LoRA on, training keeps only the token rows it uses on the device: a long sample
    prompt is generated in chunks, so its tokens past 77 must be kept too, not read as padding."""
    from sdlora.training.conditioning import Conditioning

    tok, te = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
    prompt = f"{FILLER}, zebra giraffe octopus"  # words that appear nowhere in the first 77 tokens or the captions
    late = torch.tensor(tok(prompt, add_special_tokens=False).input_ids[-3:])  # zebra, giraffe, octopus
    assert not set(late.tolist()) & set(tok(f"{FILLER}, a red circle").input_ids[:77])
    with torch.no_grad():
        full = te.get_input_embeddings()(late).clone()
    cond = Conditioning(base, ["a red circle"], [prompt], trainable=True, device=torch.device("cpu"))
    try:
        with torch.no_grad():
            assert torch.equal(te.get_input_embeddings()(late), full)
    finally:
        cond.close()


# ---------------------------------------------------------------- all-linear = kohya's full set


def test_all_linear_means_kohyas_full_set_with_the_text_encoder_mlp(tmp_path):
    from sdlora.models.tiny import tiny_base_dir
    from sdlora.training.config import apply_base_defaults, make_config

    tiny = tiny_base_dir()
    mk = lambda **kw: apply_base_defaults(make_config(None, images="i", **kw), tiny)  # noqa: E731
    assert mk(targets="all-linear").te_mlp is True
    assert mk(targets="all-linear,conv").te_mlp is True
    assert mk(targets="cross-attn").te_mlp is False
    assert mk(targets="all-linear", te_mlp=False).te_mlp is False  # --no-te-mlp still wins
    assert mk(targets="attn", te_mlp=True).te_mlp is True
    assert mk().te_mlp is True  # the tiny base recommends all-linear
    assert make_config(None, images="i", targets="all-linear").network().te_mlp  # before the base's defaults too

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.lora.targets import text_encoder_targets, unet_targets

    with torch.device("meta"):  # SD1.5's real shapes, no memory
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig())
    cfg = mk(targets="all-linear")
    n = len(unet_targets(unet, cfg.targets)) + len(text_encoder_targets(te, mlp=cfg.te_mlp))
    assert n == 192 + 72  # kohya's LoRA-LierLa on SD1.x


# ---------------------------------------------------------------- inspect: LyCORIS 4 LoHa/LoKr for SD1.5


def _lycoris_full(kind: str, path) -> int:
    """A LyCORIS 4 'full' preset file for SD1.5 at rank 1: every UNet Linear/Conv2d (conv_in/out and the time
    embedding too) plus the text encoder's attention and MLP, with SD1.5's real widths. Returns the key count."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.lora.targets import text_encoder_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig())
    layers = [(f"lora_unet_{n.replace('.', '_')}", m) for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    layers += [(t.kohya_name, t.layer) for t in text_encoder_targets(te, mlp=True)]
    tensors = {}
    for name, m in layers:
        out_f, in_f = m.weight.shape[:2]
        k = math.prod(m.weight.shape[2:])
        if kind == "LoHa":
            for w in ("w1", "w2"):
                tensors[f"{name}.hada_{w}_a"] = torch.full((out_f, 1), 0.01, dtype=torch.float16)
                tensors[f"{name}.hada_{w}_b"] = torch.full((1, in_f * k), 0.01, dtype=torch.float16)
        else:
            f = math.gcd(out_f, in_f, 8)
            tensors[f"{name}.lokr_w1"] = torch.full((f, f), 0.1, dtype=torch.float16)
            tensors[f"{name}.lokr_w2_a"] = torch.full((out_f // f, 1), 0.1, dtype=torch.float16)
            tensors[f"{name}.lokr_w2_b"] = torch.full((1, in_f // f * k), 0.1, dtype=torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    safetensors.torch.save_file(tensors, path, {"ss_network_module": "lycoris.kohya"})  # no base-model metadata
    return len(tensors)


@pytest.mark.parametrize("kind, keys", [("LoHa", 1770), ("LoKr", 1416)])
def test_inspect_reads_sd1_from_lycoris_widths(capsys, tmp_path, kind, keys):
    path = tmp_path / f"{kind}.safetensors"
    assert _lycoris_full(kind, path) == keys  # the key counts of the LyCORIS 4 files
    rc = main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "architecture: sd_v1 (cross-attention width 768)" in out and f"kohya {kind}" in out


# ---------------------------------------------------------------- CPU threads


def test_thread_choice_leaves_busy_cores_alone():
    assert choose_cpu_threads(cores=2, busy=0.1) == 1  # 2 cores: one thread, idle or not (see its docstring)
    assert choose_cpu_threads(cores=4, busy=0.1) == 4
    assert choose_cpu_threads(cores=4, busy=0.9) == 3
    assert choose_cpu_threads(cores=4, busy=5.0) == 1  # never 0
    assert choose_cpu_threads(cores=8, busy=2.3) == 6
    assert choose_cpu_threads(cores=4, busy=9.0) == 1


def test_thread_setting_respects_the_users_choice(monkeypatch):
    before = torch.get_num_threads()
    try:
        env = {"SDLORA_THREADS": "1"}
        assert configure_cpu_threads(env) == 1 and torch.get_num_threads() == 1
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"
        assert configure_cpu_threads({"OMP_NUM_THREADS": "3"}) is None  # the user's OpenMP setting is left alone
        said = []
        monkeypatch.setattr("sdlora.util.busy_cores", lambda window=0.2: 64.0)
        monkeypatch.setattr("sdlora.util.cpu_count", lambda: 8)  # on 2 cores it is 1 thread, busy or not
        assert configure_cpu_threads({}, said.append) == 1 and "using 1 CPU thread" in said[0]
        with pytest.raises(Exception, match="SDLORA_THREADS must be a whole number"):
            configure_cpu_threads({"SDLORA_THREADS": "many"})
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_bench_cpu_threads_smoke(tmp_path):
    """The benchmark's own code path on the CPU: one short `sdlora train` run beside a spinning process."""
    import importlib.util

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_cpu_threads", REPO / "scripts" / "bench_cpu_threads.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--steps", "6", "--images", "2", "--settings", "auto", "--loads", "busy", "--busy", "1",
                      "--json", str(tmp_path / "r.json")])
    rows = out["rows"]
    assert [(r["setting"], r["load"]) for r in rows] == [("auto", "1 spinning processes")] and rows[0]["it_per_s"] > 0
    assert (tmp_path / "r.json").exists()
