"""Sliced prefill equals one full prefill; stages in sequence equal the whole model, exactly.

Slices change matmul shapes, so the sums are grouped differently: the tolerance for sliced vs
full is float32 reordering noise: up to 2.4e-5 was seen (30 one-token slices, logits up to ~7,
i.e. ~3e-6 relative); 1e-4, the same bound as the transformers parity, leaves room for other
BLAS builds while any real error (a wrong position offset or mask) moves logits by O(0.1).
Greedy tokens must be identical. Stages run the very same kernels on the very same shapes as the whole model, so
there the check is ``torch.equal``.
"""

import pytest
import torch

from hpipe.model.generate import generate
from hpipe.model.source import open_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SLICE_ATOL = 1e-4
VARIANTS = ("llama", "gpt2", "neox")  # qwen2 is llama + biases: parity covers it
T = 30
SLICINGS = [
    (30,),
    (15, 15),
    (20, 7, 3),  # uneven, longer first (the shape HPipe's DP produces)
    (1, 4, 25),  # uneven, shorter first
    (1,) * 30,  # one token at a time: prefill degenerates to decode
    (29, 1),
    (24, 6),  # a slice after a prefix 4x its length: split attention (decoder.py's note)
    (20, 2, 2, 6),
]


def _ids(vocab: int, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@torch.inference_mode()
def test_sliced_prefill_equals_full_prefill(tiny_checkpoints, variant):
    src = open_model(tiny_checkpoints[variant])
    model = src.load_model()
    ids = _ids(src.spec.vocab_size)
    full = model(ids, model.new_cache(batch=2, max_tokens=T))
    for slicing in SLICINGS:
        cache = model.new_cache(batch=2, max_tokens=T)
        pieces, start = [], 0
        for size in slicing:
            pieces.append(model(ids[:, start : start + size], cache))
            start += size
        assert cache.length == T
        err = (torch.cat(pieces, dim=1) - full).abs().max().item()
        assert err < SLICE_ATOL, f"{variant} slices {slicing}: max err {err:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_sliced_greedy_continuations_identical(tiny_checkpoints, variant):
    src = open_model(tiny_checkpoints[variant])
    model = src.load_model()
    ids = _ids(src.spec.vocab_size)
    runs = [generate(model, ids, max_new_tokens=12, slices=s, eos_token_ids=()) for s in SLICINGS]
    for slicing, run in zip(SLICINGS, runs):
        assert run.output_ids == runs[0].output_ids, f"{variant} slices {slicing}"
        assert run.slices == slicing
        assert len(run.output_ids[0]) == 12


@pytest.mark.parametrize("variant", VARIANTS)
# (0, 1, 2, 4): a first stage with only the embedding, a last with only the head;
# (2, 2): an empty middle stage (a device the plan leaves without layers).
@pytest.mark.parametrize("cuts", [(2,), (1, 3), (0, 1, 2, 4), (2, 2)])
@torch.inference_mode()
def test_stages_in_sequence_equal_whole_model(tiny_checkpoints, variant, cuts):
    src = open_model(tiny_checkpoints[variant])
    n = src.spec.num_layers
    bounds = [0, *cuts, n]
    stages = [
        src.load_stage(a, b, has_embedding=(i == 0), has_head=(i == len(bounds) - 2))
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    whole = src.load_model()
    ids = _ids(src.spec.vocab_size)
    # Whole prompt, then a decode-style step, through fresh caches on both sides.
    whole_cache = whole.new_cache(batch=2, max_tokens=T + 1)
    caches = [s.new_cache(batch=2, max_tokens=T + 1) for s in stages]
    for x in (ids[:, :-1], ids[:, -1:]):
        expected = whole(x, whole_cache)
        for stage, cache in zip(stages, caches):
            x = stage(x, cache)
        assert torch.equal(x, expected), f"{variant} cuts {cuts}"
    # And generate() over the stage list equals generate() over the whole model.
    a = generate(stages, ids, max_new_tokens=6, slices=(20, 10), eos_token_ids=())
    b = generate(whole, ids, max_new_tokens=6, slices=(20, 10), eos_token_ids=())
    assert a.output_ids == b.output_ids
    assert torch.equal(a.prefill_logits, b.prefill_logits)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_attention_after_a_prefix_equals_the_masked_kernel(heads, kv_heads, dtype):
    """The prefix/slice split of attention (see [Note: a slice after a long prefix] in
    decoder.py) gives the masked kernel's result, GQA or not, within rounding."""
    import torch.nn.functional as F

    from hpipe.model.decoder import SPLIT_PREFIX_RATIO, _attend

    gen = torch.Generator().manual_seed(0)
    for prefix, tokens in ((SPLIT_PREFIX_RATIO * 16, 16), (300, 7), (1000, 64)):
        q = torch.randn(2, heads, tokens, 64, generator=gen).to(dtype)
        k = torch.randn(2, kv_heads, prefix + tokens, 64, generator=gen).to(dtype)
        v = torch.randn(2, kv_heads, prefix + tokens, 64, generator=gen).to(dtype)
        mask = torch.arange(prefix + tokens)[None, :] <= torch.arange(prefix, prefix + tokens)[:, None]
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=heads != kv_heads)
        got = _attend(q, k, v, mask)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
