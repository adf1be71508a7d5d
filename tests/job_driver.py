"""A program for torchrun, started by tests/job_harness.py: rank 0 opens Sessions on the job
through the public API and prints one JSON line; every other rank serves them.

Config (JSON file, argv[1]): model, cluster (file), connect_timeout_s, liveness_s, prompts (lists
of ids), max_new_tokens, sessions: [{layers, groups?, slices, idle_s?}], and optionally
``signal_file``: after the second token of the first request, rank 0 writes
{"device_ranks", "pids"} there and the test signals a worker.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path

from runtime_harness import Case, plan_for

from hpipe.cluster import load_cluster
from hpipe.model.source import open_model
from hpipe.runtime.job import TorchrunJob
from hpipe.runtime.job_worker import serve_job
from hpipe.runtime.launch import leave_rank, torchrun_env
from hpipe.session import Request, Session, Tokens


def main(cfg: dict) -> int:
    job = TorchrunJob.join(torchrun_env(), connect_timeout_s=cfg["connect_timeout_s"],
                           liveness_s=cfg["liveness_s"])
    if job.rank != 0:
        serve_job(job, cfg["model"])
        return 0
    out: dict = {"sessions": []}
    try:
        spec = open_model(cfg["model"]).spec
        cluster = load_cluster(cfg["cluster"])
        for s in cfg["sessions"]:
            case = Case("job", "llama", layers=tuple(s["layers"]),
                        groups=tuple(s.get("groups", ())), slices=tuple(s["slices"]))
            with Session.open(model=cfg["model"], plan=plan_for(case, spec, cluster), job=job,
                              liveness_s=cfg["liveness_s"],
                              connect_timeout_s=cfg["connect_timeout_s"]) as session:
                out["sessions"].append(serve(session, cfg, s))
    except Exception as e:
        traceback.print_exc()
        out["error"] = {"type": type(e).__name__, "message": str(e),
                        "rank": getattr(e, "rank", None), "at": time.monotonic()}
        job.end(error=e)
        print(json.dumps(out), flush=True)
        return 1
    job.end()
    print(json.dumps(out), flush=True)
    return 0


def serve(session: Session, cfg: dict, s: dict) -> dict:
    info = {"pids": session.pids, "device_ranks": session.device_ranks}
    time.sleep(s.get("idle_s", 0.0))  # an idle session, past the connect timeout
    streams = [None] * len(cfg["prompts"])

    def submit(i: int) -> None:  # from several threads at once
        try:
            streams[i] = session.submit(Request.from_ids(cfg["prompts"][i],
                                                         max_new_tokens=cfg["max_new_tokens"],
                                                         stop_at_eos=False))
        except Exception as e:  # raised below, in the driver's thread
            streams[i] = e

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outputs, loads = [], []
    for stream in streams:
        if isinstance(stream, Exception):
            raise stream
    for i, stream in enumerate(streams):
        num_tokens = 0
        for event in stream:
            if isinstance(event, Tokens):
                num_tokens += 1
                if num_tokens == 2 and i == 0 and cfg.get("signal_file"):
                    Path(cfg["signal_file"]).write_text(json.dumps(
                        {"device_ranks": session.device_ranks, "pids": session.pids}))
        done = stream.result()
        # stop_at_eos is off: every request must run its max_new_tokens, on every rank
        assert done.finish_reasons == ("length",), done.finish_reasons
        outputs.append(done.result.output_ids[0])
        loads.append(done.result.num_stage_loads)
    info.update(outputs=outputs, loads=loads, pids_after=session.pids)
    return info


if __name__ == "__main__":
    leave_rank(main(json.loads(Path(sys.argv[1]).read_text())))  # as hpipe.cli's ranks do
