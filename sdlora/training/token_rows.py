"""Keep only the token-embedding rows a training run uses on the device.

A CLIP text encoder's token table is 49,408 rows (76 MB in bf16 for CLIP-L), frozen, while a run's captions and
sample prompts touch a few hundred. With the text-encoder LoRA on, the encoder must stay on the device, so the table
is swapped for those rows and a lookup from token id to row; the full table waits on the host and comes back after.
Not in transformers or peft: they keep whole vocabularies, as inference needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sdlora.models.base import BaseModel


class TokenRows(nn.Module):
    """A frozen nn.Embedding restricted to the given token ids; any other id reads the row of `fallback`."""

    def __init__(self, full: nn.Embedding, ids: torch.Tensor, fallback: int):
        super().__init__()
        used = torch.unique(torch.cat([ids.flatten().cpu(), torch.tensor([fallback])]))
        lookup = torch.full((full.num_embeddings,), int(torch.searchsorted(used, fallback)), dtype=torch.long)
        lookup[used] = torch.arange(len(used))
        device = full.weight.device
        self.register_buffer("lookup", lookup.to(device))
        self.weight = nn.Parameter(full.weight.detach()[used.to(device)].clone(), requires_grad=False)
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.lookup[ids], self.weight)


def base_token_rows(base: BaseModel, token_ids: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
    """token_rows_only for a BaseModel, given family.tokenize's output for every prompt the block will encode."""
    return token_rows_only((base.text_encoders[k], ids, base.tokenizers[k].eos_token_id) for k, ids in token_ids.items())


@contextmanager
def token_rows_only(encoders: Iterable[tuple[nn.Module, torch.Tensor, int]]) -> Iterator[None]:
    """For each (text encoder, every token id it will see, fallback id): inside the block the encoder embeds only
    those ids; its full table rests on the host and is put back where the encoder is when the block ends."""
    swapped = []
    try:
        for te, ids, fallback in encoders:
            full = te.get_input_embeddings()
            if not isinstance(full, nn.Embedding):
                continue  # already trimmed, or an embedding of another kind: leave it
            te.set_input_embeddings(TokenRows(full, ids, fallback))
            swapped.append((te, full.to("cpu")))
        yield
    finally:
        for te, full in swapped:
            te.set_input_embeddings(full.to(te.get_input_embeddings().weight.device))
