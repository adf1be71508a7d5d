"""Needle in a haystack through ``hpipe analyze``: does the pipeline change any answer, and how
fast does it run the grid?

A needle sentence goes at depths 0-100% of haystacks (Paul Graham essays, see haystack.py) from
1k tokens up to the model's context; every document gets the same question. The grid runs
through ``hpipe analyze`` on local:2 (one subprocess, one JSONL of documents), then each
prompt again in one process (``hpipe.model.generate``, greedy), and the two answers are compared
text for text. A score per cell says whether the answer retrieved the needle (both key phrases
1.0, one 0.5, none 0). SmolLM2-135M is a small model: its score is what it is; the point is
that the pipeline changes no answer.

    .venv/bin/python benchmarks/needle.py [--contexts 1000,2000,4000,7900]
        [--depths 0,25,50,75,100] [--png docs/needle.png] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from haystack import haystack  # noqa: E402

NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on "
          "a sunny day.")
QUESTION = "What is the best thing to do in San Francisco?"
KEYS = ("sandwich", "dolores park")
MAX_NEW = 32


def with_needle(tok, num_tokens: int, depth_pct: int) -> str:
    """A haystack of about ``num_tokens`` tokens with the needle at ``depth_pct`` percent,
    on a sentence boundary."""
    text = tok.decode(haystack(tok, num_tokens - len(tok.encode(NEEDLE)) - 1))
    at = round(len(text) * depth_pct / 100)
    if 0 < at < len(text):
        stop = text.rfind(". ", 0, at)
        at = stop + 2 if stop >= 0 else 0
    return f"{text[:at]}{NEEDLE} {text[at:]}".strip()


def score(answer: str) -> float:
    low = answer.lower()
    return sum(k in low for k in KEYS) / len(KEYS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1000,2000,4000,7900",
                    help="haystack lengths in tokens (SmolLM2's context is 8192)")
    ap.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent")
    ap.add_argument("--png", type=Path, default=REPO / "out" / "needle.png")
    ap.add_argument("--quick", action="store_true", help="contexts 1000,2000; depths 0,50,100")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.depths = "1000,2000", "0,50,100"
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [int(d) for d in args.depths.split(",")]

    from hpipe.model.generate import generate
    from hpipe.model.prompts import document_question
    from hpipe.model.source import open_model

    model = open_model("smollm2")
    tok = model.tokenizer
    docs = {f"c{c}_d{d}": with_needle(tok, c, d) for c in contexts for d in depths}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, out = Path(tmp) / "needle.jsonl", Path(tmp) / "answers.jsonl"
        jsonl.write_text("".join(json.dumps({"id": k, "text": v}) + "\n"
                                 for k, v in docs.items()))
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "hpipe.cli", "analyze", str(jsonl), "--question", QUESTION,
             "--out", str(out), "--model", "smollm2", "--cluster", "local:2", "--no-tp",
             "--max-new-tokens", str(MAX_NEW), "--no-progress", "--json"],
            cwd=REPO, capture_output=True, text=True)
        pipelined_s = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"hpipe analyze failed: {run.stderr}")
        answers = {a["id"]: a for a in map(json.loads, out.read_text().splitlines())}

    stages = model.load_model()
    t0 = time.perf_counter()
    solo = {}
    for k, text in docs.items():
        ids = tok.encode(tok.chat_messages([{"role": "user",
                                             "content": document_question(text, QUESTION)}]))
        res = generate(stages, [ids], max_new_tokens=MAX_NEW, eos_token_ids=tok.eos_token_ids)
        solo[k] = tok.decode(res.output_ids[0]).strip()
    solo_s = time.perf_counter() - t0

    same = sum(answers[k]["answer"] == solo[k] for k in docs)
    grid = [[score(answers[f"c{c}_d{d}"]["answer"] or "") for c in contexts] for d in depths]
    print(f"needle in a haystack, SmolLM2-135M, {len(docs)} documents "
          f"({len(contexts)} lengths x {len(depths)} depths)")
    print(f"{'depth':>6} " + " ".join(f"{c:>7}" for c in contexts))
    for d, row in zip(depths, grid):
        print(f"{d:>5}% " + " ".join(f"{v:>7.1f}" for v in row))
    mean = sum(map(sum, grid)) / (len(contexts) * len(depths))
    print(f"mean retrieval score {mean:.2f} (1 = both key phrases of the needle in the answer)")
    print(f"pipelined answers equal to single-process answers: {same}/{len(docs)}")
    for k in docs:
        if answers[k]["answer"] != solo[k]:
            print(f"  differs: {k}: pipelined {answers[k]['answer']!r} / one process "
                  f"{solo[k]!r}")
    print(f"time: hpipe analyze on local:2 {pipelined_s:.1f} s (with its start), one process "
          f"{solo_s:.1f} s (model already loaded); ratio {solo_s / pipelined_s:.2f}x")
    _heat_map(grid, contexts, depths, args.png, mean=mean, same=same, total=len(docs))
    print(f"heat map: {args.png}")


def _heat_map(grid, contexts, depths, path: Path, *, mean: float, same: int,
              total: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(contexts)), [f"{c:,}" for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"SmolLM2-135M through hpipe analyze on local:2\nmean score {mean:.2f}; "
                 f"{same}/{total} answers equal to one process's", fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieval score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
