"""The supervisor of local workers (hpipe.runtime.pool), on targets that do nothing but wait:
a one-shot launch whose ranks finish at different times is not a failure, and a rank that
stops answering is blamed by its silent heartbeat, whoever was waiting for it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from hpipe.errors import WorkerFailedError
from hpipe.runtime.launch import free_port, launch_ranks


def _finish_apart(delay_s: float, ctx) -> str:
    """Rank 0 works ``delay_s`` longer than the others, which return and exit at once."""
    if ctx.rank == 0:
        time.sleep(delay_s)
    return f"rank {ctx.rank} done"


def _stop_rank1_then_wait(pid_file: str, ctx) -> None:
    """Rank 1 stops itself; rank 0 waits in a collective for it, as a pipeline stage would."""
    import torch
    import torch.distributed as dist

    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.all_reduce(torch.zeros(1), group=ctx.data_group)


def test_ranks_that_finish_early_are_not_a_failure():
    # Longer than the settle time and the liveness limit: an exited rank beats no more.
    result = launch_ranks(_finish_apart, 2.5, world_size=2, port=free_port(), liveness_s=1.0)
    assert result == "rank 0 done"


def test_a_stopped_rank_is_blamed_not_the_one_waiting_for_it(tmp_path):
    pids: list[int] = []
    t0 = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        launch_ranks(_stop_rank1_then_wait, str(tmp_path), world_size=2, port=free_port(),
                     liveness_s=2.0, on_started=pids.extend,
                     describe_rank=lambda r: f"rank {r} (device 'cpu{r}')")
    message = str(info.value)
    assert "rank 1 (device 'cpu1')" in message and "stopped answering" in message
    assert "stopped (SIGSTOP" in message and "rank 0" not in message
    assert time.monotonic() - t0 < 30
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
