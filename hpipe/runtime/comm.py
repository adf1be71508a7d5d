"""Point-to-point tensor transfer between pipeline stages over a torch.distributed ProcessGroup.

Every message is a fixed-size int64 header, then the payload:

    header = [unit, flags, dtype_code, ndim, d0, d1, d2, d3]

The receiver reads the header first and compares it with what the plan says should arrive
(unit index, shape, dtype). On a mismatch it still drains the payload the header announces, so
the sender's transfer completes and nobody blocks, then raises ``ShapeMismatchError`` naming
both shapes. ``FLAG_STOP`` with an empty payload tells the next stage that every row of the batch
has reached end-of-sequence, so decode ends early without a separate control channel.

Sends are non-blocking: ``isend`` posts the transfer and returns, so a stage computes its next
slice while the previous one travels. Gloo offers no completion future on a send, so one waiter
thread per link stamps when each transfer finished (for the measured timeline).

[Note: wire device] NCCL moves CUDA tensors; gloo moves CPU tensors. A pipeline with any CPU
stage uses gloo everywhere, and a CUDA stage then stages its activations through host memory
(``wire_device="cpu"``). An all-CUDA pipeline uses NCCL and sends from device memory.

[Note: into a tensor-parallel stage] A TP stage's leader alone receives from the previous
stage (and sends to the next), as the simulator times one transfer between stage leaders; it then
broadcasts what arrived to the rest of its group (``GroupLink.share``): a STOP flag, then the
payload, whose shape every member knows from the plan. Across hosts this keeps one copy of the
activations on the slow inter-host link, and the broadcast rides the group's own (intra-host)
link. The all-reduces inside the stage's layers use the same group.

The ProcessGroup is passed in, never fetched from a global. ``src``/``dst`` are *stage* indices;
``rank_of_stage`` maps them to the ranks of the stages' leaders (None: the identity, as in a
pipeline without tensor parallelism launched locally; see rank.py for the mapping), so the same
code runs on the default group under ``torchrun`` and on groups built in-process by the tests.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpipe.errors import ShapeMismatchError, WorkerFailedError

log = logging.getLogger(__name__)

HEADER_SLOTS = 8
MAX_DIMS = HEADER_SLOTS - 4
FLAG_STOP = 1
# Tag 0 for everything: messages between one pair of ranks arrive in the order they were sent,
# and each stage's action list fixes that order on both ends.
TAG = 0

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4,
}
CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class Expected:
    """What the plan says the next message from ``src`` carries."""

    src: int  # the sending stage (its leader's rank: StageLink._rank)
    unit: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"unit {self.unit} {tuple(self.shape)} {str(self.dtype).removeprefix('torch.')}"


@dataclass
class Received:
    """A received tensor on the compute device, or ``stop=True`` with no tensor."""

    tensor: torch.Tensor | None
    stop: bool


class PendingSend:
    """One posted send: keeps its buffers alive and learns when the transfer completed."""

    def __init__(self, buffers: list[torch.Tensor], *, clock, label: str) -> None:
        self._buffers = buffers  # must outlive the transfer
        self.start_s = clock()
        self.end_s: float | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._label = label

    def join(self) -> None:
        """Block until the transfer finished; re-raise its failure here, on the caller's thread."""
        self._done.wait()
        if self.error is not None:
            raise WorkerFailedError(f"send {self._label} failed: {self.error}") from self.error


class _SendWaiter:
    """The thread that waits on a link's posted sends, in the order they were posted, and
    stamps when each completed (gloo's send Work has no future, and wait() may be called only
    once, so one thread owns them). One per link, not one per send: a decode step posts a send
    per stage, and starting a thread for each cost about as much as the send itself."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def post(self, pending: PendingSend, works: list) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="send-waiter")
            self._thread.start()
        self._queue.put((pending, works))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            pending, works = job
            try:
                for w in works:
                    w.wait()
                pending.end_s = self._clock()
            except RuntimeError as e:  # the peer died or the link dropped
                pending.error = e
            finally:
                pending._done.set()


class StageLink:
    """One rank's ends of its pipeline links: it sends to and receives from neighbouring ranks.

    ``compute_device`` is where received tensors are delivered; ``wire_device`` is where they
    travel (see [Note: wire device]). ``recv_timeout_s`` bounds every receive: a stage whose
    upstream never sends fails with a message naming both ranks instead of hanging.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        rank: int,
        compute_device: torch.device,
        wire_device: torch.device,
        recv_timeout_s: float,
        rank_of_stage: dict[int, int] | None = None,
        clock=time.perf_counter,
    ) -> None:
        self.group = group
        self.rank_of_stage = rank_of_stage
        self.rank = rank
        self.compute_device = compute_device
        self.wire_device = wire_device
        self.recv_timeout = datetime.timedelta(seconds=recv_timeout_s)
        self.clock = clock
        self._waiter = _SendWaiter(clock)

    def close(self) -> None:
        """End the send-waiter thread once the sends posted so far are done."""
        self._waiter.close()

    # -- send ----------------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor | None, *, dst: int, unit: int,
              stop: bool = False) -> PendingSend:
        """Post ``tensor`` (or a STOP marker when ``stop``) to stage ``dst``; returns at once."""
        if stop:
            header = _header(unit, FLAG_STOP, torch.float32, ())
            payload = None
        else:
            assert tensor is not None and tensor.dim() <= MAX_DIMS, tensor
            payload = tensor.detach().to(self.wire_device).contiguous()
            header = _header(unit, 0, payload.dtype, tuple(payload.shape))
        header = header.to(self.wire_device)
        peer = self._rank(dst)
        works = [self.group.send([header], peer, TAG)]
        buffers = [header]
        if payload is not None and payload.numel() > 0:
            works.append(self.group.send([payload], peer, TAG))
            buffers.append(payload)
        pending = PendingSend(buffers, clock=self.clock,
                              label=f"rank {self.rank} -> {dst} unit {unit}")
        self._waiter.post(pending, works)
        return pending

    # -- receive -------------------------------------------------------------------------
    def recv(self, expected: Expected) -> Received:
        """Receive the next message from stage ``expected.src`` and check it against the plan."""
        header = torch.zeros(HEADER_SLOTS, dtype=torch.int64, device=self.wire_device)
        peer = self._rank(expected.src)
        self._wait(self.group.recv([header], peer, TAG), expected, "header")
        unit, flags, code, ndim, *dims = (int(v) for v in header.tolist())
        if flags & FLAG_STOP:
            return Received(None, stop=True)
        if code not in CODE_DTYPES or not 0 <= ndim <= MAX_DIMS or any(d < 0 for d in dims):
            raise ShapeMismatchError(
                f"rank {self.rank} got a malformed header {header.tolist()} from rank "
                f"{peer} while expecting {expected.describe()}: the two ranks do not run "
                "the same protocol version or plan")
        shape, dtype = tuple(dims[:ndim]), CODE_DTYPES[code]
        payload = torch.empty(shape, dtype=dtype, device=self.wire_device)
        if payload.numel() > 0:
            # Drain even on a mismatch: the sender's transfer then completes and nobody hangs.
            self._wait(self.group.recv([payload], peer, TAG), expected, "payload")
        if (unit, shape, dtype) != (expected.unit, tuple(expected.shape), expected.dtype):
            got = f"unit {unit} {shape} {str(dtype).removeprefix('torch.')}"
            raise ShapeMismatchError(
                f"rank {self.rank} expected {expected.describe()} from rank {peer} "
                f"but got {got}: the sender runs another plan, model or dtype; give every rank "
                "the same plan")
        return Received(payload.to(self.compute_device), stop=False)

    def _rank(self, stage: int) -> int:
        return stage if self.rank_of_stage is None else self.rank_of_stage[stage]

    def _wait(self, work, expected: Expected, what: str) -> None:
        try:
            work.wait(self.recv_timeout)
        except RuntimeError as e:
            raise WorkerFailedError(
                f"rank {self.rank} waiting for the {what} of {expected.describe()} from rank "
                f"{self._rank(expected.src)} (stage {expected.src}) failed: {e}") from e


def _header(unit: int, flags: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    dims = list(shape) + [0] * (MAX_DIMS - len(shape))
    return torch.tensor([unit, flags, DTYPE_CODES[dtype], len(shape), *dims], dtype=torch.int64)


def wire_device_for(backend: str) -> torch.device:
    """See [Note: wire device]."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GroupLink:
    """One rank's end of its tensor-parallel group: the all-reduces inside the stage's layers and
    the leader's broadcast of each received message (see [Note: into a tensor-parallel stage]).

    ``group`` is the subgroup of the stage's ranks; ``leader`` is the leader's rank in the world,
    as torch.distributed names collective roots. ``allreduce_s`` accumulates the time this rank
    spent in all-reduces (on NCCL only the host-side wait, as kernels run asynchronously).
    """

    def __init__(self, group: dist.ProcessGroup, *, rank: int, leader: int,
                 compute_device: torch.device, wire_device: torch.device) -> None:
        self.group = group
        self.rank = rank
        self.leader = leader
        self.compute_device = compute_device
        self.wire_device = wire_device
        self.allreduce_s = 0.0

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every member's ``partial``, on this rank's compute device."""
        start = time.perf_counter()
        buf = partial.to(self.wire_device)
        try:
            dist.all_reduce(buf, group=self.group)
        except RuntimeError as e:  # a member died or the link dropped
            raise WorkerFailedError(f"rank {self.rank}: all-reduce in its tensor-parallel group "
                                    f"(leader rank {self.leader}) failed: {e}") from e
        out = buf.to(self.compute_device)
        self.allreduce_s += time.perf_counter() - start
        return out

    def share(self, got: Received | None, expected: Expected) -> Received:
        """Leader: pass what it received (``got``); members: pass None and get the same."""
        assert (got is not None) == self.is_leader, (self.rank, self.leader)
        flag = torch.tensor([int(got is not None and got.stop)], dtype=torch.int64,
                            device=self.wire_device)
        self._broadcast(flag, expected, "STOP flag")
        if flag.item():
            return Received(None, stop=True)
        if self.is_leader:
            payload = got.tensor.to(self.wire_device)
        else:
            payload = torch.empty(expected.shape, dtype=expected.dtype, device=self.wire_device)
        self._broadcast(payload, expected, "payload")
        return Received(payload.to(self.compute_device), stop=False)

    def _broadcast(self, t: torch.Tensor, expected: Expected, what: str) -> None:
        try:
            dist.broadcast(t, src=self.leader, group=self.group)
        except RuntimeError as e:
            raise WorkerFailedError(
                f"rank {self.rank} waiting for the {what} of {expected.describe()} from its "
                f"tensor-parallel leader, rank {self.leader}, failed: {e}") from e
