"""Tensor-parallel stages run for real and equal the single-process model.

Three layers of proof, cheapest first:

- the split itself (pure): heads, KV heads and MLP columns per rank, GQA runs for heads that
  straddle a KV group (SmolLM2: 9 query heads over 3 KV heads);
- the sharded modules, in this process: the ranks of a group run as threads whose all-reduce is
  a barrier and a sum, against the whole model (every family, groups of 2 and 3), and the
  loader's slice-as-you-read path against slicing a loaded stage;
- the runtime, over gloo: ONE launch of 4 workers runs every case below on its own ``local:N``
  cluster (2: one stage = one TP pair; 4: two TP-pair stages; 3: a TP pair beside a one-device
  stage), each checked against ``hpipe.model.generate`` through the shared harness; the measured
  timeline has the simulator's rows and actions; ``hpipe run --method megatron`` end to end;
  and a group that cannot split the model is refused before any worker starts.

``llama9`` is a tiny LLaMA with SmolLM2's head layout (9 query heads, 3 KV heads) and an odd MLP
width, so TP=2 splits heads 5 + 4 and the MLP 56 + 55: every uneven path in small.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch
from runtime_harness import (
    LOGITS_ATOL,
    Case,
    assert_equivalent,
    assert_stopped_early,
    launch_on_own_clusters,
    plan_for,
    reference,
    request_for,
    with_eos_at,
)

from hpipe.cluster import local_cluster
from hpipe.errors import PlanMismatchError
from hpipe.model.generate import generate
from hpipe.model.shard import gqa_segments, plan_shard, shard_stage
from hpipe.runtime import check_request

LLAMA9 = dict(hidden_size=72, intermediate_size=111, num_hidden_layers=4, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=True,
              vocab_size=96, initializer_range=0.2, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def llama9_dir(tmp_path_factory):
    import transformers

    torch.manual_seed(9)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA9))
    out = tmp_path_factory.mktemp("llama9")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_checkpoints, llama9_dir, smollm2_gguf, smollm2):
    """name -> (path for open_model, ModelSource)."""
    from hpipe.model.source import open_model

    out = {name: (tiny_checkpoints[name], open_model(tiny_checkpoints[name]))
           for name in ("llama", "gpt2", "neox")}
    out["llama9"] = (llama9_dir, open_model(llama9_dir))
    out["smollm2"] = (smollm2_gguf, smollm2)
    return out


@pytest.fixture(scope="module")
def whole_models(models, smollm2_model):
    out = {name: src.load_model() for name, (_, src) in models.items() if name != "smollm2"}
    out["smollm2"] = smollm2_model
    return out


# -- the split (pure) --------------------------------------------------------------------------
def test_smollm2_heads_split_five_four_with_the_straddled_kv_head_on_both(smollm2):
    spec = smollm2.spec
    assert (spec.num_heads, spec.num_kv_heads, spec.intermediate) == (9, 3, 1536)
    a, b = (plan_shard(spec, rank=r, size=2) for r in range(2))
    assert (a.q_heads, a.kv_heads, b.q_heads, b.kv_heads) == ((0, 5), (0, 2), (5, 9), (1, 3))
    assert (a.mlp, b.mlp) == ((0, 768), (768, 1536))
    # Rank 0: heads 0-2 read KV 0, heads 3-4 read KV 1; rank 1: head 5 on KV 1, 6-8 on KV 2.
    assert gqa_segments(spec, a) == ((0, 3, 0, 1), (3, 5, 1, 2))
    assert gqa_segments(spec, b) == ((0, 1, 0, 1), (1, 4, 1, 2))
    # Three ranks get whole KV groups: one grouped attention call each.
    assert all(gqa_segments(spec, plan_shard(spec, rank=r, size=3)) == ((0, 3, 0, 1),)
               for r in range(3))


# -- the sharded modules, ranks as threads -----------------------------------------------------
class ThreadSum:
    """An all-reduce for n threads of this process: each hands in its partial, all get the sum
    (added in rank order, so every rank gets the same bits, as gloo's all-reduce gives)."""

    def __init__(self, n: int) -> None:
        self.parts: list[torch.Tensor | None] = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def member(self, rank: int):
        def all_reduce(partial: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = partial
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()  # nobody overwrites its part before all have summed
            return total
        return all_reduce


def run_group(shards, reducer: ThreadSum, ids: torch.Tensor, slices: tuple[int, ...],
              feed: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each shard on its own thread: prefill ``ids`` in ``slices``, then decode ``feed`` tokens
    (teacher-forced, so the threads need not share samples). The leader's logits per step."""
    out: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def rank_main(r: int) -> None:
        try:
            stage = shards[r]
            cache = stage.new_cache(batch=ids.shape[0], max_tokens=ids.shape[1] + len(feed))
            with torch.inference_mode():
                start = 0
                for n in slices:
                    y = stage(ids[:, start:start + n], cache, last_only=stage.has_head)
                    start += n
                    if r == 0 and start == ids.shape[1]:
                        out.append(y[:, -1])
                for tok in feed:
                    y = stage(tok[:, None], cache, last_only=stage.has_head)
                    if r == 0:
                        out.append(y[:, -1])
        except BaseException as e:  # raised below; a failed rank must not hang the others
            errors.append(e)
            reducer.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def whole_run(whole, ids, slices, num_decode: int):
    """The whole model's last-position logits after the prefill and each greedy decode step,
    and the tokens it fed."""
    cache = whole.new_cache(batch=ids.shape[0], max_tokens=ids.shape[1] + num_decode)
    logits, feed = [], []
    with torch.inference_mode():
        start = 0
        for n in slices:
            y = whole(ids[:, start:start + n], cache, last_only=True)
            start += n
        logits.append(y[:, -1])
        for _ in range(num_decode):
            feed.append(logits[-1].argmax(-1))
            logits.append(whole(feed[-1][:, None], cache, last_only=True)[:, -1])
    return logits, feed


def shards_of(whole, size: int) -> tuple[list, ThreadSum]:
    reducer = ThreadSum(size)
    return [shard_stage(whole, plan_shard(whole.spec, rank=r, size=size), reducer.member(r))
            for r in range(size)], reducer


@pytest.mark.parametrize("name", ["llama", "llama9", "gpt2", "neox"])
@pytest.mark.parametrize("size", [2, 3])
def test_sharded_group_equals_whole_model(name, size, whole_models, torch_one_thread):
    """Sliced prefill and decode of a group of ``size`` threads equal the whole model (float32;
    the partial sums are added in another order than one matmul adds them, ~1e-6 here)."""
    whole = whole_models[name]
    seeded = torch.Generator().manual_seed(1)
    ids = torch.randint(3, whole.spec.vocab_size, (2, 11), generator=seeded)
    want, feed = whole_run(whole, ids, (5, 4, 2), num_decode=3)
    got = run_group(*shards_of(whole, size), ids, (5, 4, 2), feed)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g - w).abs().max().item() <= LOGITS_ATOL, (name, size, step)


@pytest.mark.parametrize("name", ["llama9", "neox", "smollm2"])
def test_loader_keeps_only_the_shard_and_equals_slicing_a_loaded_stage(name, models):
    """ModelSource.load_stage(tp=...) slices each tensor as it reads it (after fusing q/k/v,
    NeoX's reorder, llama.cpp's un-permutation); the result is bit-identical to slicing the
    loaded whole stage, and a rank of a pair holds about half of each layer."""
    _, src = models[name]
    tp = plan_shard(src.spec, rank=1, size=2)
    noop = ThreadSum(1).member(0)
    loaded = src.load_stage(1, 3, has_embedding=False, has_head=False, tp=tp, all_reduce=noop)
    full = src.load_stage(1, 3, has_embedding=False, has_head=False)
    assert full.state_dict().keys() == loaded.state_dict().keys()
    sliced = shard_stage(full, tp, noop).state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sliced[k]), k
    # Half: even where rank 1 has 4 of 9 query heads, its 2 of 3 KV heads make up the rest.
    shard_params = sum(v.numel() for k, v in loaded.state_dict().items() if "norm" not in k)
    full_params = sum(v.numel() for k, v in full.state_dict().items() if "norm" not in k)
    assert 0.45 < shard_params / full_params < 0.55, shard_params / full_params
    assert loaded.new_cache(batch=1, max_tokens=4).keys[0].shape[1] == tp.num_kv_heads


# -- the runtime over gloo: one launch for every case ------------------------------------------
CASES = [
    # (i) local:2, one stage = one TP pair
    Case("tp2-llama9-many-slices", "llama9", layers=(4,), groups=(2,), slices=(5, 3, 2, 1, 1)),
    Case("tp2-gpt2-batch3", "gpt2", layers=(4,), groups=(2,), slices=(7, 4, 1), batch=3),
    Case("tp2-llama-sampled-batch3", "llama", layers=(4,), groups=(2,), slices=(6, 5), batch=3,
         temperature=0.9, top_p=0.9, seed=7, max_new_tokens=6),
    Case("tp2-smollm2", "smollm2", layers=(30,), groups=(2,), slices=(12, 6, 4),
         max_new_tokens=4),
    # (ii) local:4, two stages of TP pairs, uneven layer split
    Case("tp2x2-llama9-uneven-batch3", "llama9", layers=(1, 3), groups=(2, 2), slices=(6, 4, 2),
         batch=3),
    Case("tp2x2-gpt2-gpipe", "gpt2", layers=(3, 1), groups=(2, 2), slices=(5, 4), batch=3,
         method="gpipe", num_microbatches=3),
    # (iii) local:3, a TP pair beside a one-device stage, either way round
    Case("tp2+1-llama9-gpipe", "llama9", layers=(3, 1), groups=(2, 1), slices=(5, 3, 2),
         batch=3, method="gpipe", num_microbatches=2),
    Case("1+tp2-gpt2-many-slices", "gpt2", layers=(1, 3), groups=(1, 2),
         slices=(4, 3, 2, 2, 1, 1)),
    Case("1+tp2-neox-base", "neox", layers=(2, 2), groups=(1, 2), slices=(10,), method="base"),
]
# EOS at row 0's third token (see with_eos_at): STOP reaches the members of a TP group.
EOS_BASE = [
    Case("eos-tp2-batch1", "llama9", layers=(4,), groups=(2,), slices=(5, 3), max_new_tokens=8),
    Case("eos-tp2x2-batch1", "gpt2", layers=(2, 2), groups=(2, 2), slices=(6, 2),
         max_new_tokens=8),
    Case("eos-1+tp2-batch3", "llama9", layers=(1, 3), groups=(1, 2), slices=(8,), batch=3,
         max_new_tokens=8),
]


@pytest.fixture(scope="module")
def eos_cases(models, whole_models):
    return {c.name: with_eos_at(c, whole_models[c.model], models[c.model][1].spec, step=2)
            for c in EOS_BASE}


@pytest.fixture(scope="module")
def runs(models, eos_cases):
    paths = {name: path for name, (path, _) in models.items()}
    specs = {name: src.spec for name, (_, src) in models.items()}
    return launch_on_own_clusters(CASES + list(eos_cases.values()), paths, specs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tp_pipeline_equals_reference(case, runs, models, whole_models):
    ref = reference(case, whole_models[case.model], models[case.model][1].spec)
    assert_equivalent(runs[case.name], ref)


@pytest.mark.parametrize("name", [c.name for c in EOS_BASE])
def test_early_eos_stops_every_member(name, runs, eos_cases, models, whole_models):
    case = eos_cases[name]
    ref = reference(case, whole_models[case.model], models[case.model][1].spec)
    result = runs[name]
    assert_stopped_early(result, ref, case)


def test_measured_timeline_has_the_simulators_rows_and_actions(runs, models):
    """One row per device, as sim.py: every member computes every unit on its own row, only
    the leaders send; all-reduce time sits inside the TP rows' compute, and only there."""
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.sim import simulate

    case = next(c for c in CASES if c.name == "tp2x2-llama9-uneven-batch3")
    spec = models[case.model][1].spec
    result = runs[case.name]
    plan = plan_for(case, spec, local_cluster(case.num_devices))
    predicted = simulate(plan, AnalyticCost(spec, plan.cluster, plan.dtype),
                         num_decode_steps=result.num_decode_steps)
    measured = result.timeline
    assert measured.row_names == predicted.row_names == ("cpu0", "cpu1", "cpu2", "cpu3")

    def actions(tl):
        return sorted((iv.row, iv.kind, iv.unit, iv.phase) for iv in tl.intervals)

    assert actions(measured) == actions(predicted)
    assert {iv.row for iv in measured.intervals if iv.kind == "send"} == {0, 2}
    assert all(a > 0 for a in result.prefill_allreduce_s)
    assert all(a < b for a, b in zip(result.prefill_allreduce_s, measured.busy_s("prefill")))
    mixed = runs["tp2+1-llama9-gpipe"]
    assert mixed.prefill_allreduce_s[2] == 0.0 < min(mixed.prefill_allreduce_s[:2])


def test_cli_runs_megatron_on_a_tp_pair(models, whole_models, capsys):
    """``hpipe run --method megatron --cluster local:2``: one stage on the pair, two workers,
    a row per device in --json, and the greedy tokens of the single-process model."""
    from hpipe.cli import main

    path, src = models["llama9"]
    ids = [5, 17, 33, 8, 61, 44, 12, 9, 70, 3, 25, 50]
    assert main(["run", "--model", str(path), "--cluster", "local:2", "--method", "megatron",
                 "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(st["device"], st["stage"], st["tp_degree"]) for st in report["stages"]] == [
        ("cpu0", 0, 2), ("cpu1", 0, 2)]
    want = generate(whole_models["llama9"], [ids], max_new_tokens=4,
                    eos_token_ids=src.spec.eos_token_ids)
    assert report["output"]["ids"] == [list(want.output_ids[0])]


# -- refused before any worker starts ----------------------------------------------------------


def test_group_wider_than_the_heads_is_refused_before_launch(models, tmp_path, tripwire, capsys):
    """The tiny GPT-2 has 4 heads: a group of 5 devices would leave one without a head."""
    from hpipe.cli import main

    path, src = models["gpt2"]
    case = Case("too-wide", "gpt2", layers=(4,), groups=(5,), slices=(8,))
    with pytest.raises(PlanMismatchError,
                       match=r"group \['cpu0', .*'cpu4'\] of 5 devices cannot split .*4 attention"):
        request_for(case, path, src.spec, case.num_devices)
    plan = plan_for(case, src.spec, local_cluster(5))
    (tmp_path / "wide.json").write_text(plan.to_json())
    assert main(["run", "--model", str(path), "--plan", str(tmp_path / "wide.json"),
                 "--prompt-ids", "3,4,5,6,7,8,9,10", "--max-new-tokens", "2"]) == 2
    assert "at most 4 devices" in capsys.readouterr().err
    # A pair is fine for the same model: the check refuses only what cannot run.
    ok = dataclasses.replace(case, groups=(2,))
    check_request(request_for(ok, path, src.spec, ok.num_devices), src.spec)


# -- CUDA (skipped on CPU-only machines) -------------------------------------------------------
def _cuda_cluster(torch_devices: tuple[str, ...]):
    from hpipe.cluster import parse_cluster

    return parse_cluster({"name": "gpu-tp", "hosts": [{
        "name": "local", "intra_link": "pcie4",
        "devices": [{"name": f"d{i}", "type": "cpu", "torch_device": d}
                    for i, d in enumerate(torch_devices)]}]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("torch_devices", [("cuda:0", "cpu"), ("cpu", "cuda:0"),
                                           ("cuda:0", "cuda:1")])
def test_tp_pair_on_cuda_equals_reference(torch_devices, models, whole_models):
    """A TP pair with a CUDA member: mixed with a CPU member over gloo (the all-reduce and the
    broadcast staged through host memory), or two GPUs over NCCL."""
    from hpipe.runtime import launch_local

    if torch.cuda.device_count() < sum(d.startswith("cuda") for d in torch_devices):
        pytest.skip("NCCL needs a GPU per rank")
    path, src = models["llama9"]
    case = Case("gpu-tp", "llama9", layers=(4,), groups=(2,), slices=(6, 4, 2), batch=2)
    req = request_for(case, path, src.spec, 2, cluster=_cuda_cluster(torch_devices))
    [result] = launch_local([req])
    # float32 on both sides (TF32 is off for matmuls by default), so the CPU tolerance holds.
    assert_equivalent(result, reference(case, whole_models["llama9"], src.spec))
