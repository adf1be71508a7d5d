"""Load on ``hpipe serve``: does a long prompt freeze the other streams, and what does
concurrency buy? Three setups in one run, each a real server on 127.0.0.1:

- ``hpipe``: SmolLM2 on local:2, prompts prefilled in the plan's token slices, interleaved
  with the running requests' decode steps (the default);
- ``whole``: the same server with ``--whole-prefill`` (each prompt in one piece, as servers
  without slicing do: running streams wait for it);
- ``local:1``: one worker, sliced and interleaved as the first.

Per setup:

1. *Interference*: ``--streams`` short chat streams run (``ignore_eos``, so they keep going);
   once they flow, one long document (``--long-tokens``, the demo document repeated) is sent
   for one token. Reported: the streams' median gap between tokens before it, their longest
   gap while it prefills, the ratio (target <= 3x), and the long prompt's time to first token.
2. *Throughput*: ``--concurrency`` short requests at once against the same requests one at a
   time: output tokens/s of each and the ratio (target >= 4x); TTFT, TPOT and end-to-end
   latency p50/p99 of the concurrent ones.
3. *Mixed*: Poisson arrivals for ``--mixed-s`` seconds, short chats at ``--rate`` per second
   and ``--docs`` documents of 6-8k tokens (each from another place in the text, so no prefix
   is shared) among them. Reported per kind: TTFT, TPOT and end-to-end p50/p99, output
   tokens/s, and the short streams' longest gap while a document prefilled, against their
   median gap.

    .venv/bin/python benchmarks/serve_load.py [--setups hpipe,whole,local1] [--phases ...] [--quick]

Our own asyncio + httpx load generator; every request goes to loopback, bounded in count and
time; every server is stopped (SIGTERM) at the end of its setup.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpipe.demo import DOCUMENT_PATH  # noqa: E402
from hpipe.runtime.launch import free_port  # noqa: E402

SETUPS = {
    "hpipe": ["--cluster", "local:2", "--no-tp"],
    "whole": ["--cluster", "local:2", "--no-tp", "--whole-prefill"],
    "local1": ["--cluster", "local:1"],
}
TOPICS = ("the sea", "a mountain", "a city at night", "an old library", "a train journey",
          "a garden in spring", "a storm", "a desert", "a lighthouse", "a market", "snow",
          "a river", "the moon", "a forest", "a bakery", "a harbour")


@dataclass
class StreamLog:
    started_s: float = 0.0
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    done_s: float = 0.0


async def stream_chat(client: httpx.AsyncClient, url: str, content: str, max_tokens: int,
                      log: StreamLog, *, ignore_eos: bool = True) -> None:
    """One streamed chat; ``log`` gets its times (token times by arrival of content)."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos}
    log.started_s = time.monotonic()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                now = time.monotonic()
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    log.token_times.append(now)
                    log.first_token_s = log.first_token_s or now
    log.done_s = time.monotonic()


class Server:
    def __init__(self, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpipe.cli", "serve", "--model", "smollm2", "--port",
             str(self.port), "--max-running", "32", *extra], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def interference(url: str, *, streams: int, long_text: str, stream_tokens: int) -> dict:
    async with httpx.AsyncClient() as client:
        logs = [StreamLog() for _ in range(streams)]
        tasks = [asyncio.create_task(stream_chat(client, url, f"Describe {TOPICS[i]} in detail.",
                                                 stream_tokens, logs[i]))
                 for i in range(streams)]
        while min(len(lg.token_times) for lg in logs) < 15:  # the streams flow
            await asyncio.sleep(0.05)
        long_log = StreamLog()
        await stream_chat(client, url, long_text + "\n\nSummarize this document.", 1, long_log,
                          ignore_eos=False)
        # Keep the streams until each has a token after the prefill: a stream frozen through
        # it shows its gap only when it resumes.
        ended = long_log.first_token_s or long_log.done_s
        deadline = time.monotonic() + 120
        while (any(not lg.token_times or lg.token_times[-1] <= ended for lg in logs)
               and time.monotonic() < deadline and not all(t.done() for t in tasks)):
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    t0, t1 = long_log.started_s, long_log.first_token_s or long_log.done_s
    before, during, where = [], [], []
    for lg in logs:
        for a, b in zip(lg.token_times, lg.token_times[1:]):
            if b <= t0:
                before.append(b - a)
            elif a < t1 and b >= t0:
                during.append(b - a)
                where.append((b - a, (a - t0) / (t1 - t0)))
    for lg in logs:  # a stream that never resumed: its gap runs to the end of the prefill
        ran_out = lg.done_s and len(lg.token_times) >= stream_tokens  # it ended, not froze
        if lg.token_times and lg.token_times[-1] <= t1 and not ran_out:
            during.append(t1 - lg.token_times[-1])
            where.append((t1 - lg.token_times[-1], (lg.token_times[-1] - t0) / (t1 - t0)))
    median_gap = statistics.median(before)
    # Where the longest gaps began, as a share of the long prompt's prefill (0 = its arrival,
    # 1 = its first token): early gaps come from admission, late ones from long prefixes.
    worst = [f"{g:.2f}s@{at:.2f}" for g, at in sorted(where, reverse=True)[:4]]
    return {"median_gap_s": median_gap, "longest_gap_during_s": max(during),
            "gap_ratio": max(during) / median_gap, "long_ttft_s": t1 - t0,
            "worst_gaps": worst}


async def throughput(url: str, *, concurrency: int, tokens: int, solo_requests: int) -> dict:
    async with httpx.AsyncClient() as client:
        solo = []
        for i in range(solo_requests):
            lg = StreamLog()
            await stream_chat(client, url, f"Describe {TOPICS[i]} in detail.", tokens, lg)
            solo.append(lg)
        logs = [StreamLog() for _ in range(concurrency)]
        t0 = time.monotonic()
        await asyncio.gather(*(stream_chat(client, url,
                                           f"Describe {TOPICS[i % len(TOPICS)]} in detail.",
                                           tokens, logs[i]) for i in range(concurrency)))
        wall = time.monotonic() - t0
    solo_rate = sum(len(lg.token_times) for lg in solo) / sum(lg.done_s - lg.started_s
                                                              for lg in solo)
    rate = sum(len(lg.token_times) for lg in logs) / wall
    ttft = [lg.first_token_s - lg.started_s for lg in logs]
    tpot = [(lg.token_times[-1] - lg.token_times[0]) / (len(lg.token_times) - 1) for lg in logs]
    e2e = [lg.done_s - lg.started_s for lg in logs]
    return {"solo_tok_s": solo_rate, "concurrent_tok_s": rate, "speedup": rate / solo_rate,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99),
            "e2e_p50_s": percentile(e2e, 0.5), "e2e_p99_s": percentile(e2e, 0.99)}


async def mixed(url: str, *, rate_per_s: float, window_s: float, docs: list[str],
                tokens: int, seed: int = 0) -> dict:
    """Poisson arrivals: short chats at ``rate_per_s`` over ``window_s`` seconds, and the
    ``docs`` at uniformly random times inside it (each asks for ``tokens`` new tokens)."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate_per_s)
    while t < window_s:
        arrivals.append((t, "chat", f"Describe {TOPICS[len(arrivals) % len(TOPICS)]} in detail."))
        t += rng.expovariate(rate_per_s)
    arrivals += [(rng.uniform(0, window_s * 0.7), "doc", d + "\n\nSummarize this document.")
                 for d in docs]
    arrivals.sort()
    logs: list[tuple[str, StreamLog]] = []

    async def one(client, at_s: float, kind: str, text: str, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
        lg = StreamLog()
        logs.append((kind, lg))
        await stream_chat(client, url, text, tokens, lg)

    async with httpx.AsyncClient() as client:
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(client, a, k, x, t0)
                                                for a, k, x in arrivals)),
                               timeout=window_s + 900)
        wall = time.monotonic() - t0
    out: dict = {"requests": len(logs), "mixed_tok_s": sum(len(lg.token_times)
                                                           for _, lg in logs) / wall}
    for kind in ("chat", "doc"):
        sel = [lg for k, lg in logs if k == kind]
        ttft = [lg.first_token_s - lg.started_s for lg in sel]
        tpot = [(lg.token_times[-1] - lg.token_times[0]) / (len(lg.token_times) - 1)
                for lg in sel if len(lg.token_times) > 1]
        e2e = [lg.done_s - lg.started_s for lg in sel]
        for name, vals in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
            out[f"{kind}_{name}_p50_s"] = percentile(vals, 0.5)
            out[f"{kind}_{name}_p99_s"] = percentile(vals, 0.99)
    # The chats' gaps between tokens: inside some document's prefill, and all of them.
    prefills = [(lg.started_s, lg.first_token_s) for k, lg in logs if k == "doc"]
    gaps, during = [], []
    for k, lg in logs:
        if k != "chat":
            continue
        for a, b in zip(lg.token_times, lg.token_times[1:]):
            gaps.append(b - a)
            if any(a < t1 and b > t0_ for t0_, t1 in prefills):
                during.append(b - a)
    med = statistics.median(gaps) if gaps else float("nan")
    out["mixed_gap_p50_s"] = med
    out["mixed_gap_max_during_s"] = max(during) if during else float("nan")
    out["mixed_gap_ratio"] = out["mixed_gap_max_during_s"] / med
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default="hpipe,whole,local1")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=7000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--phases", default="interference,throughput,mixed")
    ap.add_argument("--rate", type=float, default=0.5, help="mixed: short chats per second")
    ap.add_argument("--mixed-s", type=float, default=60.0, help="mixed: arrival window")
    ap.add_argument("--docs", type=int, default=2, help="mixed: 6-8k-token documents")
    ap.add_argument("--quick", action="store_true",
                    help="a 3k-token document, 8 concurrent, 2-3k-token documents in mixed")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    doc_range = (6000, 8000)
    if args.quick:
        args.long_tokens, args.concurrency, doc_range = 3000, 8, (2000, 3000)
    from hpipe.model.source import open_model

    tok = open_model("smollm2").tokenizer
    doc_ids = tok.encode(DOCUMENT_PATH.read_text())
    reps = -(-args.long_tokens // len(doc_ids))
    long_text = tok.decode((doc_ids * reps)[:args.long_tokens])
    # Mixed-load documents: 6-8k tokens (under the 8192-token context with the question and
    # the answer), each starting elsewhere in the text so none reuses another's prefix.
    rng = random.Random(1)
    mixed_docs = []
    for i in range(args.docs):
        n = rng.randrange(*doc_range)
        start = (i + 1) * len(doc_ids) // (args.docs + 1)
        mixed_docs.append(tok.decode((doc_ids * (reps + 2))[start:start + n]))
    results = {}
    for name in args.setups.split(","):
        server = Server(SETUPS[name])
        try:
            server.wait_ready()
            r = {}
            if "interference" in phases:
                r |= asyncio.run(interference(server.url, streams=args.streams,
                                              long_text=long_text, stream_tokens=4000))
            if "throughput" in phases:
                r |= asyncio.run(throughput(server.url, concurrency=args.concurrency,
                                            tokens=args.tokens, solo_requests=2))
            if "mixed" in phases:
                r |= asyncio.run(mixed(server.url, rate_per_s=args.rate, window_s=args.mixed_s,
                                       docs=mixed_docs, tokens=args.tokens))
        finally:
            server.stop()
        results[name] = r
        print(f"{name}: {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[name].items()})}",
              file=sys.stderr, flush=True)
    if "interference" in phases or "throughput" in phases:
        print(f"\nSmolLM2 served on this machine; {args.streams} streams vs one "
              f"{args.long_tokens}-token prompt; {args.concurrency} concurrent x {args.tokens} "
              "tokens vs one at a time")
        print(f"{'setup':<8} {'gap p50':>8} {'gap max':>8} {'ratio':>6} {'long ttft':>9}   "
              f"{'1-at-a-time':>11} {'concurrent':>10} {'x':>5}   {'ttft p50/p99':>13} "
              f"{'tpot p50/p99':>13} {'e2e p50/p99':>13}")
        for name, r in results.items():
            g = functools.partial(lambda res, k: res.get(k, float("nan")), r)  # nan: left out
            print(f"{name:<8} {g('median_gap_s'):7.3f}s {g('longest_gap_during_s'):7.3f}s "
                  f"{g('gap_ratio'):5.1f}x {g('long_ttft_s'):8.2f}s   {g('solo_tok_s'):8.1f}t/s "
                  f"{g('concurrent_tok_s'):7.1f}t/s {g('speedup'):4.1f}x   "
                  f"{g('ttft_p50_s'):5.2f}/{g('ttft_p99_s'):5.2f}s "
                  f"{g('tpot_p50_s'):5.3f}/{g('tpot_p99_s'):5.3f}s "
                  f"{g('e2e_p50_s'):5.1f}/{g('e2e_p99_s'):5.1f}s")
        print("targets (hpipe): gap ratio <= 3x while the long prompt prefills; "
              f"{args.concurrency} concurrent >= 4x the tokens/s of one at a time")
    if "mixed" in phases:
        print(f"\nmixed load: Poisson arrivals for {args.mixed_s:.0f} s, short chats at "
              f"{args.rate}/s and {args.docs} documents of {doc_range[0]}-{doc_range[1]} tokens, "
              f"{args.tokens} new tokens each")
        print(f"{'setup':<8} {'reqs':>4} {'tok/s':>6}   {'chat ttft p50/p99':>17} "
              f"{'chat tpot p50/p99':>17} {'chat e2e p50/p99':>16}   {'doc ttft p50/p99':>16} "
              f"{'doc e2e p50/p99':>15}   {'chat gap p50 / max in a doc prefill':>35}")
        for name, r in results.items():
            print(f"{name:<8} {r['requests']:4d} {r['mixed_tok_s']:6.1f}   "
                  f"{r['chat_ttft_p50_s']:7.2f}/{r['chat_ttft_p99_s']:6.2f}s "
                  f"{r['chat_tpot_p50_s']:7.3f}/{r['chat_tpot_p99_s']:6.3f}s "
                  f"{r['chat_e2e_p50_s']:7.1f}/{r['chat_e2e_p99_s']:5.1f}s   "
                  f"{r['doc_ttft_p50_s']:7.1f}/{r['doc_ttft_p99_s']:5.1f}s "
                  f"{r['doc_e2e_p50_s']:6.1f}/{r['doc_e2e_p99_s']:5.1f}s   "
                  f"{r['mixed_gap_p50_s']:.3f} s / {r['mixed_gap_max_during_s']:.3f} s "
                  f"= {r['mixed_gap_ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
