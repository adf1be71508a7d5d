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

    .venv/bin/python benchmarks/serve_load.py [--setups hpipe,whole,local1] [--quick]

Our own asyncio + httpx load generator; every request goes to loopback, bounded in count and
time; every server is stopped (SIGTERM) at the end of its setup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default="hpipe,whole,local1")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=7000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="a 3k-token document, 8 concurrent")
    args = ap.parse_args()
    if args.quick:
        args.long_tokens, args.concurrency = 3000, 8
    from hpipe.model.source import open_model

    tok = open_model("smollm2").tokenizer
    doc_ids = tok.encode(DOCUMENT_PATH.read_text())
    reps = -(-args.long_tokens // len(doc_ids))
    long_text = tok.decode((doc_ids * reps)[:args.long_tokens])
    results = {}
    for name in args.setups.split(","):
        server = Server(SETUPS[name])
        try:
            server.wait_ready()
            inter = asyncio.run(interference(server.url, streams=args.streams,
                                             long_text=long_text, stream_tokens=4000))
            thr = asyncio.run(throughput(server.url, concurrency=args.concurrency,
                                         tokens=args.tokens, solo_requests=2))
        finally:
            server.stop()
        results[name] = {**inter, **thr}
        print(f"{name}: {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[name].items()})}",
              file=sys.stderr, flush=True)
    print(f"\nSmolLM2 served on this machine; {args.streams} streams vs one "
          f"{args.long_tokens}-token prompt; {args.concurrency} concurrent x {args.tokens} tokens "
          "vs one at a time")
    print(f"{'setup':<8} {'gap p50':>8} {'gap max':>8} {'ratio':>6} {'long ttft':>9}   "
          f"{'1-at-a-time':>11} {'concurrent':>10} {'x':>5}   {'ttft p50/p99':>13} "
          f"{'tpot p50/p99':>13} {'e2e p50/p99':>13}")
    for name, r in results.items():
        print(f"{name:<8} {r['median_gap_s']:7.3f}s {r['longest_gap_during_s']:7.3f}s "
              f"{r['gap_ratio']:5.1f}x {r['long_ttft_s']:8.2f}s   {r['solo_tok_s']:8.1f}t/s "
              f"{r['concurrent_tok_s']:7.1f}t/s {r['speedup']:4.1f}x   "
              f"{r['ttft_p50_s']:5.2f}/{r['ttft_p99_s']:5.2f}s "
              f"{r['tpot_p50_s']:5.3f}/{r['tpot_p99_s']:5.3f}s "
              f"{r['e2e_p50_s']:5.1f}/{r['e2e_p99_s']:5.1f}s")
    print("targets (hpipe): gap ratio <= 3x while the long prompt prefills; "
          f"{args.concurrency} concurrent >= 4x the tokens/s of one at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
