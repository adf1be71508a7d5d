"""Device profiling: time a real stage of the model over a (batch, slice, prefix) grid.

One stage of two blocks with the embedding and the head is built from the checkpoint on the
device, and called exactly as the runtime's last stage calls it (``stage(x, cache,
last_only=True)``), with the prefix already in the KV cache. Hooks split each call into its
parts: the embedding, each block, the head (norm + LM head on the last position), and what is
left (the stage call itself: input checks, rotary tables, the prefix mask). A stage of any
layers on any position of the pipeline is then ``call + [embedding] + n * layer + [head]``.

Honest timing: untimed warm-up calls first (allocator, oneDNN/cuBLAS kernel selection), a
``cuda.synchronize`` before every clock read on a GPU, ``repeats`` timed calls spread over the
whole profile (see [Note: repeats spread over time]), the median.

[Note: emulated slowdown in the profile] A device with ``slowdown`` k is measured the way the
worker runs it: after each call the profiler sleeps as ``hpipe.emulation.emulated_sleep_s``
says (k x the call's CPU time, minus what it already took; see [Note: slowdown on CPU time]),
as ``StageRunner._compute`` does, and the samples are the call's parts scaled by
(call + sleep) / call. The planner thus sees the slower device the runtime will produce, sleep
overshoot included, and the profile is labelled emulated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpipe.cluster import DeviceSpec
from hpipe.cost.profile_file import DeviceProfile, MemorySample, TimeSample
from hpipe.emulation import emulated_sleep_s
from hpipe.errors import SettingError
from hpipe.profile import MIN_PROFILE_TOKENS
from hpipe.runtime.request import TORCH_DTYPES

log = logging.getLogger(__name__)

NUM_BLOCKS = 2  # blocks in the profiled stage: two medians per call, still cheap to load


@dataclass(frozen=True)
class Grid:
    """The (rows, tokens, prefix) points to time; prefix + tokens <= max_tokens."""

    batches: tuple[int, ...]
    tokens: tuple[int, ...]
    prefixes: tuple[int, ...]
    max_tokens: int
    repeats: int
    warmup: int
    # Decode steps: (rows, context) pairs, one new token per row (empty: none measured).
    decode_batches: tuple[int, ...] = ()
    decode_contexts: tuple[int, ...] = ()
    # Blocks in the measured stage: two give a median per call; a quick calibration takes one.
    num_blocks: int = NUM_BLOCKS

    def points(self) -> tuple[tuple[int, int, int], ...]:
        pts = [(b, s, p) for b in self.batches for s in self.tokens for p in self.prefixes
               if p + s <= self.max_tokens]
        pts += [(b, 1, p) for b in self.decode_batches for p in self.decode_contexts
                if p + 1 <= self.max_tokens]
        return tuple(pts)


def default_grid(max_tokens: int, *, quick: bool = False, max_batch: int = 2) -> Grid:
    """Slices from 16 tokens to the whole prompt, prefixes across it, up to ``max_batch`` rows.

    The slicing DP explores slices down to its grid step (tens of tokens) and the layer DP
    asks for whole prompts, so the grid spans both ends; the fit's terms carry it between.
    ``quick`` trades points and repeats for a profile in well under a minute on one CPU core.
    """
    if max_tokens < MIN_PROFILE_TOKENS or max_batch < 1:
        raise SettingError(f"a profile grid needs max_tokens >= {MIN_PROFILE_TOKENS} and "
                           f"max_batch >= 1, got {max_tokens} and {max_batch}")
    if quick:
        # Three prefixes, not two: the prefix terms (b*p, b*s*p) are fitted, not guessed, and
        # the slicing DP's late slices sit at prefixes near the end of the prompt. The whole
        # prompt (s = max_tokens, p = 0) is measured because Base and GPipe run it as one
        # unit: extrapolating the b*s^2 term to it over-predicted them by up to 2x.
        tokens = sorted({16, 64, max(32, max_tokens // 4), max_tokens // 2, max_tokens})
        prefixes = (0, max_tokens // 3, (2 * max_tokens) // 3)
        batches = tuple(sorted({1, max_batch}))
        return Grid(tuple(batches), tuple(tokens), prefixes, max_tokens, repeats=3, warmup=1,
                    decode_batches=(1, 8), decode_contexts=(16, max_tokens - 1))
    tokens = sorted({16, 64, 128, max_tokens // 4, max_tokens // 2, max_tokens})
    prefixes = (0, max_tokens // 4, max_tokens // 2, (3 * max_tokens) // 4)
    batches = tuple(sorted({1, 2, max_batch}))
    # Decode: one row and a server's batch of rows, at a short and the longest context.
    return Grid(batches, tuple(tokens), prefixes, max_tokens, repeats=5, warmup=2,
                decode_batches=(1, 4, 16), decode_contexts=(16, max_tokens // 2, max_tokens - 1))


def calibration_grid(max_tokens: int) -> Grid:
    """The smallest grid the fit still holds on, for a calibration of a few seconds
    (hpipe/profile/quick.py): one block, one row, slices from 16 tokens to the whole prompt at
    no prefix and at half of it, and one-row decode at a short and the longest context.

    Two passes, so a point's figure is the mean of two and a burst of other work on the machine
    spoils half of it, not all (a median of two is their mean).
    """
    if max_tokens < MIN_PROFILE_TOKENS:
        raise SettingError(f"a calibration grid needs max_tokens >= {MIN_PROFILE_TOKENS}, "
                           f"got {max_tokens}")
    tokens = tuple(sorted({16, 64, 256, max_tokens // 2, max_tokens}))
    return Grid((1,), tokens, (0, max_tokens // 2), max_tokens, repeats=2, warmup=1,
                decode_batches=(1,), decode_contexts=(16, max_tokens - 1), num_blocks=1)


class _PartTimer:
    """Forward hooks that clock the embedding, each block and the head inside one call."""

    def __init__(self, stage, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.parts: dict[str, float] = {}
        self._t0: dict[str, float] = {}
        self.handles = []
        named = [("embedding", stage.embed)] + [(f"block{k}", b) for k, b in
                                                enumerate(stage.layers.values())]
        for name, mod in named:
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))
        # The head is norm then the linear: start at the norm, stop after the linear.
        self.handles.append(stage.norm.register_forward_pre_hook(self._pre("head")))
        self.handles.append(stage.head.register_forward_hook(self._post("head")))

    def _pre(self, name):
        def hook(*_):
            self.sync()
            self._t0[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(*_):
            self.sync()
            self.parts[name] = time.perf_counter() - self._t0[name]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (Linux), in bytes; 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _workspace_bytes(stage, ids, cache, prefix: int, tdev: torch.device) -> int:
    """Peak bytes one untimed call allocates above what is resident (weights, cache)."""
    cache.length = prefix
    if tdev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tdev)
        before = torch.cuda.memory_allocated(tdev)
        stage(ids, cache, last_only=True)
        return int(torch.cuda.max_memory_allocated(tdev) - before)
    # Without a resettable peak (not Linux) the workspace stays unmeasured (0).
    can_reset = _reset_hwm()
    before = _rss_bytes("VmRSS")
    stage(ids, cache, last_only=True)
    return max(0, _rss_bytes("VmHWM") - before) if can_reset else 0


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module else 0


class BenchStage:
    """The measured stage on this process's device: ``grid.num_blocks`` blocks of ``source``
    with the embedding and the head, and the hooks that clock each part. Loaded once and used
    by ``profile_device`` and then ``profile_lent``."""

    def __init__(self, source, device: DeviceSpec, *, dtype: str, num_blocks: int) -> None:
        self.device = device
        self.tdev = torch.device(device.torch_device)
        self.on_cuda = self.tdev.type == "cuda"
        if not self.on_cuda:
            torch.set_num_threads(device.num_threads)
        self.context_bytes = (torch.cuda.memory_allocated(self.tdev) if self.on_cuda
                              else _rss_bytes("VmRSS"))
        self.spec = source.spec
        self.num_blocks = min(num_blocks, self.spec.num_layers)
        self.stage = source.load_stage(0, self.num_blocks, has_embedding=True, has_head=True,
                                       dtype=TORCH_DTYPES[dtype], device=self.tdev)
        self.timer = _PartTimer(self.stage, self.sync)

    def sync(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.tdev)

    def close(self) -> None:
        self.timer.remove()


def profile_device(
    source, device: DeviceSpec, *, dtype: str, grid: Grid,
    progress: Callable[[int, int], None] | None = None, bench: BenchStage | None = None,
) -> DeviceProfile:
    """Measure ``device`` (this process's device) on a two-block stage of ``source``.

    ``source`` is a ``hpipe.model.source.ModelSource``; random-weight checkpoints time the same
    as real ones. ``progress(done, total)`` is called after each grid point. ``bench``: the
    stage already loaded (closed by its owner); default a new one, closed here.
    """
    own = bench is None
    if bench is None:
        bench = BenchStage(source, device, dtype=dtype, num_blocks=grid.num_blocks)
    stage, timer, tdev, sync, n = bench.stage, bench.timer, bench.tdev, bench.sync, bench.num_blocks
    spec = source.spec
    gen = torch.Generator().manual_seed(0)
    points = grid.points()
    layer, embedding, head, call, memory = [], [], [], [], []
    decode_layer, decode_head, decode_call = [], [], []
    kv_per_token = 0
    try:
        # [Note: repeats spread over time] Pass k times every point once, in a shuffled order;
        # a point's median is over passes. Back-to-back repeats of one point all land in the
        # same burst of someone else's work on a shared machine; spread over the whole
        # profile, a burst spoils one repeat of a point, which the median drops.
        runs: dict[tuple[int, int, int], list[dict[str, float]]] = {pt: [] for pt in points}
        work_of: dict[tuple[int, int, int], int] = {}
        order = random.Random(0)
        total = grid.repeats * len(points)
        done = 0
        for rep in range(grid.repeats):
            todo = list(points)
            order.shuffle(todo)
            for b, s, p in todo:
                cache = stage.new_cache(batch=b, max_tokens=p + s)
                kv_per_token = cache.mem_bytes // (n * b * (p + s))
                ids = torch.randint(0, spec.vocab_size, (b, s), generator=gen).to(tdev)
                # Warm-up calls in the first pass only (allocator, kernel selection).
                runs[(b, s, p)].append(_time_point(
                    stage, timer, ids, cache, prefix=p, calls=grid.warmup + 1 if rep == 0 else 1,
                    device=device, sync=sync))
                if rep == 0:
                    with torch.inference_mode():
                        work_of[(b, s, p)] = _workspace_bytes(stage, ids, cache, p, tdev)
                del cache
                done += 1
                if progress is not None:
                    progress(done, total)
        for pt in points:
            b, s, p = pt
            med = {k: statistics.median(run[k] for run in runs[pt]) for k in runs[pt][0]}
            if s == 1:  # a decode point (the prefill grid's slices are longer)
                decode_layer.append(TimeSample(b, s, p, med["layer"]))
                decode_head.append(TimeSample(b, s, p, med["head"]))
                decode_call.append(TimeSample(b, s, p, med["call"]))
                continue
            layer.append(TimeSample(b, s, p, med["layer"]))
            embedding.append(TimeSample(b, s, 0, med["embedding"]))
            head.append(TimeSample(b, s, p, med["head"]))
            call.append(TimeSample(b, s, p, med["call"]))
            memory.append(MemorySample(b, s, p, work_of[pt]))
    finally:
        if own:
            bench.close()
    prof = _device_profile(device, stage, spec, context_bytes=bench.context_bytes,
                           kv_per_token=kv_per_token, samples=(layer, embedding, head, call,
                                                               memory), on_cuda=bench.on_cuda)
    return dataclasses.replace(prof, decode_layer=tuple(decode_layer),
                               decode_head=tuple(decode_head), decode_call=tuple(decode_call))


def lent_tokens(grid: Grid) -> tuple[int, ...]:
    """The one-row slices at no prefix that ``profile_lent`` times: the grid's from 64 tokens
    to half the longest, where the planner's slices sit (a 16-token slice is too short to
    time on a shared machine, and the whole prompt is Base's, which never borrows)."""
    return tuple(t for t in grid.tokens if 64 <= t <= max(64, grid.max_tokens // 2))


def profile_lent(bench: BenchStage, *, grid: Grid, threads: int,
                 progress: Callable[[int, int], None] | None = None) -> tuple[TimeSample, ...]:
    """One block's time at each of ``lent_tokens(grid)`` on ``threads`` torch threads, as a
    compute that borrows its host's idle cores runs (the caller keeps the other workers of the
    host idle meanwhile); the device's own thread count is restored after."""
    assert not bench.on_cuda, "only CPU workers lend threads"
    gen = torch.Generator().manual_seed(1)
    points = lent_tokens(grid)
    runs: dict[int, list[float]] = {s: [] for s in points}
    torch.set_num_threads(threads)
    try:
        for rep in range(grid.repeats):
            for k, s in enumerate(points):
                cache = bench.stage.new_cache(batch=1, max_tokens=s)
                ids = torch.randint(0, bench.spec.vocab_size, (1, s), generator=gen)
                parts = _time_point(bench.stage, bench.timer, ids, cache, prefix=0,
                                    calls=grid.warmup + 1 if rep == 0 else 1,
                                    device=bench.device, sync=bench.sync)
                runs[s].append(parts["layer"])
                if progress is not None:
                    progress(rep * len(points) + k + 1, grid.repeats * len(points))
    finally:
        torch.set_num_threads(bench.device.num_threads)
    return tuple(TimeSample(1, s, 0, statistics.median(runs[s])) for s in points)


def _time_point(stage, timer, ids, cache, *, prefix: int, calls: int, device: DeviceSpec,
                sync) -> dict[str, float]:
    """Run one grid point ``calls`` times, time the last: each part's seconds (blocks, their
    median as "layer", embedding, head, and the rest of the call), emulated slowdown included."""
    on_cuda = device.torch_device.startswith("cuda")
    with torch.inference_mode():
        for _ in range(calls):
            cache.length = prefix  # the prefix is "cached" (zeros time like real K, V)
            sync()
            t0, cpu0 = time.perf_counter(), time.process_time()
            stage(ids, cache, last_only=True)
            sync()
            compute_s = time.perf_counter() - t0
            if device.slowdown > 1.0:  # see [Note: emulated slowdown in the profile]
                time.sleep(emulated_sleep_s(
                    device.slowdown, wall_s=compute_s,
                    cpu_s=None if on_cuda else time.process_time() - cpu0,
                    num_threads=device.num_threads))
            total_s = time.perf_counter() - t0
    scale = total_s / compute_s
    parts = {k: v * scale for k, v in timer.parts.items()}
    blocks = [v for k, v in parts.items() if k.startswith("block")]
    parts["layer"] = statistics.median(blocks)
    parts["call"] = max(0.0, total_s - sum(blocks) - parts["embedding"] - parts["head"])
    return parts


def _device_profile(device: DeviceSpec, stage, spec, *, context_bytes: int, kv_per_token: int,
                    samples, on_cuda: bool) -> DeviceProfile:
    """The measurements as a DeviceProfile, with the stage's weight sizes and the peak."""
    layer, embedding, head, call, memory = samples
    tdev = torch.device(device.torch_device)
    # Each stage holds its own head copy, tied or not (ModelSpec.head_params says the same).
    head_weight_bytes = (spec.vocab_size * spec.hidden + spec.hidden) * stage.head.weight.element_size()
    peak = (torch.cuda.max_memory_allocated(tdev) if on_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    log.info("profiled %s (pid %d): %d points", device.name, os.getpid(), len(layer))
    return DeviceProfile(
        name=device.name, kind=device.kind, torch_device=device.torch_device,
        num_threads=device.num_threads, slowdown=device.slowdown,
        layer=tuple(layer), embedding=tuple(embedding), head=tuple(head), call=tuple(call),
        memory=tuple(memory), context_bytes=int(context_bytes),
        layer_weight_bytes=_param_bytes(next(iter(stage.layers.values()))),
        kv_bytes_per_token_per_layer=int(kv_per_token),
        embedding_weight_bytes=_param_bytes(stage.embed), head_weight_bytes=head_weight_bytes,
        peak_memory_bytes=int(peak),
    )
