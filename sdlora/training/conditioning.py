"""Captions -> the UNet's conditioning, through the base's family: a trainable text encoder runs in every step,
a frozen one is run once per caption and its outputs are cached on the device."""

from __future__ import annotations

import contextlib

import torch

from sdlora.models.base import BaseModel
from sdlora.sample.prompts import token_ids
from sdlora.training.step import to_device
from sdlora.training.token_rows import base_token_rows

SizeInfo = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # original (h, w), crop (top, left), target (h, w)


class Conditioning:
    """`inputs(captions, sizes)` is what a micro-batch carries (a flat dict of tensors, copied into a CUDA graph's
    static inputs); `encode(inputs)` runs inside the step and returns the UNet's keyword arguments."""

    def __init__(self, base: BaseModel, captions: list[str], extra_prompts: list[str], trainable: bool,
                 device: torch.device):
        self.base, self.family, self.device, self.trainable = base, base.family, device, trainable
        self.row = {c: i for i, c in enumerate(captions)}
        self._trimmed = contextlib.ExitStack()  # the token tables, trimmed while training; put back by close()
        if trainable:  # captions are tokenized once; the text encoder (with its LoRA) runs in every step
            self.token_ids = self.family.tokenize(base, captions)
            # sample prompts are generated whole (long ones in 75-token chunks), so every token they hold stays
            rows = {k: torch.cat([ids.flatten(), _all_tokens(base.tokenizers[k], extra_prompts)])
                    for k, ids in self.token_ids.items()}
            self._trimmed.enter_context(base_token_rows(base, rows))
        else:  # frozen text encoders: each caption is encoded once and kept on the device
            self.cached = {k: v.to(device, base.dtype) for k, v in encode_captions(base, captions).items()}
            for te in base.text_encoders.values():
                te.to("cpu")  # not needed again until samples are drawn: frees its GPU memory

    def inputs(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> dict[str, torch.Tensor]:
        idx = torch.tensor([self.row[c] for c in captions])
        if self.trainable:
            cond = {k: to_device(v[idx], self.device) for k, v in self.token_ids.items()}
        else:
            idx = to_device(idx, self.device)
            cond = {k: v[idx] for k, v in self.cached.items()}
        size_cond = self._size_cond(sizes or [])
        if size_cond is not None:
            cond["size_cond"] = to_device(size_cond, self.device)
        return cond

    def _size_cond(self, sizes: list[SizeInfo]) -> torch.Tensor | None:
        rows = [self.family.size_conditioning(*s) for s in sizes]
        return torch.stack(rows) if rows and rows[0] is not None else None

    def encode(self, cond: dict[str, torch.Tensor]) -> dict:
        if self.trainable:
            return self.family.encode_prompt(self.base, cond)
        text = {k: v for k, v in cond.items() if k != "size_cond"}
        return self.family.unet_kwargs(text, cond.get("size_cond"))

    def __call__(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> dict:
        """UNet keyword arguments for these captions (validation)."""
        return self.encode(self.inputs(captions, sizes))

    def close(self) -> None:
        self._trimmed.close()


@torch.no_grad()
def encode_captions(base: BaseModel, captions: list[str]) -> dict[str, torch.Tensor]:
    """Frozen text encoders: every caption's embeddings, stacked in caption order, on the host."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(captions), 32):
        chunk = captions[i : i + 32]
        for k, v in base.family.encode_text(base, base.family.tokenize(base, chunk)).items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _all_tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Every token id the prompts use, uncut, plus BOS, EOS and padding (the empty negative's window)."""
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return torch.tensor([i for i in special if i is not None] + [i for p in prompts for i in token_ids(tokenizer, p)],
                        dtype=torch.long)
