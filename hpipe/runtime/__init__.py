"""The real runtime: stage workers that execute the planned action lists over torch.distributed.

- ``request``: RunRequest / RunResult and the checks made before any worker starts;
- ``comm``: header-checked, non-blocking tensor transfer between neighbouring ranks;
- ``worker``: the interpreter of one stage's recv / compute / send list, with KV caches and
  sampling;
- ``rank``: one process's life (join the group, hold its stage, run requests);
- ``pool``: local worker processes under a supervisor; ``liveness``: their heartbeats;
- ``job``, ``job_pool``, ``job_worker``: a torchrun job across hosts that hosts sessions;
- ``launch``: what is checked before workers start, one-shot launches, torchrun.

The names below load on first use: a spawned worker imports ``hpipe.runtime.pool`` to start
its heartbeat before torch is imported (seconds on a small machine), see liveness.py.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunRequest": "hpipe.runtime.request", "RunResult": "hpipe.runtime.request",
    "check_request": "hpipe.runtime.request", "fit_plan": "hpipe.runtime.request",
    "launch_local": "hpipe.runtime.launch", "run_as_torchrun_rank": "hpipe.runtime.launch",
    "torchrun_env": "hpipe.runtime.launch",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpipe.runtime' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
