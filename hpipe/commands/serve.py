"""``hpipe serve``: the pipeline as an OpenAI-compatible endpoint.

    hpipe serve --model smollm2 --cluster local:2 [--plan FILE | --profile FILE] \\
                [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Then any OpenAI client talks to http://HOST:PORT/v1 (chat/completions, completions, models);
GET /health is 503 while the weights load or the pipeline is broken, 200 when ready; GET
/metrics is Prometheus text. A worker that dies or stalls ends its requests with an error
naming the rank, and the pipeline is reopened (--no-restart: the server exits with the reason).
Ctrl-C or SIGTERM stop accepting, give running requests --grace seconds, end every worker and
exit 0.

Across hosts, start it under torchrun on every host with the same arguments (see
hpipe/runtime/job.py): rank 0 serves HTTP and holds its stage, the other ranks hold theirs. A
failed worker there ends the server (exit 1): the job cannot be reopened from inside.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from hpipe.commands.pipeline import add_liveness_arguments, add_pipeline_arguments, build_plan
from hpipe.commands.settings import in_range, positive

PLANNED_NEW_TOKENS = 256


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the pipeline as an OpenAI-compatible API",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, .gguf file, or 'smollm2'")
    add_pipeline_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=in_range(int, 0, 65535), default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients put in 'model' (default: --model's name)")
    p.add_argument("--max-running", type=in_range(int, 1), default=16,
                   help="requests on the pipeline at once, their slices and decode steps "
                        "interleaved (default %(default)s)")
    p.add_argument("--max-waiting", type=in_range(int, 0), default=64,
                   help="requests queued behind those before new ones get 429 "
                        "(default %(default)s)")
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="exit with the reason when a worker fails, instead of reopening")
    p.add_argument("--whole-prefill", action="store_true",
                   help="prefill each prompt in one piece, as servers without token slicing "
                        "do (for comparisons: running streams then wait for whole prefills)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt whole, even where it starts like one prefilled "
                        "before (default: reuse the kept prefix's KV cache)")
    p.add_argument("--keepalive", type=positive(float), default=5.0,
                   help="seconds between SSE comments while a stream waits (default 5)")
    p.add_argument("--grace", type=in_range(float, 0), default=10.0,
                   help="seconds running requests get to finish on Ctrl-C / SIGTERM")
    add_liveness_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from hpipe.runtime.launch import torchrun_env

    env = torchrun_env()
    if env is None:
        return serve(args)
    from hpipe.runtime.job import TorchrunJob
    from hpipe.runtime.job_worker import serve_job

    job = TorchrunJob.join(env, connect_timeout_s=args.connect_timeout, liveness_s=args.liveness)
    if job.rank != 0:
        serve_job(job, args.model)  # until rank 0's server stops
        return 0
    try:
        code = serve(args, job=job)
    except BaseException as e:
        job.end(error=e)  # the other ranks exit saying why
        raise
    job.end()
    return code


def serve(args: argparse.Namespace, *, job=None) -> int:
    """Serve until stopped; ``job``: the torchrun job this process is rank 0 of."""
    import uvicorn

    from hpipe.runtime.rank import freeze_heap
    from hpipe.serve.app import build_app
    from hpipe.serve.engine import Engine, EngineSettings

    # Every check before a worker starts. Planned for --max-running requests of typical
    # chat length (a request's own max_tokens is only known when it arrives).
    plan = build_plan(args, concurrency=args.max_running, max_new_tokens=PLANNED_NEW_TOKENS,
                      local=job is None)
    name = args.served_model_name or Path(args.model).name.removesuffix(".gguf")
    fatal: list[Exception] = []
    server = None

    def on_fatal(error: Exception) -> None:
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    def on_ready(pids: list[int]) -> None:
        print(f"hpipe serve: ready: {name!r} on http://{args.host}:{args.port}/v1 "
              f"({plan.method}, layers {list(plan.layer_counts())} on "
              f"{[plan.cluster.devices[d].name for d in plan.row_devices]}, workers {pids})",
              file=sys.stderr, flush=True)

    engine = Engine(EngineSettings(model=args.model, served_name=name,
                                   max_running=args.max_running,
                                   max_waiting=args.max_waiting,
                                   # a job that lost a rank cannot be reopened from inside
                                   restart=args.restart and job is None,
                                   liveness_s=args.liveness, whole_prefill=args.whole_prefill,
                                   prefix_reuse=args.prefix_cache,
                                   connect_timeout_s=args.connect_timeout),
                    plan, on_fatal=on_fatal, on_ready=on_ready, job=job)
    app = build_app(engine, api_key=args.api_key, keepalive_s=args.keepalive)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace, lifespan="off")
    server = make_server(config)
    print(f"hpipe serve: loading {args.model} on {plan.cluster.name} (GET /health is 503 until "
          "ready)", file=sys.stderr, flush=True)
    engine.start()
    # The server process drives every item of the interleaved schedule (session_items.py), and
    # a full garbage collection of its heap (fastapi, uvicorn, the tokenizer: ~200k objects)
    # took 85-90 ms, a pause in every stream. What is alive now stays alive for the process's
    # life, so it is frozen as the workers' heaps are ([Note: a frozen heap] in rank.py). Only
    # here: a Session opened inside someone else's program leaves their heap alone.
    freeze_heap()
    try:
        server.run()
    finally:
        engine.close(grace_s=args.grace)
    if fatal:  # the pipeline did not start, or failed under --no-restart: the contract says it
        raise fatal[0]
    if server.stopped_by:
        print(f"hpipe serve: stopped ({server.stopped_by}); every worker has ended",
              file=sys.stderr)
    return 0


def make_server(config):
    """uvicorn's server, told not to re-raise the signal that stopped it: a served Ctrl-C or
    SIGTERM is a clean stop (exit 0), not an interrupted command."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: str | None = None

        def handle_exit(self, sig, frame) -> None:
            self.stopped_by = signal.Signals(sig).name
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return Server(config)
