"""The trimmed token table: the same embeddings for the run's prompts, the full table back afterwards."""

import torch
from torch import nn

from sdlora.models.base import load_base
from sdlora.training.token_rows import TokenRows, base_token_rows


def test_trimmed_table_encodes_the_runs_prompts_exactly_and_is_put_back():
    base = load_base("tiny")
    te = base.text_encoders["text_encoder"]
    full = te.get_input_embeddings()
    prompts = ["sks sketch, a small red circle above a blue square", ""]
    ids = base.family.tokenize(base, prompts)
    with torch.no_grad():
        want = base.family.encode_prompt(base, ids)["encoder_hidden_states"]
        with base_token_rows(base, ids):
            rows = te.get_input_embeddings()
            assert isinstance(rows, TokenRows)
            assert rows.weight.shape[0] < 20 < full.num_embeddings  # the prompts' few distinct ids, not the vocabulary
            got = base.family.encode_prompt(base, ids)["encoder_hidden_states"]
            # an id outside the run reads the fallback (end-of-text) row instead of indexing out of range
            eos = base.tokenizers["text_encoder"].eos_token_id
            assert 1000 not in ids["text_encoder"]
            assert torch.equal(rows(torch.tensor([[1000]])), full(torch.tensor([[eos]])))
        assert te.get_input_embeddings() is full and isinstance(full, nn.Embedding)
    assert torch.equal(got, want)
