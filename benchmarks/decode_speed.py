"""Decode speed on this machine's CPUs: the pipeline against one process and transformers.

One stream (batch 1), SmolLM2-135M float32, a short chat prompt, then ``--new-tokens`` greedy
tokens with no early stop. Every contender runs in the same launch, alternated, ``--repeats``
times; medians are compared (the VM's speed drifts over minutes, so absolute figures from two
launches do not compare).

    .venv/bin/python benchmarks/decode_speed.py [--new-tokens 64] [--repeats 3]

Contenders:
- ``hpipe local:2``: a Session on two workers x 1 thread (HPipe's plan, no tensor parallelism);
- ``hpipe local:1``: a Session on one worker x 1 thread;
- ``one process, N threads``: ``hpipe.model.generate`` on the whole model (what `hpipe generate`
  runs), with 1 and 2 threads;
- ``transformers, N threads``: its LlamaForCausalLM on the same GGUF weights, ``generate`` with a
  KV cache, with 1 and 2 threads.

Decode time is from the first sampled token to the last, so prefill is left out on every side.
GB/s is what the steps read (weights + KV cache) over that time, as gpt-fast reports it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Tell me about the Roman empire, in a few paragraphs."


def transformers_decode_s(model, ids: list[int], new_tokens: int) -> float:
    """Seconds from transformers' first sampled token to its last (``new_tokens`` of them)."""
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.inference_mode():
        model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, stopping_criteria=[Stamp()])
    assert len(stamps) == new_tokens, (len(stamps), new_tokens)
    return stamps[-1] - stamps[0]


def ours_decode_s(model, ids: list[int], new_tokens: int) -> tuple[float, tuple[int, ...]]:
    from hpipe.model.generate import generate

    out = generate(model, [ids], max_new_tokens=new_tokens, eos_token_ids=())
    return out.decode_s, out.output_ids[0]


def session_decode_s(session, ids: list[int], new_tokens: int) -> tuple[float, tuple[int, ...]]:
    from hpipe.session import Request

    done = session.submit(Request.from_ids(ids, max_new_tokens=new_tokens,
                                           stop_at_eos=False)).result()
    tl = done.result.timeline
    return tl.tpot_s * tl.num_decode_steps, done.result.output_ids[0]


def measure(*, new_tokens: int, repeats: int, with_transformers: bool = True) -> dict:
    """Every contender's decode seconds per run (alternated), the prompt, and the outputs."""
    from hpipe.cluster import local_cluster
    from hpipe.model.source import find_smollm2_gguf, open_model
    from hpipe.session import Session

    src = open_model("smollm2")
    ids = src.tokenizer.encode(src.tokenizer.chat_prompt(PROMPT))
    n = new_tokens
    whole = src.load_model()
    theirs = None
    if with_transformers:
        from model_speed import load_transformers

        theirs = load_transformers(find_smollm2_gguf())

    def with_threads(k, fn):
        def run():
            before = torch.get_num_threads()
            torch.set_num_threads(k)
            try:
                return fn()
            finally:
                torch.set_num_threads(before)
        return run

    sessions = {
        LOCAL2: Session.open(model="smollm2", cluster=local_cluster(2, num_threads=1),
                             seq_len=len(ids), allow_tp=False),
        LOCAL1: Session.open(model="smollm2", cluster=local_cluster(1, num_threads=1),
                             seq_len=len(ids)),
    }
    try:
        contenders = {name: (lambda s=s: session_decode_s(s, ids, n))
                      for name, s in sessions.items()}
        for k in (1, 2):
            contenders[f"one process, {k} thread{'s' * (k > 1)}"] = with_threads(
                k, lambda: ours_decode_s(whole, ids, n))
            if theirs is not None:
                contenders[f"transformers, {k} thread{'s' * (k > 1)}"] = with_threads(
                    k, lambda: (transformers_decode_s(theirs, ids, n), None))
        for fn in contenders.values():  # warm-up: allocations, gloo connections
            fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        outputs = {}
        for _ in range(repeats):
            for name, fn in contenders.items():
                decode_s, out = fn()
                times[name].append(decode_s)
                if out is not None:
                    outputs[name] = out
    finally:
        for s in sessions.values():
            s.close()
    return {"spec": src.spec, "prompt_tokens": len(ids), "new_tokens": n, "times": times,
            "outputs": outputs}


def report(m: dict) -> None:
    from hpipe.cost.memory import achieved_gb_s

    steps = m["new_tokens"] - 1  # the first token comes from the prefill
    times = m["times"]
    tok_s = {name: steps / statistics.median(t) for name, t in times.items()}
    repeats = len(next(iter(times.values())))
    print(f"SmolLM2-135M float32 decode, one stream, {m['prompt_tokens']}-token prompt + "
          f"{m['new_tokens']} new tokens, median of {repeats} alternated runs")
    print(f"{'contender':<40} {'tok/s':>7} {'GB/s':>6}   per run (tok/s)")
    for name, t in times.items():
        gb_s = achieved_gb_s(m["spec"], batch=1, prompt_tokens=m["prompt_tokens"], steps=steps,
                             decode_s=statistics.median(t), elem_bytes=4)
        runs = ", ".join(f"{steps / x:.1f}" for x in t)
        print(f"{name:<40} {tok_s[name]:7.1f} {gb_s:6.2f}   {runs}")
    print(f"greedy tokens identical across hpipe contenders: {len(set(m['outputs'].values())) == 1}")

    def ratio(a: str, b: str, goal: str) -> None:
        if a in tok_s and b in tok_s:
            print(f"  {a} / {b}: {tok_s[a] / tok_s[b]:.2f}x  ({goal})")

    ratio(LOCAL2, "one process, 2 threads", "goal >= 0.9x")
    ratio(LOCAL2, "one process, 1 thread", "the same threads per compute")
    ratio(LOCAL1, "transformers, 1 thread", "goal >= 1.0x")
    ratio(LOCAL1, "one process, 1 thread", "the session's overhead")


LOCAL2 = "hpipe local:2 (2 workers x 1 thread)"
LOCAL1 = "hpipe local:1 (1 worker x 1 thread)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    m = measure(new_tokens=args.new_tokens, repeats=args.repeats,
                with_transformers=not args.no_transformers)
    print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    report(m)


if __name__ == "__main__":
    main()
