"""One forward over several sequences (``Stage.forward_packed``): an optional prefill slice of
one sequence, then one decode token of each of several others, each over its own cache and at
its own length, equals running each alone, on every architecture."""

from __future__ import annotations

import pytest
import torch

from hpipe.errors import ShapeMismatchError
from hpipe.model.kv_cache import PackedCaches
from hpipe.model.source import open_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# float32 on CPU: the packed projections sum in another order than one sequence's; observed
# differences ~1e-6 on logits spanning ~10.
ATOL = 1e-4


def _prefilled(model, prompts):
    """Two caches per prompt, both holding it: one to run alone, one to run packed."""
    alone = [model.new_cache(max_tokens=48) for _ in prompts]
    packed = [model.new_cache(max_tokens=48) for _ in prompts]
    for p, a, r in zip(prompts, alone, packed):
        if p.shape[1]:
            model(p, a)
            model(p, r)
    return alone, packed


def test_rows_of_different_lengths_equal_one_at_a_time(tiny_checkpoint):
    src = open_model(tiny_checkpoint)
    model = src.load_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, src.spec.vocab_size, (1, n), generator=gen) for n in (5, 11, 2)]
    with torch.inference_mode():
        alone, rows = _prefilled(model, prompts)
        tokens = torch.randint(3, src.spec.vocab_size, (len(prompts), 1), generator=gen)
        for _ in range(3):  # three steps, the lengths stay apart
            want = torch.cat([model(tokens[i:i + 1], c) for i, c in enumerate(alone)], dim=1)
            got = model.forward_packed(tokens.reshape(1, -1), PackedCaches(rows))
            assert got.shape == want.shape == (1, len(prompts), src.spec.vocab_size)
            assert (got - want).abs().max().item() <= ATOL
            tokens = want[0].argmax(-1, keepdim=True)
    assert [c.length for c in rows] == [c.length for c in alone] == [8, 14, 5]


# (cached prefix, slice length): from the start (plain causal), after a prefix (the offset
# mask), far after one (prefix >= 4 x slice: the split attention of decoder.py), one token.
@pytest.mark.parametrize("prefix,tokens", [(0, 6), (5, 4), (13, 3), (7, 1)])
def test_a_slice_and_rows_in_one_forward_equal_each_alone(tiny_checkpoint, prefix, tokens):
    src = open_model(tiny_checkpoint)
    model = src.load_model()
    gen = torch.Generator().manual_seed(prefix * 10 + tokens)
    vocab = src.spec.vocab_size
    prompts = [torch.randint(3, vocab, (1, n), generator=gen) for n in (prefix, 9, 3)]
    piece = torch.randint(3, vocab, (1, tokens), generator=gen)
    row_ids = torch.randint(3, vocab, (1, 2), generator=gen)
    with torch.inference_mode():
        alone, packed = _prefilled(model, prompts)
        want_piece = model(piece, alone[0])[:, -1:]
        want_rows = torch.cat([model(row_ids[:, i:i + 1], c) for i, c in
                               enumerate(alone[1:])], dim=1)
        caches = PackedCaches(packed[1:], piece=packed[0], piece_tokens=tokens)
        got = model.forward_packed(torch.cat([piece, row_ids], dim=1), caches)
        assert got.shape == (1, 3, vocab)
        assert (got[:, :1] - want_piece).abs().max().item() <= ATOL
        assert (got[:, 1:] - want_rows).abs().max().item() <= ATOL
        # The caches hold what each sequence's own forward wrote.
        for a, p in zip(alone, packed):
            assert p.length == a.length
            n = a.length
            assert (p.keys[-1][:, :, :n] - a.keys[-1][:, :, :n]).abs().max().item() <= ATOL
            assert (p.values[0][:, :, :n] - a.values[0][:, :, :n]).abs().max().item() <= ATOL


def test_middle_stages_take_packed_hidden_states(tiny_checkpoints):
    src = open_model(tiny_checkpoints["llama"])
    first = src.load_stage(0, 2, has_embedding=True, has_head=False)
    second = src.load_stage(2, 4, has_embedding=False, has_head=True)
    caches = [(first.new_cache(max_tokens=16), second.new_cache(max_tokens=16))
              for _ in "abc"]
    with torch.inference_mode():
        for n, (c1, c2) in zip((3, 6, 2), caches):
            second(first(torch.arange(3, 3 + n)[None], c1), c2)
        ids = torch.tensor([[7, 8, 9], [5, 6, 0]])  # a 3-token slice; then rows 5 and 6
        want = torch.cat([second(first(ids[:1], caches[0][0]), caches[0][1])[:, -1:]] + [
            second(first(ids[1:, i:i + 1], c1), c2)
            for i, (c1, c2) in enumerate(caches[1:])], dim=1)
        for (c1, c2), n in zip(caches, (3, 1, 1)):  # the same step again, packed
            c1.length -= n
            c2.length -= n

        def packed(k: int) -> PackedCaches:
            return PackedCaches([c[k] for c in caches[1:]], piece=caches[0][k], piece_tokens=3)

        h = first.forward_packed(torch.tensor([[7, 8, 9, 5, 6]]), packed(0))
        assert h.shape == (1, 5, src.spec.hidden)
        got = second.forward_packed(h, packed(1))
        assert (got - want).abs().max().item() <= ATOL
        # Without the slice's logits: the rows' only.
        for c1, c2 in caches:
            c1.length, c2.length = c1.length - 1, c2.length - 1
        caches[0][0].length -= 2
        caches[0][1].length -= 2
        rows_only = second.forward_packed(first.forward_packed(
            torch.tensor([[7, 8, 9, 5, 6]]), packed(0)), packed(1), piece_logits=False)
        assert (rows_only - want[:, 1:]).abs().max().item() <= ATOL


def test_a_packed_input_of_the_wrong_length_is_refused(tiny_checkpoints):
    model = open_model(tiny_checkpoints["llama"]).load_model()
    caches = PackedCaches([model.new_cache(max_tokens=8)], piece=model.new_cache(max_tokens=8),
                          piece_tokens=3)
    with pytest.raises(ShapeMismatchError, match="packed forward over 4 tokens got 5"):
        model.forward_packed(torch.arange(3, 8)[None], caches)


def test_a_shared_prefix_stays_right_while_its_request_decodes_on(tiny_checkpoints):
    """``KVCache.share_prefix`` keeps a prompt's cache without copying it; the request goes on
    writing past it, and a new request started from it gets what a fresh prefill gives."""
    model = open_model(tiny_checkpoints["llama"]).load_model()
    prompt, question = torch.arange(3, 15)[None], torch.tensor([[20, 21, 22]])
    with torch.inference_mode():
        first = model.new_cache(max_tokens=24)
        model(prompt, first)
        kept = first.share_prefix(first.length)
        assert kept.keys[0].data_ptr() == first.keys[0].data_ptr()  # no copy
        for t in (30, 31, 32, 33):  # the first request decodes on
            model(torch.tensor([[t]]), first)
        reused = model.new_cache(max_tokens=24)
        reused.copy_prefix(kept, prompt.shape[1])
        got = model(question, reused)
        fresh = model.new_cache(max_tokens=24)
        want = model(torch.cat([prompt, question], dim=1), fresh)[:, -3:]
    assert (got - want).abs().max().item() <= ATOL
