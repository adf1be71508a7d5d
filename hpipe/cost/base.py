"""The cost-model interface. The analytic roofline and the profiled (fitted) model both implement it.

A cost model is built for one (model, cluster, dtype) and answers three questions; the
planners and the simulator use nothing else, so a profiled model plugs in unchanged.
``devices`` is a tuple of device indices: one device, or a tensor-parallel group.
"""

from __future__ import annotations

from typing import Protocol


class CostModel(Protocol):
    # Whether stage_time_s of a tensor-parallel group rests on what the model knows (analytic
    # all-reduce on the link figures) rather than a guess (a profile never times an
    # all-reduce). HPipe's search only picks TP groups from a model that times them.
    times_tp_groups: bool

    def stage_time_s(
        self,
        devices: tuple[int, ...],
        layer_start: int,
        layer_stop: int,
        *,
        batch: int,
        tokens: int,
        prefix: int,
        has_embedding: bool,
        has_head: bool,
    ) -> float:
        """Compute time of layers [layer_start, layer_stop) for ``batch`` rows of ``tokens`` new
        tokens attending to ``prefix`` cached ones (embedding/head included when asked),
        emulated slowdown included."""
        ...

    def decode_time_s(
        self,
        devices: tuple[int, ...],
        layer_start: int,
        layer_stop: int,
        *,
        batch: int,
        context: int,
        has_embedding: bool,
        has_head: bool,
    ) -> float:
        """One decode step of layers [layer_start, layer_stop): ``batch`` rows of one new token
        each, attending to ``context`` cached tokens."""
        ...

    def transfer_time_s(self, src: int, dst: int, num_bytes: float) -> float:
        """Time to move ``num_bytes`` from device index ``src`` to ``dst``."""
        ...

    def stage_memory_bytes(
        self,
        devices: tuple[int, ...],
        layer_start: int,
        layer_stop: int,
        *,
        batch: int,
        seq_len: int,
        units: tuple[tuple[int, int, int], ...],
        has_embedding: bool,
        has_head: bool,
    ) -> int:
        """Peak memory on each device of the group: KV cache for ``batch`` x ``seq_len`` tokens
        plus the largest workspace over ``units``, given as (rows, tokens, prefix) triples
        (token slicing keeps the attention workspace at s*(p+s) instead of L^2)."""
        ...
