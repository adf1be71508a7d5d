"""A torchrun job that hosts sessions: rank 0 drives, every other rank serves, the job's store
carries the messages.

Under torchrun every host starts one process per device of the cluster file, all with the same
command (``torchrun ... -m hpipe run ...``). Rank 0's process is the driver: it plans, opens
sessions (``Session.open(job=...)``), holds its own stage in a thread and prints. Every other
process serves (``hpipe.runtime.job_worker.serve_job``): it waits for the driver's next session,
loads its stage, obeys the session's commands, and exits when the driver ends the job.

[Note: the job's store] Commands, reports and heartbeats travel through the TCPStore that
torchrun's agent already runs for the rendezvous (MASTER_ADDR:MASTER_PORT; a plain rank-0 store
when the ranks were started by hand), not through a process group: a store key can be waited for
without a collective that every rank must join, a dead peer cannot wedge it, and each thread
keeps its own connection, so a heartbeat never queues behind a blocked read. Keys live under
``hpipe/<run id>/<restart>/`` so a restarted or a second job never reads an old one's keys:

- ``member/<rank>``: (cluster host name, LOCAL_RANK, machine hostname, pid), set on joining;
- ``beat/<rank>``: "count:action", rewritten every HEARTBEAT_S by each rank's beat thread;
- ``s<k>/setup``: session k's ``SessionSetup`` (or "end" of the job, or an error), from rank 0;
- ``s<k>/cmd/<n>``: rank 0's n-th command of session k to every other rank, deleted by the last
  reader (``s<k>/cmd/<n>/acks`` counts them);
- ``s<k>/rep/<n>``: the n-th report of session k to rank 0 (``s<k>/rep/n`` hands out n), deleted
  once read.

A message is ``pickle.dumps`` of a tuple; one store operation costs tens of microseconds on
loopback and one round trip across hosts, against a decode step of tens of milliseconds.

The process group itself (gloo, or NCCL when every device is CUDA) is joined on the first
session, when the driver's plan says which backend; each session then makes its own control
group over the ranks its plan uses, and its tensor-parallel groups, and frees them when closed.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpipe import errors
from hpipe.errors import WorkerFailedError
from hpipe.runtime.liveness import DEFAULT_LIVENESS_S, HEARTBEAT_S

log = logging.getLogger(__name__)

# A blocking read of the store waits at most this long; a session's idle hours are within it,
# and liveness comes from the heartbeats, not from this timeout.
STORE_WAIT_S = 24 * 3600.0


@dataclass(frozen=True)
class Member:
    """Who a rank is: where it runs and which device of its host it holds."""

    rank: int
    host: str  # HPIPE_HOST, default the hostname: the cluster file's host name
    local_rank: int
    hostname: str  # the machine's own name (several emulated hosts may share one)
    pid: int


@dataclass(frozen=True)
class SessionSetup:
    """What rank 0 tells every rank before a session: the plan and who holds what."""

    plan: Any  # hpipe.plan.plan.Plan
    model_shape: tuple  # (layers, hidden, heads, kv heads, vocab) of rank 0's model
    backend: str
    rank_of_device: dict[int, int]
    serving: tuple[int, ...]  # the ranks the plan uses, in rank order


def model_shape(spec) -> tuple:
    """What two hosts' copies of "the same model" must agree on before they exchange
    activations."""
    return (spec.num_layers, spec.hidden, spec.num_heads, spec.num_kv_heads, spec.vocab_size)


class JobStore:
    """One connection to the job's store, under the job's prefix. Open one per thread that
    blocks on it (see [Note: the job's store])."""

    def __init__(self, addr: str, port: int, prefix: str, *, is_master: bool = False,
                 world_size: int | None = None, timeout_s: float = STORE_WAIT_S) -> None:
        import torch.distributed as dist

        self.addr, self.port, self.prefix = addr, port, prefix
        timeout = datetime.timedelta(seconds=timeout_s)
        if is_master:
            raw = dist.TCPStore(addr, port, world_size, True, timeout=timeout,
                                wait_for_workers=False)
        else:
            raw = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
        self.raw = raw
        self.store = dist.PrefixStore(prefix, raw)
        self._lock = threading.Lock()  # threads that share a connection take turns on it

    def another(self, timeout_s: float = STORE_WAIT_S) -> JobStore:
        """A second connection (for another thread)."""
        return JobStore(self.addr, self.port, self.prefix, timeout_s=timeout_s)

    def put(self, key: str, msg: Any) -> None:
        with self._lock:
            self.store.set(key, pickle.dumps(msg))

    def take(self, key: str) -> Any:
        """Wait for ``key``, read it."""
        with self._lock:
            return pickle.loads(self.store.get(key))

    def has(self, key: str) -> bool:
        with self._lock:
            return self.store.check([key])

    def add(self, key: str, n: int = 1) -> int:
        with self._lock:
            return self.store.add(key, n)

    def delete(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self.store.delete_key(k)

    def beats(self, ranks) -> list[str]:
        if not ranks:
            return []
        with self._lock:
            values = self.store.multi_get([f"beat/{r}" for r in ranks])
        return [pickle.loads(v) for v in values]


class TorchrunJob:
    """This process's place in a torchrun job; ``join`` makes it. Rank 0 uses it to open
    sessions and must ``end`` it; every other rank passes it to ``serve_job``."""

    def __init__(self, *, rank: int, world_size: int, members: list[Member], store: JobStore,
                 connect_timeout_s: float, liveness_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.members = members
        self.store = store  # the main thread's connection
        self.connect_timeout_s = connect_timeout_s
        self.liveness_s = liveness_s
        self.backend: str | None = None  # set when the process group is joined
        self.next_session = 0
        self.broken: Exception | None = None
        self.ended = False
        self.position = -1  # the action this rank's stage is on (-1: none), sent with its beat
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    # -- joining -------------------------------------------------------------------------
    @classmethod
    def join(cls, env: dict[str, str], *, connect_timeout_s: float = 300.0,
             liveness_s: float = DEFAULT_LIVENESS_S) -> TorchrunJob:
        """Connect to the job's store, say who this rank is, learn who the others are.

        ``env`` is ``hpipe.runtime.launch.torchrun_env()``. Waits at most ``connect_timeout_s``
        for every rank to arrive. Starts this rank's heartbeat."""
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        # torchrun's agent serves the store; ranks started by hand have rank 0 serve it.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        prefix = (f"hpipe/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/"
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
        try:
            store = JobStore(addr, port, prefix, is_master=rank == 0 and not agent_store,
                             world_size=world, timeout_s=connect_timeout_s)
            member = Member(rank=rank, host=os.environ.get("HPIPE_HOST", socket.gethostname()),
                            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                            hostname=socket.gethostname(), pid=os.getpid())
            store.put(f"beat/{rank}", "0:-1")
            store.put(f"member/{rank}", member)
            members = [store.take(f"member/{r}") for r in range(world)]
        except (RuntimeError, TimeoutError) as e:  # DistStoreError subclasses RuntimeError
            raise WorkerFailedError(
                f"rank {rank} could not meet the other {world - 1} ranks through the store at "
                f"{addr}:{port} within {connect_timeout_s:g} s ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); check that torchrun runs on every "
                "host with the same --nnodes and rendezvous endpoint", rank=rank) from e
        store = JobStore(addr, port, prefix, timeout_s=STORE_WAIT_S) if rank else store
        job = cls(rank=rank, world_size=world, members=members, store=store,
                  connect_timeout_s=connect_timeout_s, liveness_s=liveness_s)
        job._start_beating()
        return job

    def _start_beating(self) -> None:
        """Rewrite ``beat/<rank>`` every HEARTBEAT_S from a thread of its own, on a connection
        of its own: what the driver (and, for rank 0, every other rank) watches."""
        beat_store = self.store.another(timeout_s=60.0)
        key = f"beat/{self.rank}"

        def beat() -> None:
            count = 0
            while not self._beat_stop.is_set():
                count += 1
                try:
                    beat_store.put(key, f"{count}:{self.position}")
                except Exception:  # the store is gone: the job is over (see job_worker)
                    return
                self._beat_stop.wait(HEARTBEAT_S)

        self._beat_thread = threading.Thread(target=beat, name="hpipe-job-heartbeat",
                                             daemon=True)
        self._beat_thread.start()

    def stop_beating(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=2 * HEARTBEAT_S)

    def join_process_group(self, backend: str) -> None:
        """init_process_group once, on the first session (its plan says which backend)."""
        import torch.distributed as dist

        if self.backend is not None:
            if backend != self.backend:
                raise errors.PlanMismatchError(
                    f"this job's process group is {self.backend}, but the session's plan needs "
                    f"{backend}; plan every session of one torchrun job on the same devices")
            return
        if backend == "nccl":
            import torch

            torch.cuda.set_device(self.members[self.rank].local_rank)
        pg_store = dist.PrefixStore("pg/", self.store.another(self.connect_timeout_s).store)
        try:
            dist.init_process_group(backend, store=pg_store, rank=self.rank,
                                    world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=STORE_WAIT_S))
        except (RuntimeError, TimeoutError) as e:
            raise WorkerFailedError(
                f"rank {self.rank} could not join the {backend} process group within "
                f"{self.connect_timeout_s:g} s ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "check that every host can reach the others (GLOO_SOCKET_IFNAME / "
                "NCCL_SOCKET_IFNAME name the interface to use)", rank=self.rank) from e
        self.backend = backend

    # -- naming ----------------------------------------------------------------------------
    def where(self, rank: int) -> str:
        m = self.members[rank]
        return f"host {m.host!r}" + (f" ({m.hostname})" if m.hostname != m.host else "")

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.members]

    def on_this_machine(self, rank: int) -> bool:
        """Whether rank's pid can be looked up in this machine's /proc (emulated hosts)."""
        return self.members[rank].hostname == socket.gethostname()

    # -- ending ----------------------------------------------------------------------------
    def end(self, error: BaseException | None = None) -> None:
        """Rank 0: tell every other rank that no session follows; they exit 0, or, given the
        ``error`` that ended rank 0's work, exit 1 saying it."""
        if self.ended or self.rank != 0:
            return
        self.ended = True
        if self.broken is None:
            msg = ("end",) if error is None else (
                "error", type(error).__name__, str(error).splitlines()[0] if str(error)
                else type(error).__name__)
            try:
                self.store.put(f"s{self.next_session}/setup", msg)
            except Exception as e:  # the others are gone already
                log.debug("could not end the job: %s", e)
        self.stop_beating()
        if self.backend is not None and self.broken is None:
            import torch.distributed as dist

            dist.destroy_process_group()


def read_beat(value: str) -> tuple[int, int]:
    """"count:action" -> (count, action)."""
    count, _, action = value.partition(":")
    return int(count), int(action or -1)


def wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
