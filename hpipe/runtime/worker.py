"""A stage worker: a short interpreter of its rank's action list (recv / compute / send).

The same ``build_schedule`` lists that the simulator times are executed here, action by action,
so the measured ``Timeline`` lines up with the predicted one unit by unit. A stage runs on one
rank, or on a tensor-parallel group of ranks that all execute the stage's list (see
[Note: roles in a tensor-parallel stage]).

[Note: one KV cache per micro-batch]
GPipe cuts the batch into micro-batches of rows. The decoder's KVCache has no row view (its
``batch`` must equal the input's), so each micro-batch gets its own cache of its own rows, and a
decode step (which the schedule runs on the whole batch) runs each micro-batch's rows against
their cache and concatenates. This costs M small matmuls per decode step instead of one, only
for GPipe, and keeps the runtime off the cache's internals. HPipe, TeraPipe and Base have one
micro-batch, hence one cache, kept across all their slices (see [Note: KV cache across slices]).

[Note: early stop] Decode is planned for max_new_tokens steps. When every row has produced an
end-of-sequence token the last stage sends STOP instead of the token; stage 0 forwards it down
the chain and every stage ends its list at the first STOP it receives, so no rank is left
waiting on a message that will never come.

[Note: roles in a tensor-parallel stage] Every member of a TP group computes every unit (the
all-reduces inside the layers need them all); the leader (member 0) alone receives from the
previous stage and shares it with the members (comm.GroupLink.share), alone sends to the next
stage, and on the last stage alone holds the head and samples. In a one-stage pipeline nothing
travels between stages, so after each sampled token the leader shares the token (or STOP) with
its members, who feed it to their next decode step. Each member records its compute intervals
on its own timeline row, as the simulator gives each device of a TP stage its own row; the
all-reduces happen inside the compute interval.

[Note: tokens before reports] The sampling rank posts each token's send to stage 0 before it
tells the supervisor about the token (``on_token``, ``progress``): the send gates the next
decode step of the whole pipeline, the report only a client's stream, which gets it a fraction
of a millisecond later. Measured on two CPU workers, the sampling rank spent ~0.9 ms from the end
of its compute to posting the token, of ~2.6 ms of hops and overheads per decode step.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from hpipe.emulation import emulated_sleep_s
from hpipe.lending import lent_threads
from hpipe.runtime.comm import Expected, GroupLink, PendingSend, Received, StageLink
from hpipe.runtime.request import RunRequest, dtype_of
from hpipe.schedule import TOKEN, ActionKind, build_schedule
from hpipe.timeline import Interval

log = logging.getLogger(__name__)

# progress(kind, done, total): kind is "prefill" (units through the last stage) or "decode" (tokens)
Progress = Callable[[str, int, int], None]
# on_token(ids): the token just sampled for each row of the batch, on the sampling rank
OnToken = Callable[[list[int]], None]
# should_stop() -> True once the request was cancelled (see [Note: cancel] in rank.py)
ShouldStop = Callable[[], bool]
# on_action(i): this rank starts action i of its stage's list (for the grid a failure prints)
OnAction = Callable[[int], None]


@dataclass
class StageOutcome:
    """What one rank reports to rank 0 after a request. Tensors are on the CPU."""

    stage: int
    intervals: list[Interval]
    peak_memory_bytes: int
    output_ids: list[list[int]] | None = None  # last stage only
    prefill_logits: torch.Tensor | None = None  # last stage only, (batch, vocab)
    num_decode_steps: int = 0
    # CPU seconds this process's compute thread used in the prefill's computes. Beside the
    # busy (wall) time it shows contention: cpu/busy < 1 means the stage waited for a core.
    prefill_cpu_s: float = 0.0
    member: int = 0  # index in the stage's tensor-parallel group; 0 = the leader
    row: int = 0  # the timeline row of this rank's device
    prefill_allreduce_s: float = 0.0  # of the prefill's computes, time in TP all-reduces
    cancelled: bool = False  # this rank stopped the request because it was cancelled
    num_stage_loads: int = 0  # stage loads this rank has made in its life (set by its host)


class StageRunner:
    """Runs stage ``stage_index`` of one request: owns its caches, sampler and pending sends.

    ``member`` is this rank's index in the stage's tensor-parallel group and ``group`` its link
    to the others (None for a one-device stage).
    """

    def __init__(self, req: RunRequest, *, stage_index: int, stage_module, link: StageLink,
                 device: torch.device, slowdown: float, progress: Progress | None = None,
                 member: int = 0, group: GroupLink | None = None,
                 on_token: OnToken | None = None, should_stop: ShouldStop | None = None,
                 on_action: OnAction | None = None) -> None:
        self.req = req
        self.plan = req.plan
        self.s = stage_index
        self.last = self.plan.num_stages - 1
        self.member = member
        self.leader = member == 0
        self.group = group
        # Only the last stage's leader holds the head and samples (see
        # [Note: roles in a tensor-parallel stage]).
        self.samples = self.s == self.last and self.leader
        self.row = self.plan.stage_rows(stage_index)[member]
        self.stage = stage_module
        self.link = link
        self.device = device
        self.slowdown = slowdown
        self.progress = progress
        self.on_token = on_token
        self.should_stop = should_stop or (lambda: False)
        self.on_action = on_action or (lambda i: None)
        self.cancelled = False
        self.dtype = dtype_of(self.plan)
        self.rows = self.plan.microbatch_rows()
        self.row_starts = [sum(self.rows[:m]) for m in range(len(self.rows))]
        self.caches = [stage_module.new_cache(batch=r, max_tokens=req.max_tokens) for r in self.rows]
        self.prompt = torch.tensor(req.prompt_ids, dtype=torch.int64, device=device)  # (B, T)
        self.intervals: list[Interval] = []
        self.lent: dict[int, int] = {}  # unit -> threads, set by run()
        self.prefill_cpu_s = 0.0
        self.prefill_allreduce_s = 0.0
        self.sends: list[tuple[PendingSend, Interval]] = []
        # Last stage only: sampling state.
        self.mb_logits: dict[int, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None  # last sampled (B,), fed back in decode
        self.generated: list[torch.Tensor] = []
        self.done = torch.zeros(req.batch, dtype=torch.bool)
        self.sampler = None
        if self.samples:
            from hpipe.model.generate import Sampler

            self.sampler = Sampler(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        self.eos = torch.tensor(req.eos_token_ids or (-1,), dtype=torch.int64)
        # Messages to the supervisor (tokens, progress) wait until the token they announce is
        # on its way to stage 0: in decode, that send is on every step's critical path, and the
        # supervisor is not (see [Note: tokens before reports]).
        self.reports: list[Callable[[], None]] = []

    # -- the interpreter -----------------------------------------------------------------
    def run(self) -> StageOutcome:
        num_steps = max(0, self.req.max_new_tokens - 1)
        sched = build_schedule(self.plan, num_decode_steps=num_steps, slices=self.req.slices)
        # This stage's prefill computes that run alone on the host, with the host's threads
        # (see [Note: a lone compute borrows its host's idle cores] in hpipe/lending.py).
        self.lent = {unit: k for (s, unit), k in lent_threads(self.plan, self.req.slices).items()
                     if s == self.s}
        units = sched.units
        final_prefill = max(u.index for u in units if u.phase == "prefill")
        num_prefill = final_prefill + 1
        stopped = False  # the last stage decided every row is finished
        x: torch.Tensor | None = None  # input of the next compute
        out: torch.Tensor | None = None  # output of the last compute
        steps_run = 0
        actions = sched.actions[self.s]
        for i, a in enumerate(actions):
            self.on_action(i)
            u = units[a.unit]
            if a.kind == ActionKind.RECV:
                if a.payload == TOKEN:
                    exp = Expected(a.peer, a.unit, (self.req.batch,), torch.int64)
                else:
                    exp = Expected(a.peer, a.unit, (u.rows, u.tokens, self.plan.model.hidden),
                                   self.dtype)
                got = self._recv(exp)
                if got.stop:  # see [Note: early stop]
                    if self.s != self.last and self.leader:
                        self._post_send(None, self.s + 1, u, "decode", stop=True)
                    break
                x = got.tensor
            elif a.kind == ActionKind.COMPUTE:
                if self._cancel_prefill(u):
                    if self.last > 0:
                        self._post_send(None, 1, u, "prefill", stop=True)
                    break
                if self.s == 0:
                    if u.phase == "prefill":
                        inp = self.prompt[u.row_start:u.row_start + u.rows,
                                          u.prefix:u.prefix + u.tokens]
                    else:
                        fed = x if self.last > 0 else self.tokens
                        inp = fed.view(-1, 1).to(self.device)  # (B, 1)
                else:
                    inp = x
                out = self._compute(u, inp)
                if u.phase == "decode":
                    steps_run += 1
                if self.samples:
                    num_tokens = len(self.generated)
                    if self.progress is not None and u.phase == "prefill":
                        self.reports.append(
                            partial(self.progress, "prefill", u.index + 1, num_prefill))
                    stopped = self._after_last_compute(u, out, final_prefill)
                    if self.progress is not None and len(self.generated) > num_tokens:
                        self.reports.append(partial(self.progress, "decode",
                                                    len(self.generated), self.req.max_new_tokens))
                if self.last == 0 and self.group is not None and self._token_due(u, final_prefill):
                    stopped = self._share_token(u, stopped)
                if stopped and self.last == 0:
                    break
            else:
                assert a.kind == ActionKind.SEND, a
                if not self.leader:
                    continue  # the leader sends for the group
                if a.payload == TOKEN:
                    self._post_send(self.tokens, a.peer, u, "decode", stop=stopped)
                else:
                    self._post_send(out, a.peer, u, u.phase)
            if self.reports and (i + 1 == len(actions) or actions[i + 1].kind != ActionKind.SEND):
                self._report()
        self._report()  # a loop left at a STOP or a cancel
        for pending, iv in self.sends:
            pending.join()
            assert pending.end_s is not None
            self.intervals.append(
                Interval(iv.row, "send", iv.unit, iv.phase, iv.microbatch, iv.slice_index,
                         iv.tokens, pending.start_s, pending.end_s))
        return self._outcome(steps_run)

    # -- pieces --------------------------------------------------------------------------
    def _report(self) -> None:
        """Send the supervisor what the last compute produced (tokens, progress), in order."""
        reports, self.reports = self.reports, []
        for report in reports:
            report()

    def _cancel_prefill(self, u) -> bool:
        """Stage 0 of one device stops feeding a cancelled prompt at a slice boundary. A
        tensor-parallel stage 0 does not: its members would each have to agree, so it stops at
        the first token instead (see [Note: cancel] in rank.py)."""
        if self.s != 0 or u.phase != "prefill" or self.group is not None:
            return False
        self.cancelled = self.cancelled or self.should_stop()
        return self.cancelled

    def _recv(self, exp: Expected) -> Received:
        """The next message from the previous stage: the leader receives it, then shares it."""
        if self.group is None:
            return self.link.recv(exp)
        return self.group.share(self.link.recv(exp) if self.leader else None, exp)

    def _token_due(self, u, final_prefill: int) -> bool:
        """Whether the last stage samples a token after unit ``u`` (as _after_last_compute)."""
        if u.phase == "decode":
            return True
        return u.index == final_prefill and self.req.max_new_tokens > 0

    def _share_token(self, u, stopped: bool) -> bool:
        """One-stage TP pipeline: the leader's token (or STOP) to every member; True on STOP."""
        exp = Expected(self.s, u.index, (self.req.batch,), torch.int64)
        got = self.group.share(Received(self.tokens, stopped) if self.leader else None, exp)
        if not self.leader and not got.stop:
            self.tokens = got.tensor
        return got.stop

    def _compute(self, u, inp: torch.Tensor) -> torch.Tensor:
        """Run the stage on one unit; times it, and sleeps (slowdown - 1) x that when emulating."""
        clock = self.link.clock
        start = clock()
        cpu_start = time.thread_time()
        process_cpu_start = time.process_time()  # every thread: the intra-op pool's too
        reduce_start = self.group.allreduce_s if self.group is not None else 0.0
        lent = self.lent.get(u.index)
        if lent is not None:
            own_threads = torch.get_num_threads()
            torch.set_num_threads(lent)
        try:
            with torch.inference_mode():
                if u.phase == "prefill":
                    # The last stage needs logits only at a slice's last position: the full
                    # (tokens, vocab) product would dominate a small model's time.
                    out = self.stage(inp, self.caches[u.microbatch], last_only=self.samples)
                else:
                    parts = [self.stage(inp[r0:r0 + r], cache, last_only=self.samples)
                             for r0, r, cache in zip(self.row_starts, self.rows, self.caches)]
                    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        finally:
            if lent is not None:
                torch.set_num_threads(own_threads)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock must see the kernels finish
        reduce_s = (self.group.allreduce_s if self.group is not None else 0.0) - reduce_start
        if u.phase == "prefill":
            # A lent compute's borrowed threads are this process's too: count them all.
            self.prefill_cpu_s += (time.thread_time() - cpu_start if lent is None
                                   else time.process_time() - process_cpu_start)
            self.prefill_allreduce_s += reduce_s
        if self.slowdown > 1.0:
            # Emulation: this device behaves as if it were `slowdown` times slower, on the CPU
            # time its compute used (see [Note: slowdown on CPU time]). The timeline is flagged
            # emulated=True so nobody mistakes it for a real device. Time in all-reduces is
            # waiting on the group, not this device's work: not scaled.
            on_cuda = self.device.type == "cuda"
            time.sleep(emulated_sleep_s(
                self.slowdown, wall_s=clock() - start - reduce_s,
                cpu_s=None if on_cuda else time.process_time() - process_cpu_start,
                num_threads=torch.get_num_threads()))
        self.intervals.append(Interval(self.row, "compute", u.index, u.phase, u.microbatch,
                                       u.slice_index, u.tokens, start, clock(), lent or 0))
        return out

    def _after_last_compute(self, u, out: torch.Tensor, final_prefill: int) -> bool:
        """Keep prefill logits, sample when a token is due; True once every row has ended."""
        if u.phase == "prefill":
            if u.slice_index == len(self.req.slices) - 1:
                self.mb_logits[u.microbatch] = out[:, -1].float().cpu()  # (rows, vocab)
            if u.index != final_prefill or self.req.max_new_tokens == 0:
                return False
            logits = torch.cat([self.mb_logits[m] for m in range(len(self.rows))], dim=0)
        else:
            logits = out[:, -1].float().cpu()
        if self.should_stop():  # a cancel: STOP instead of a token (see [Note: cancel], rank.py)
            self.cancelled = True
            self.tokens = torch.zeros(self.req.batch, dtype=torch.int64)
            return True
        tok = self.sampler.next_token(logits).to(torch.int64).cpu()  # (B,)
        # A finished row keeps feeding its EOS: harmless for the others, dropped from output.
        tok = torch.where(self.done, self.eos[0].clamp(min=0), tok)
        self.generated.append(tok)
        self.done |= torch.isin(tok, self.eos)
        self.tokens = tok
        if self.on_token is not None:
            self.reports.append(partial(self.on_token, tok.tolist()))
        return self.req.stop_at_eos and bool(self.done.all())

    def _post_send(self, tensor, dst: int, u, phase: str, *, stop: bool = False) -> None:
        pending = self.link.isend(tensor, dst=dst, unit=u.index, stop=stop)
        iv = Interval(self.row, "send", u.index, phase, u.microbatch, u.slice_index, u.tokens,
                      pending.start_s, pending.start_s)
        self.sends.append((pending, iv))

    def _outcome(self, steps_run: int) -> StageOutcome:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            # ru_maxrss is the process's peak resident set in KiB on Linux: weights, caches,
            # workspace and the torch runtime itself, over the process's whole life.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        outcome = StageOutcome(stage=self.s, intervals=self.intervals, peak_memory_bytes=peak,
                               num_decode_steps=steps_run, prefill_cpu_s=self.prefill_cpu_s,
                               member=self.member, row=self.row,
                               prefill_allreduce_s=self.prefill_allreduce_s,
                               cancelled=self.cancelled)
        if self.samples:
            outcome.output_ids = _trim_rows(self.generated, self.eos, self.req.batch)
            if self.mb_logits:
                outcome.prefill_logits = torch.cat(
                    [self.mb_logits[m] for m in range(len(self.rows))], dim=0)
        return outcome


def _trim_rows(generated: list[torch.Tensor], eos: torch.Tensor, batch: int) -> list[list[int]]:
    """Per row: the sampled tokens before its first EOS (as ``hpipe.model.generate`` returns)."""
    rows: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    eos_ids = set(eos.tolist())
    for tok in generated:
        for b, t in enumerate(tok.tolist()):
            finished[b] = finished[b] or t in eos_ids
            if not finished[b]:
                rows[b].append(t)
    return rows
