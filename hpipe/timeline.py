"""Timeline: what each device did when. The simulator predicts one; the runtime measures one.

Both produce this type, so a measured run can be laid over its prediction interval by interval.
Rows are devices (a tensor-parallel stage contributes one row per device). Metrics are plain
functions of the intervals, so predicted and measured timelines are scored the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Interval:
    """Device row ``row`` was doing ``kind`` for work unit ``unit`` during [start_s, end_s)."""

    row: int
    kind: str  # "compute" | "send"
    unit: int
    phase: str  # "prefill" | "decode"
    microbatch: int
    slice_index: int
    tokens: int
    start_s: float
    end_s: float
    # A compute that borrowed its host's idle CPU threads: how many it ran on (0: the
    # device's own; see hpipe/lending.py).
    threads: int = 0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Timeline:
    source: str  # "simulated" | "measured"
    method: str
    row_names: tuple[str, ...]
    intervals: tuple[Interval, ...]
    peak_memory_bytes: tuple[int, ...]  # per row
    busy_power_w: tuple[float, ...]  # per row, for the energy model
    idle_power_w: tuple[float, ...]
    batch: int
    seq_len: int
    emulated: bool = False  # some device's speed is emulated (slowdown knob)

    # -- metrics -------------------------------------------------------------------------
    def _of(self, phase: str | None, kind: str | None = None) -> list[Interval]:
        return [iv for iv in self.intervals
                if (phase is None or iv.phase == phase) and (kind is None or iv.kind == kind)]

    @property
    def prefill_latency_s(self) -> float:
        """Start of the run to the end of the prefill's last action on any device."""
        ivs = self._of("prefill")
        return max((iv.end_s for iv in ivs), default=0.0)

    @property
    def latency_s(self) -> float:
        """Whole run: prefill and any decode steps."""
        return max((iv.end_s for iv in self.intervals), default=0.0)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the last stage finishes the last prefill slice."""
        last_row = max((iv.row for iv in self._of("prefill", "compute")), default=0)
        return max((iv.end_s for iv in self._of("prefill", "compute") if iv.row == last_row),
                   default=0.0)

    @property
    def num_decode_steps(self) -> int:
        return len({iv.unit for iv in self._of("decode", "compute")})

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first: the decode steps' share of the run, per
        step (0 without decode)."""
        steps = self.num_decode_steps
        return (self.latency_s - self.ttft_s) / steps if steps else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Output tokens per second in decode, over the batch's rows."""
        return self.batch / self.tpot_s if self.tpot_s > 0 else 0.0

    @property
    def last_slice_start_s(self) -> float:
        """When the last prefill slice entered the pipeline (the first device started it)."""
        ivs = self._of("prefill", "compute")
        if not ivs:
            return 0.0
        last = max(iv.unit for iv in ivs)
        return min(iv.start_s for iv in ivs if iv.unit == last)

    @property
    def prefill_throughput_tok_s(self) -> float:
        lat = self.prefill_latency_s
        return self.batch * self.seq_len / lat if lat > 0 else 0.0

    def busy_s(self, phase: str | None = "prefill") -> tuple[float, ...]:
        busy = [0.0] * len(self.row_names)
        for iv in self._of(phase, "compute"):
            busy[iv.row] += iv.duration_s
        return tuple(busy)

    def utilisation(self, phase: str | None = "prefill") -> tuple[float, ...]:
        lat = self.prefill_latency_s if phase == "prefill" else self.latency_s
        return tuple(b / lat if lat > 0 else 0.0 for b in self.busy_s(phase))

    def dynamic_energy_j(self, phase: str | None = "prefill") -> float:
        """[design] E_dyn = sum_j (P_busy_j - P_idle_j) * busy_j (algorithms.md section 2)."""
        return sum((pb - pi) * b for pb, pi, b in
                   zip(self.busy_power_w, self.idle_power_w, self.busy_s(phase)))

    def total_energy_j(self, phase: str | None = "prefill") -> float:
        """E_total = sum_j P_busy_j * busy_j + P_idle_j * (T - busy_j)."""
        lat = self.prefill_latency_s if phase == "prefill" else self.latency_s
        return sum(pb * b + pi * (lat - b) for pb, pi, b in
                   zip(self.busy_power_w, self.idle_power_w, self.busy_s(phase)))

    def summary(self) -> dict:
        return {
            "source": self.source,
            "method": self.method,
            "emulated": self.emulated,
            "latency_s": self.latency_s,
            "prefill_latency_s": self.prefill_latency_s,
            "ttft_s": self.ttft_s,
            "last_slice_start_s": self.last_slice_start_s,
            "prefill_throughput_tok_s": self.prefill_throughput_tok_s,
            "num_decode_steps": self.num_decode_steps,
            "tpot_s": self.tpot_s,
            "decode_tok_s": self.decode_tok_s,
            "devices": [
                {"name": n, "busy_s": b, "utilisation": u, "peak_memory_bytes": m}
                for n, b, u, m in zip(self.row_names, self.busy_s(), self.utilisation(),
                                      self.peak_memory_bytes)
            ],
            "dynamic_energy_j": self.dynamic_energy_j(),
            "total_energy_j": self.total_energy_j(),
        }

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Timeline:
        d = {k: v for k, v in d.items() if k != "summary"}
        d["intervals"] = tuple(Interval(**iv) for iv in d["intervals"])
        for k in ("row_names", "peak_memory_bytes", "busy_power_w", "idle_power_w"):
            d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
