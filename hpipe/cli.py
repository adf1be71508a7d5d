"""The ``hpipe`` command line: a thin table of subcommands; the only place that prints.

Each subcommand is one ``add_parser(subparsers)`` function that declares its options and sets
``func`` (a ``run(args) -> int``), listed in ``SUBCOMMANDS``; modules under ``hpipe.commands``
follow the same shape. A user error (any ``HPipeError``) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hpipe.commands import analyze, experiment, plan, profile, run, serve, simulate
from hpipe.commands.contract import run_command, usage_failed
from hpipe.commands.settings import add_calibration_argument, in_range, int_list, read_prompt_file
from hpipe.errors import DeviceError, UsageError
from hpipe.spec import DTYPES


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text with one process (the reference)")
    p.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, or 'smollm2'")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file whose text is the prompt")
    prompt.add_argument("--prompt-ids", type=int_list, help="token ids, e.g. 1,2,3 (no chat template)")
    p.add_argument("--max-new-tokens", type=in_range(int, 0), default=64)
    p.add_argument("--slices", type=int_list, default=None,
                   help="prefill in these token slices, e.g. 512,256,...; they must sum to the prompt")
    p.add_argument("--temperature", type=in_range(float, 0), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=in_range(float, 0, 1, above=True), default=1.0)
    p.add_argument("--seed", type=in_range(int, 0, 2**64 - 1), default=None)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: if it has one)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=in_range(int, 1), default=None,
                   help="torch threads on a CPU (default: torch's, one per core); compare "
                        "'hpipe run --cluster local:N' with --threads N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_generate)
    return p


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        return list(args.prompt_ids)
    if args.prompt_file is not None:
        text = read_prompt_file(args.prompt_file)
    else:
        text = args.prompt
    chat = args.chat if args.chat is not None else bool(tokenizer.chat_template)
    return tokenizer.encode(tokenizer.chat_prompt(text) if chat else text)


def _torch_device(name: str):
    """--device as a torch.device, refused by name when torch cannot use it here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a torch device; use cpu or cuda:K") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name!r}: this torch build sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name!r}: hpipe runs on cpu or cuda:K")
    return device


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from hpipe.model.generate import Sampler, generate
    from hpipe.model.source import open_model
    from hpipe.model.tokenizer import TokenizerNotFoundError

    device = _torch_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    src = open_model(args.model)
    ids = _prompt_ids(args, src.tokenizer)
    sampler = Sampler(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    model_dtype = getattr(torch, args.dtype)
    model = src.load_model(dtype=model_dtype, device=device)
    result = generate(model, [ids], max_new_tokens=args.max_new_tokens, slices=args.slices,
                      sampler=sampler, eos_token_ids=src.tokenizer.eos_token_ids)
    out = list(result.output_ids[0])
    try:
        text = src.tokenizer.decode(out)
    except TokenizerNotFoundError:  # a checkpoint without a tokenizer: ids only
        text = None
    from hpipe.cost.memory import achieved_gb_s

    steps = max(0, len(result.output_ids[0]) - 1)
    gb_s = achieved_gb_s(src.spec, batch=1, prompt_tokens=result.prompt_tokens, steps=steps,
                         decode_s=result.decode_s, elem_bytes=torch.finfo(model_dtype).bits // 8)
    if args.json:
        print(json.dumps({
            "model": str(src.path), "prompt_tokens": result.prompt_tokens, "output_ids": out,
            "text": text, "slices": list(result.slices), "prefill_s": result.prefill_s,
            # run's name for the same figure, so the two compare key for key
            "prefill_latency_s": result.prefill_s, "threads": torch.get_num_threads(),
            "prefill_tok_s": result.prefill_tok_s, "decode_s": result.decode_s,
            "decode_tok_s": result.decode_tok_s, "decode_gb_s": gb_s}))
        return 0
    print(text if text is not None else " ".join(map(str, out)))
    print(f"[{result.prompt_tokens} prompt tokens in {len(result.slices)} slices: "
          f"{result.prefill_tok_s:.0f} tok/s prefill; {len(out)} new tokens, "
          f"{result.decode_tok_s:.1f} tok/s decode, {gb_s:.1f} GB/s read]")
    return 0


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the main job: SmolLM2 pipelined over 2 local workers answers a question "
                     "about a long document, HPipe against Base measured in the same run")
    p.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, or 'smollm2'")
    p.add_argument("--cluster", default="local:2", help="'local:N' or a cluster YAML file")
    p.add_argument("--max-new-tokens", type=in_range(int, 0), default=48)
    p.add_argument("--out", type=Path, default=Path("out/demo"),
                   help="folder for the measured Chrome trace and PNG timeline")
    p.add_argument("--single-process", action="store_true",
                   help="run the one-process reference instead of the pipeline")
    add_calibration_argument(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    from hpipe.demo import DOCUMENT_PATH, QUESTION, run_single_process_demo

    if args.single_process:
        out = run_single_process_demo(model=args.model, max_new_tokens=args.max_new_tokens)
        if args.json:
            print(json.dumps(out.to_dict()))
            return 0
        print(f"document: {out.document} ({out.prompt_tokens} prompt tokens)")
        print(f"question: {out.question}")
        print(f"answer:   {out.answer.strip()}")
        print(f"prefill:  {out.prefill_tok_s:.0f} tokens/s ({out.prefill_s:.2f} s, one process); "
              f"decode {out.decode_tok_s:.1f} tokens/s")
        return 0
    # The pipelined demo is exactly an `hpipe run` call, so what it shows is what users get.
    # --no-tp: the demo shows HPipe's token-level pipeline. On two CPU workers the planner's
    # other pick, one tensor-parallel pair, measured the same within noise (17.1 vs 16.1 s for
    # 4096 tokens) and would hide the pipeline the demo is about.
    args.out.mkdir(parents=True, exist_ok=True)
    argv = ["run", "--model", args.model, "--cluster", args.cluster, "--no-tp",
            "--prompt-file", str(DOCUMENT_PATH), "--question", QUESTION,
            "--max-new-tokens", str(args.max_new_tokens), "--compare", "base",
            "--trace", str(args.out / "trace.json"), "--png", str(args.out / "timeline.png")]
    if args.no_calibration:
        argv.append("--no-calibration")
    if args.recalibrate:
        argv.append("--recalibrate")
    if args.json:
        argv.append("--json")
    else:
        print(f"document: {DOCUMENT_PATH.name}\nquestion: {QUESTION}\n", flush=True)
    run_args = build_parser().parse_args(argv)
    rc = run_args.func(run_args)
    if rc == 0 and not args.json:
        print(f"\nmeasured timeline: {args.out / 'timeline.png'} (PNG), "
              f"{args.out / 'trace.json'} (open in https://ui.perfetto.dev or chrome://tracing)")
    return rc


# The subcommand table: add one ``add_parser(subparsers)`` per subcommand here.
SUBCOMMANDS = (add_generate_parser, add_demo_parser, plan.add_parser, simulate.add_parser,
               experiment.add_parser, run.add_parser, profile.add_parser, serve.add_parser,
               analyze.add_parser)


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are a UsageError (exit 2 under the contract, JSON with --json)
    rather than its own exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hpipe", description="Long-context LLM inference pipelined across heterogeneous devices")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        sub = add_parser(subparsers)
        sub.add_argument("--debug", action="store_true",
                         help="print the traceback of a failure (for bug reports)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run the subcommand, and end under one contract (hpipe/commands/contract.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return usage_failed(e, command=next((a for a in argv if not a.startswith("-")), None),
                            json_wanted="--json" in argv)
    return run_command(args)


def _exit(code: int) -> None:
    """Leave with ``code``; a torchrun rank through ``launch.leave_rank`` (see its reason)."""
    from hpipe.runtime.launch import leave_rank, torchrun_env

    if torchrun_env() is not None or "TORCHELASTIC_RUN_ID" in os.environ:
        leave_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
