"""``hpipe analyze``: ask the same questions of every document in a folder (or a JSONL file),
answers to a JSONL file that a rerun resumes.

    hpipe analyze docs/ --question "Who signed it?" --question "When does it end?" \\
        --out answers.jsonl --model smollm2 --cluster local:2
    hpipe analyze docs.jsonl --questions questions.txt --out answers.jsonl \\
        --server http://127.0.0.1:8000 [--api-key KEY]

INPUT is a folder (.txt, .md and .html files, read as text; other files are listed and
skipped) or a JSONL file of {"id", "text", optional "questions"} lines. Each document is
prefilled once and its questions are asked on top of its KV cache. One line per (document,
question) is written as each answer finishes (status ok, too_long or error); running the same
command again skips what the file holds (--overwrite starts over).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpipe.commands.pipeline import add_liveness_arguments, add_pipeline_arguments, build_plan
from hpipe.commands.settings import in_range
from hpipe.errors import UsageError

IN_PROCESS_FLAGS = ("cluster", "plan", "profile", "seq_len")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="ask questions of a folder of long documents",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, metavar="INPUT",
                   help="a folder of .txt/.md/.html documents, or a JSONL file")
    p.add_argument("--question", action="append", default=None,
                   help="a question to ask of every document (repeatable)")
    p.add_argument("--questions", type=Path, default=None, metavar="FILE",
                   help="a file of questions, one per line (# comments skipped)")
    p.add_argument("--out", type=Path, required=True, help="the answers file (JSONL)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the answers file over instead of resuming it")
    p.add_argument("--model", default=None,
                   help="HF model dir, .gguf file, or 'smollm2' (in this process); with "
                        "--server: the served model's name (default: its first)")
    add_pipeline_arguments(p)
    add_liveness_arguments(p)
    p.add_argument("--server", default=None, metavar="URL",
                   help="ask an OpenAI-compatible server instead (e.g. 'hpipe serve')")
    p.add_argument("--api-key", default=None, help="the --server's API key")
    p.add_argument("--max-new-tokens", type=in_range(int, 1), default=128)
    p.add_argument("--temperature", type=in_range(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=in_range(float, 0, 1, above=True), default=1.0)
    p.add_argument("--seed", type=in_range(int, 0, 2**64 - 1), default=0)
    p.add_argument("--in-flight", type=in_range(int, 1, 256), default=4,
                   help="documents worked on at once (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    return p


def _check_mode(args) -> None:
    if args.server is None:
        if args.model is None:
            raise UsageError("give --model (run the pipeline here) or --server URL (ask a "
                             "running server)")
        if args.api_key is not None:
            raise UsageError("--api-key goes with --server; drop it or add --server URL")
        return
    given = [f"--{f.replace('_', '-')}" for f in IN_PROCESS_FLAGS
             if getattr(args, f) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} describe a pipeline in this process, but "
                         "--server asks a running one; drop them or drop --server")


def run(args: argparse.Namespace) -> int:
    from hpipe.runtime.launch import torchrun_env

    env = torchrun_env()
    if env is None or args.server is not None:
        return analyze(args)
    # Across hosts (see hpipe/runtime/job.py): rank 0 reads the inputs, drives the session
    # and writes the answers file on its host; the other ranks hold their stages.
    from hpipe.runtime.job import TorchrunJob
    from hpipe.runtime.job_worker import serve_job

    job = TorchrunJob.join(env, connect_timeout_s=args.connect_timeout, liveness_s=args.liveness)
    if job.rank != 0:
        serve_job(job, args.model)
        return 0
    try:
        code = analyze(args, job=job)
    except BaseException as e:
        job.end(error=e)
        raise
    job.end()
    return code


def analyze(args: argparse.Namespace, *, job=None) -> int:
    """The job on this machine's workers, a server's, or (``job``) a torchrun job's."""
    from hpipe.analyze.answers import AnswerFile
    from hpipe.analyze.backends import Settings
    from hpipe.analyze.inputs import pairs_of, read_inputs, read_questions
    from hpipe.analyze.job import Job

    # Every check before any work: mode, inputs, questions, the answers file, the plan.
    _check_mode(args)
    if args.question is None and args.questions is None and args.input.is_dir():
        raise UsageError("give --question (repeatable) or --questions FILE")
    inputs = read_inputs(args.input)
    pairs = pairs_of(inputs, read_questions(args.question, args.questions))
    settings = Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    plan = (build_plan(args, concurrency=args.in_flight, max_new_tokens=args.max_new_tokens,
                       local=job is None) if args.server is None else None)
    answers = AnswerFile.open(args.out, overwrite=args.overwrite)
    backend = None
    if args.server is not None:  # reach it (URL, key, model) before saying anything
        from hpipe.analyze.backends import ServerBackend

        try:
            backend = ServerBackend(args.server, settings, api_key=args.api_key,
                                    model=args.model)
        except BaseException:
            answers.close()
            raise
    say = (lambda *a: None) if args.no_progress else (
        lambda text: print(text, file=sys.stderr, flush=True))
    if inputs.skipped:
        say(f"analyze: skipped {len(inputs.skipped)} files that are not text: "
            + ", ".join(inputs.skipped[:5]) + (", ..." if len(inputs.skipped) > 5 else ""))
    if answers.dropped_partial:
        say(f"analyze: dropped a cut last line of {args.out} (the job was killed mid-write)")
    if answers.done:
        say(f"analyze: {args.out} holds {len(answers.done)} answers; resuming")
    work = Job(pairs, answers, in_flight=args.in_flight,
               progress="off" if args.no_progress else
               "bar" if sys.stderr.isatty() else "lines")
    try:
        if work.needs_model and backend is None:
            backend = _open_backend(args, plan, settings, say, job=job)
        if work.todo and (args.no_progress or not sys.stderr.isatty()):
            say(f"analyze: {len(work.todo)} documents to go, "
                f"{sum(len(q) for _, q in work.todo)} questions")
        try:
            summary = work.run(backend)
        except KeyboardInterrupt:
            print(f"analyze: stopped; {len(answers.done)} answers are in {args.out}; run "
                  "the same command again to resume", file=sys.stderr, flush=True)
            raise
    finally:
        if backend is not None:
            backend.close()
        answers.close()
    out = summary.as_dict() | {"out": str(args.out)}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(format_summary(out))
    return 0


def _open_backend(args, plan, settings, say, *, job=None):
    from hpipe.analyze.backends import SessionBackend
    from hpipe.session import Session

    say(f"analyze: starting {plan.num_stages} stage(s) of {args.model} on {plan.cluster.name}")
    return SessionBackend(Session.open(model=args.model, plan=plan, interleave=True,
                                       liveness_s=args.liveness,
                                       connect_timeout_s=args.connect_timeout, job=job),
                          settings)


def format_summary(s: dict) -> str:
    parts = [f"{s['answered']} answered"]
    if s["held"]:
        parts.append(f"{s['held']} already in the file")
    if s["too_long"]:
        parts.append(f"{s['too_long']} too long")
    if s["errors"]:
        parts.append(f"{s['errors']} failed")
    reused = (f" ({s['cached_tokens']:,} of them reused from a prefilled document)"
              if s["cached_tokens"] else "")
    return "\n".join([
        f"analyze: {s['documents']} documents, {s['questions']} questions: " + ", ".join(parts),
        f"  tokens: {s['prompt_tokens']:,} prompt{reused}, {s['completion_tokens']:,} generated",
        f"  time: {s['wall_s']:.1f} s, {s['documents_done']} documents "
        f"({s['documents_per_hour']:.1f} per hour)",
        f"  answers: {s['out']}" + (" (status too_long/error lines say why)"
                                    if s["too_long"] or s["errors"] else ""),
    ])
