"""Decoding several sequences as one batch of rows (``Stage.forward_rows``, each row with its
own cache and length) equals decoding each alone, on every architecture."""

from __future__ import annotations

import pytest
import torch

from hpipe.model.kv_cache import RowCaches
from hpipe.model.source import open_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# float32 on CPU: the batched projections sum in another order than one row's; observed
# differences ~1e-6 on logits spanning ~10.
ATOL = 1e-4


def test_rows_of_different_lengths_equal_one_at_a_time(tiny_checkpoint):
    src = open_model(tiny_checkpoint)
    model = src.load_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, src.spec.vocab_size, (1, n), generator=gen) for n in (5, 11, 2)]
    alone = [model.new_cache(max_tokens=32) for _ in prompts]
    rows = [model.new_cache(max_tokens=32) for _ in prompts]
    with torch.inference_mode():
        for p, a, r in zip(prompts, alone, rows):
            model(p, a)
            model(p, r)
        tokens = torch.randint(3, src.spec.vocab_size, (len(prompts), 1), generator=gen)
        for _ in range(3):  # three steps, the lengths stay apart
            want = torch.cat([model(tokens[i:i + 1], c) for i, c in enumerate(alone)])
            got = model.forward_rows(tokens, RowCaches(rows))
            assert got.shape == want.shape == (len(prompts), 1, src.spec.vocab_size)
            assert (got - want).abs().max().item() <= ATOL
            tokens = want[:, -1].argmax(-1, keepdim=True)
    assert [c.length for c in rows] == [c.length for c in alone] == [8, 14, 5]


def test_middle_stages_take_rows_of_hidden_states(tiny_checkpoints):
    src = open_model(tiny_checkpoints["llama"])
    first = src.load_stage(0, 2, has_embedding=True, has_head=False)
    second = src.load_stage(2, 4, has_embedding=False, has_head=True)
    caches = [(first.new_cache(max_tokens=16), second.new_cache(max_tokens=16)) for _ in "ab"]
    with torch.inference_mode():
        for n, (c1, c2) in zip((3, 6), caches):
            second(first(torch.arange(3, 3 + n)[None], c1), c2)
        ids = torch.tensor([[7], [9]])
        want = torch.cat([second(first(ids[i:i + 1], c1), c2)
                          for i, (c1, c2) in enumerate(caches)])
        for c1, c2 in caches:  # the same step again, as rows
            c1.length -= 1
            c2.length -= 1
        h = first.forward_rows(ids, RowCaches([c1 for c1, _ in caches]))
        got = second.forward_rows(h, RowCaches([c2 for _, c2 in caches]))
    assert (got - want).abs().max().item() <= ATOL
