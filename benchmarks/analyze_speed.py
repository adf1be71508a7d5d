"""What ``hpipe analyze`` gains, measured side by side in one run (SmolLM2, CPU workers):

1. *Prefix reuse*: 5 questions on one ``--doc-tokens`` document (Paul Graham essays). The
   same session kind answers them with reuse (the document prefilled once) and without
   (``prefix_reuse=False``: 5 whole prefills); one question alone is the unit "one prefill".
   Printed: each job's wall time in units of that one question, the prompt tokens each
   prefilled, and the ratio.
2. *Documents per hour*: ``--docs`` documents of about ``--small-tokens`` tokens, 3 questions
   each, through the analyze job on local:2 and on local:1 (one worker process).

    .venv/bin/python benchmarks/analyze_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from haystack import essays  # noqa: E402

from hpipe.analyze.answers import AnswerFile  # noqa: E402
from hpipe.analyze.backends import SessionBackend, Settings  # noqa: E402
from hpipe.analyze.inputs import Document  # noqa: E402
from hpipe.analyze.job import Job  # noqa: E402
from hpipe.model.source import open_model  # noqa: E402
from hpipe.session import Session  # noqa: E402

QUESTIONS = ("What is the main argument of the text?", "Who is mentioned first?",
             "What advice does the author give?", "Which company is named?",
             "What is the last topic discussed?")


def run_job(cluster: str, pairs, *, max_new: int, reuse: bool = True,
            in_flight: int = 4) -> tuple[float, dict]:
    """Wall seconds of the analyze job over ``pairs`` on a fresh session (not counting its
    start), and the summary."""
    settings = Settings(max_new_tokens=max_new)
    with Session.open(model="smollm2", cluster=cluster, allow_tp=False, interleave=True,
                      prefix_reuse=reuse) as session, tempfile.TemporaryDirectory() as tmp:
        answers = AnswerFile.open(Path(tmp) / "a.jsonl")
        job = Job(pairs, answers, in_flight=in_flight)
        t0 = time.perf_counter()
        summary = job.run(SessionBackend(session, settings))
        wall = time.perf_counter() - t0
        answers.close()
    return wall, summary.as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc-tokens", type=int, default=6000)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--small-tokens", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="a 1500-token document, 4 small ones")
    args = ap.parse_args()
    if args.quick:
        args.doc_tokens, args.docs, args.small_tokens = 1500, 4, 600
    tok = open_model("smollm2").tokenizer
    texts = [t for _, t in essays()]
    long_ids: list[int] = []
    for t in texts:
        long_ids += tok.encode(t.strip() + "\n\n")
        if len(long_ids) >= args.doc_tokens:
            break
    document = Document("essays", tok.decode(long_ids[:args.doc_tokens]))

    print(f"1. five questions on one {args.doc_tokens}-token document, local:2 "
          f"(max {args.max_new_tokens} new tokens each)")
    one_s, one = run_job("local:2", [(document, QUESTIONS[:1])], max_new=args.max_new_tokens,
                         reuse=False)
    reuse_s, reuse = run_job("local:2", [(document, QUESTIONS)], max_new=args.max_new_tokens)
    whole_s, whole = run_job("local:2", [(document, QUESTIONS)], max_new=args.max_new_tokens,
                             reuse=False)
    print(f"   {'job':<34} {'wall s':>8} {'x one question':>15} {'tokens prefilled':>17}")
    for name, wall, s in (("one question (one prefill)", one_s, one),
                          ("5 questions, prefix reused", reuse_s, reuse),
                          ("5 questions, 5 whole prefills", whole_s, whole)):
        prefilled = s["prompt_tokens"] - s["cached_tokens"]
        print(f"   {name:<34} {wall:>8.1f} {wall / one_s:>15.2f} {prefilled:>17,}")
    print(f"   => 5 questions cost {reuse_s / one_s:.2f} prefills with reuse, "
          f"{whole_s / one_s:.2f} without ({whole_s / reuse_s:.2f}x faster with reuse)")

    pairs = []
    for i in range(args.docs):
        ids = tok.encode(texts[(i + 7) % len(texts)])[:args.small_tokens]
        pairs.append((Document(f"essay{i}", tok.decode(ids)), QUESTIONS[:3]))
    print(f"\n2. {args.docs} documents of about {args.small_tokens} tokens, 3 questions each")
    rates = {}
    for cluster in ("local:2", "local:1"):
        wall, s = run_job(cluster, pairs, max_new=args.max_new_tokens)
        rates[cluster] = 3600 * args.docs / wall
        print(f"   {cluster}: {wall:6.1f} s, {rates[cluster]:7.1f} documents/hour, "
              f"{s['answered']} answers, {s['cached_tokens']:,} of "
              f"{s['prompt_tokens']:,} prompt tokens reused")
    print(f"   => local:2 / local:1 = {rates['local:2'] / rates['local:1']:.2f}x documents/hour")


if __name__ == "__main__":
    main()
