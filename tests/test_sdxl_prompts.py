"""SDXL prompts over 77 tokens: each 75-token window through both encoders (penultimate states side by side),
the first window's pooled embedding, an empty negative all zeros, as A1111/ComfyUI and the SDXL pipeline do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora.models.base import load_base
from sdlora.sample.generate import generate_images
from sdlora.sample.prompts import CHUNK, chunk_windows, encode_chunked_pair, long_prompt_embeds, n_chunks

HEAD = "a large red circle in the center of a white background"
FILLER = ", ".join(f"detail {i}" for i in range(40))  # ~120 tokens


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-xl")


def test_one_window_equals_the_pipelines_encode_prompt(base):
    pipe = base.pipeline(None)
    ours, pooled = encode_chunked_pair(base, [HEAD], 1)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(HEAD, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    assert long_prompt_embeds(base, [HEAD], [""]) is None  # short prompts keep the pipeline's own path


def test_long_prompt_windows_pooled_and_zero_negative(base):
    prompt = f"{FILLER}, {HEAD}"
    tok1, tok2 = (base.tokenizers[k] for k in base.family.text_encoder_keys)
    chunks = n_chunks(tok1, [prompt])
    assert chunks >= 2 and n_chunks(tok2, [prompt]) == chunks
    e = long_prompt_embeds(base, [prompt], [""])
    width = sum(base.text_encoders[k].config.hidden_size for k in base.family.text_encoder_keys)
    assert e["prompt_embeds"].shape == (1, 77 * chunks, width)
    assert e["negative_prompt_embeds"].abs().sum() == 0 and e["negative_pooled_prompt_embeds"].abs().sum() == 0
    ids = tok1(prompt, add_special_tokens=False).input_ids
    first, first_pooled = encode_chunked_pair(base, [tok1.decode(ids[:CHUNK])], 1)
    torch.testing.assert_close(e["prompt_embeds"][:, :77], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(e["pooled_prompt_embeds"], first_pooled, rtol=0, atol=1e-6)  # the first window's
    # the last window is the prompt's tail encoded alone, by each encoder, side by side
    te2 = base.text_encoders["text_encoder_2"]
    tail = chunk_windows(tok2(prompt, add_special_tokens=False).input_ids[(chunks - 1) * CHUNK :], 1,
                         tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id)
    with torch.no_grad():
        h2 = te2(tail, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(e["prompt_embeds"][:, 77 * (chunks - 1):, -h2.shape[-1]:], h2, rtol=0, atol=0)
    neg = long_prompt_embeds(base, [prompt], ["blurry"])
    assert neg["negative_prompt_embeds"].shape == e["prompt_embeds"].shape and neg["negative_prompt_embeds"].abs().sum() > 0


def test_long_sdxl_prompt_keeps_its_tail_in_the_image(base):
    prompt = f"{FILLER}, {HEAD}"
    ids = base.tokenizers["text_encoder"](prompt, add_special_tokens=False).input_ids
    cut = base.tokenizers["text_encoder"].decode(ids[:CHUNK])
    long_img, cut_img = (np.asarray(generate_images(base, p, seed=3, steps=3, width=64, height=64)[0], np.float32)
                         for p in (prompt, cut))
    assert np.abs(long_img - cut_img).mean() > 1.0  # the words past token 77 changed the picture
