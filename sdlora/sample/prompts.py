"""Prompts longer than CLIP's 77 tokens, encoded in 75-token chunks as AUTOMATIC1111 and ComfyUI do.

CLIP sees at most 77 tokens (BOS + 75 + EOS). A1111 and ComfyUI split a longer prompt into chunks of 75 tokens,
encode each as its own BOS + 75 + EOS (padded with EOS) window, and concatenate the chunks' hidden states along
the sequence: the UNet's cross-attention takes any number of tokens. The negative prompt is padded with empty
chunks to the same count, because classifier-free guidance batches both. Prompts that fit in one window take
diffusers' own path unchanged, so short prompts give the same images as before, bit for bit.

The encoders and tokenizers come from the base's family (`text_encoder_keys`). With two (SDXL), each window goes
through both, their penultimate hidden states side by side (768 + 1280), and the pooled embedding is the first
window's, as A1111 and ComfyUI do; an empty negative prompt is all zeros, as the SDXL pipeline makes it.
"""

from __future__ import annotations

import torch

CHUNK = 75  # tokens per window, between BOS and EOS


def token_ids(tokenizer, text: str) -> list[int]:
    """The prompt's tokens without BOS/EOS and without truncation."""
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def chunk_windows(ids: list[int], n_chunks: int, bos: int, eos: int, pad: int) -> torch.Tensor:
    """[n_chunks, 77] windows: BOS + up to 75 tokens + EOS, padded; chunks past the prompt's end are empty."""
    rows = []
    for k in range(n_chunks):
        part = ids[k * CHUNK : (k + 1) * CHUNK]
        rows.append([bos, *part, eos] + [pad] * (CHUNK - len(part)))
    return torch.tensor(rows, dtype=torch.long)


def n_chunks(tokenizer, texts: list[str]) -> int:
    """Windows the longest of `texts` needs (1 for an empty prompt)."""
    return max(1, *(-(-len(token_ids(tokenizer, t)) // CHUNK) for t in texts))


@torch.no_grad()
def encode_chunked(encoder, tokenizer, texts: list[str], chunks: int) -> torch.Tensor:
    """[len(texts), 77 * chunks, width]: each window encoded alone, the windows' hidden states side by side."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for text in texts:
        windows = chunk_windows(token_ids(tokenizer, text), chunks, tokenizer.bos_token_id, tokenizer.eos_token_id, pad)
        hidden = encoder(windows.to(encoder.device))[0]  # [chunks, 77, width]
        out.append(hidden.reshape(1, -1, hidden.shape[-1]))
    return torch.cat(out)


@torch.no_grad()
def encode_chunked_pair(base, texts: list[str], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two encoders (SDXL): [len(texts), 77 * chunks, width1 + width2] penultimate hidden states, window by window,
    and [len(texts), pooled width]: the last encoder's pooled projection of each text's first window."""
    hidden, pooled = [], []
    for text in texts:
        per_encoder = []
        for key in base.family.text_encoder_keys:
            tok, enc = base.tokenizers[key], base.text_encoders[key]
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            windows = chunk_windows(token_ids(tok, text), chunks, tok.bos_token_id, tok.eos_token_id, pad)
            out = enc(windows.to(enc.device), output_hidden_states=True)
            per_encoder.append(out.hidden_states[-2])  # [chunks, 77, width]
        h = torch.cat(per_encoder, dim=-1)
        hidden.append(h.reshape(1, -1, h.shape[-1]))
        pooled.append(out.text_embeds[:1])
    return torch.cat(hidden), torch.cat(pooled)


def long_prompt_embeds(base, prompts: list[str], negatives: list[str]) -> dict[str, torch.Tensor] | None:
    """`prompt_embeds` / `negative_prompt_embeds` (and SDXL's pooled pair) for the diffusers pipeline when a prompt
    needs more than one window, else None (the pipeline tokenizes as usual)."""
    keys = base.family.text_encoder_keys
    tokenizers = [base.tokenizers[k] for k in keys]
    chunks = max(n_chunks(tok, [*prompts, *negatives]) for tok in tokenizers)
    if chunks == 1:
        return None
    if len(keys) == 2:
        return _pair_embeds(base, prompts, negatives, chunks)
    tokenizer, encoder = tokenizers[0], base.text_encoders[keys[0]]
    dtype = next(encoder.parameters()).dtype
    return {
        "prompt_embeds": encode_chunked(encoder, tokenizer, prompts, chunks).to(dtype),
        "negative_prompt_embeds": encode_chunked(encoder, tokenizer, negatives, chunks).to(dtype),
    }


def _pair_embeds(base, prompts: list[str], negatives: list[str], chunks: int) -> dict[str, torch.Tensor]:
    dtype = next(base.text_encoders[base.family.text_encoder_keys[-1]].parameters()).dtype
    embeds, pooled = encode_chunked_pair(base, prompts, chunks)
    if any(negatives):
        neg, neg_pooled = encode_chunked_pair(base, negatives, chunks)
    else:  # the SDXL pipeline's force_zeros_for_empty_prompt
        neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return {"prompt_embeds": embeds.to(dtype), "negative_prompt_embeds": neg.to(dtype),
            "pooled_prompt_embeds": pooled.to(dtype), "negative_pooled_prompt_embeds": neg_pooled.to(dtype)}
