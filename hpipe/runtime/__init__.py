"""The real runtime: stage workers that execute the planned action lists over torch.distributed.

- ``request``: RunRequest / RunResult and the checks made before any worker starts;
- ``comm``: header-checked, non-blocking tensor transfer between neighbouring ranks;
- ``worker``: the interpreter of one stage's recv / compute / send list, with KV caches and
  sampling;
- ``rank``: one process's life (join the group, run each request, gather to rank 0);
- ``launch``: local worker processes under a supervisor, or one rank under torchrun.
"""

from hpipe.runtime.launch import launch_local, run_as_torchrun_rank, torchrun_env
from hpipe.runtime.request import RunRequest, RunResult, check_request, fit_plan

__all__ = ["RunRequest", "RunResult", "check_request", "fit_plan", "launch_local",
           "run_as_torchrun_rank", "torchrun_env"]
