"""The profile file: what ``hpipe profile`` measured, as plain data that round-trips through JSON.

A profile is raw samples, not fitted coefficients: the fit (``hpipe.cost.fitted``) is a pure
function of the samples, so a better fit later re-reads old profiles unchanged.

It records what the numbers are only valid for: the model's shape, the dtype, each device's
name, kind and emulated ``slowdown`` (the measured times *include* the emulated sleep, so a
profile taken at slowdown 1 says nothing about slowdown 3), the torch version and the date.
``check_profile`` refuses a profile used with another model or cluster, naming what differs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from hpipe.cluster import ClusterSpec
from hpipe.errors import ProfileMismatchError
from hpipe.spec import ModelSpec
from hpipe.textfile import read_text_file

PROFILE_VERSION = 1
# Fields of ModelSpec that change a layer's cost. Two models equal on these take the same time
# per layer, so a profile of a random-weight twin is valid for the real checkpoint.
SHAPE_FIELDS = ("family", "num_layers", "hidden", "num_heads", "num_kv_heads", "intermediate",
                "vocab_size")


@dataclass(frozen=True)
class TimeSample:
    """Median wall time of one call: ``rows`` sequences x ``tokens`` new tokens after ``prefix``
    cached ones. Emulated slowdown included (it is what the planner must see)."""

    rows: int
    tokens: int
    prefix: int
    time_s: float


@dataclass(frozen=True)
class MemorySample:
    """Peak extra bytes one layer's forward allocated (activations, attention scores) for a
    call of that shape, above what was resident before it (weights, KV cache)."""

    rows: int
    tokens: int
    prefix: int
    workspace_bytes: int


@dataclass(frozen=True)
class DeviceProfile:
    """Measurements of one device of the cluster, by its cluster name."""

    name: str
    kind: str
    torch_device: str
    num_threads: int
    slowdown: float  # emulation knob in force while measuring; > 1 means emulated
    layer: tuple[TimeSample, ...]  # one transformer block
    embedding: tuple[TimeSample, ...]  # token embedding (prefix is 0: it ignores the cache)
    head: tuple[TimeSample, ...]  # final norm + LM head on the last position, as the runtime
    # Per stage call, outside embedding, blocks and head: input checks, rotary tables, the
    # prefix mask. Paid once per compute however many layers the stage has, so it must not be
    # folded into the per-layer time (15 layers would pay it 15 times).
    call: tuple[TimeSample, ...]
    memory: tuple[MemorySample, ...]
    context_bytes: int  # resident before any weight was loaded (the torch runtime itself)
    layer_weight_bytes: int  # one block's parameters, counted from the real tensors
    kv_bytes_per_token_per_layer: int  # per row and token, counted from the real cache
    embedding_weight_bytes: int
    head_weight_bytes: int
    peak_memory_bytes: int  # the largest resident size seen while profiling
    # Decode steps (one new token per row after ``prefix`` cached ones), per part as above;
    # empty in a profile made before they were measured (the fit then extrapolates).
    decode_layer: tuple[TimeSample, ...] = ()
    decode_head: tuple[TimeSample, ...] = ()
    decode_call: tuple[TimeSample, ...] = ()
    # One block's prefill time when this worker runs alone on its host with every CPU worker's
    # threads there (``lent_threads``), as a compute that borrows idle cores does
    # (hpipe/lending.py); ``layer`` above is the same call on its own threads with every worker
    # busy. Empty (and 0) when it cannot borrow or was profiled before this was measured.
    lent_threads: int = 0
    lent_layer: tuple[TimeSample, ...] = ()

    def lent_speedups(self) -> tuple[tuple[int, float], ...]:
        """(tokens, busy time / lent time) at each lent sample the busy grid also has (one row,
        no prefix), by tokens; empty when nothing lent was measured."""
        busy = {t.tokens: t.time_s for t in self.layer if t.rows == 1 and t.prefix == 0}
        return tuple(sorted((t.tokens, busy[t.tokens] / t.time_s) for t in self.lent_layer
                            if t.time_s > 0 and busy.get(t.tokens, 0) > 0))


@dataclass(frozen=True)
class LinkSample:
    num_bytes: int
    time_s: float  # one-way: half the median round trip


@dataclass(frozen=True)
class LinkProfile:
    """Ping-pong between neighbours ``src`` -> ``dst`` (device names) and its linear fit."""

    src: str
    dst: str
    samples: tuple[LinkSample, ...]
    latency_s: float
    bandwidth_bytes_s: float


@dataclass(frozen=True)
class Calibration:
    """One real pipelined prefill on the profiled workers, each device's compute measured
    against what the uncalibrated fit predicted for the same actions (see
    ``hpipe.profile.calibrate``, [Note: why calibrate]). Per-device tuples in cluster order; a
    device the calibration plan left without layers has 0 in both and scale 1."""

    layer_counts: tuple[int, ...]  # the calibration plan: layers per device (even split)
    slices: tuple[int, ...]  # its token slices (equal ones)
    batch: int
    predicted_compute_s: tuple[float, ...]  # per device: prefill compute, uncalibrated fit
    measured_compute_s: tuple[float, ...]  # per device: median over the measured runs
    predicted_latency_s: float  # prefill latency of the plan, uncalibrated fit
    measured_latency_s: float  # median over the runs

    @property
    def compute_scale(self) -> tuple[float, ...]:
        """Measured / predicted compute per device: what the fitted model multiplies by."""
        return tuple(m / p if p > 0 and m > 0 else 1.0
                     for m, p in zip(self.measured_compute_s, self.predicted_compute_s))

    def to_dict(self) -> dict:
        return {"layer_counts": list(self.layer_counts), "slices": list(self.slices),
                "batch": self.batch, "predicted_compute_s": list(self.predicted_compute_s),
                "measured_compute_s": list(self.measured_compute_s),
                "compute_scale": list(self.compute_scale),
                "predicted_latency_s": self.predicted_latency_s,
                "measured_latency_s": self.measured_latency_s}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(layer_counts=tuple(int(c) for c in d["layer_counts"]),
                   slices=tuple(int(s) for s in d["slices"]), batch=int(d["batch"]),
                   predicted_compute_s=tuple(float(t) for t in d["predicted_compute_s"]),
                   measured_compute_s=tuple(float(t) for t in d["measured_compute_s"]),
                   predicted_latency_s=float(d["predicted_latency_s"]),
                   measured_latency_s=float(d["measured_latency_s"]))


@dataclass(frozen=True)
class Profile:
    model_name: str
    model_shape: tuple[tuple[str, object], ...]  # SHAPE_FIELDS -> value
    dtype: str
    torch_version: str
    date: str  # ISO 8601, UTC
    cluster_name: str
    device_names: tuple[str, ...]
    devices: tuple[DeviceProfile, ...]
    links: tuple[LinkProfile, ...]
    quick: bool = False
    version: int = PROFILE_VERSION
    calibration: Calibration | None = None  # None: profiled with --no-calibrate

    @property
    def emulated(self) -> bool:
        return any(d.slowdown != 1.0 for d in self.devices)

    def device(self, name: str) -> DeviceProfile:
        for d in self.devices:
            if d.name == name:
                return d
        raise ProfileMismatchError(
            f"the profile has no device {name!r} (it has {', '.join(self.device_names)}); "
            "re-run hpipe profile with this cluster"
        )

    def link(self, src: str, dst: str) -> LinkProfile | None:
        """The measured link between two devices, either direction (links are symmetric)."""
        for lk in self.links:
            if {lk.src, lk.dst} == {src, dst}:
                return lk
        return None

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def dev(d: DeviceProfile) -> dict:
            return {
                "name": d.name, "kind": d.kind, "torch_device": d.torch_device,
                "num_threads": d.num_threads, "slowdown": d.slowdown,
                "emulated": d.slowdown != 1.0,
                # Samples as compact rows; the header names the columns.
                "layer": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.layer],
                "embedding": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.embedding],
                "head": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.head],
                "call": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.call],
                "memory": [[m.rows, m.tokens, m.prefix, m.workspace_bytes] for m in d.memory],
                "context_bytes": d.context_bytes,
                "layer_weight_bytes": d.layer_weight_bytes,
                "kv_bytes_per_token_per_layer": d.kv_bytes_per_token_per_layer,
                "embedding_weight_bytes": d.embedding_weight_bytes,
                "head_weight_bytes": d.head_weight_bytes,
                "peak_memory_bytes": d.peak_memory_bytes,
                "decode_layer": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.decode_layer],
                "decode_head": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.decode_head],
                "decode_call": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.decode_call],
                "lent_threads": d.lent_threads,
                "lent_layer": [[s.rows, s.tokens, s.prefix, s.time_s] for s in d.lent_layer],
            }

        return {
            "version": self.version,
            "columns": {"time": ["rows", "tokens", "prefix", "time_s"],
                        "memory": ["rows", "tokens", "prefix", "workspace_bytes"],
                        "link": ["num_bytes", "time_s"]},
            "model_name": self.model_name,
            "model_shape": dict(self.model_shape),
            "dtype": self.dtype,
            "torch_version": self.torch_version,
            "date": self.date,
            "cluster_name": self.cluster_name,
            "device_names": list(self.device_names),
            "emulated": self.emulated,
            "quick": self.quick,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "devices": [dev(d) for d in self.devices],
            "links": [
                {"src": lk.src, "dst": lk.dst, "latency_s": lk.latency_s,
                 "bandwidth_bytes_s": lk.bandwidth_bytes_s,
                 "samples": [[s.num_bytes, s.time_s] for s in lk.samples]}
                for lk in self.links
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        version = d.get("version")
        if version != PROFILE_VERSION:
            raise ProfileMismatchError(
                f"profile format version {version!r}, but this hpipe reads version "
                f"{PROFILE_VERSION}; re-run hpipe profile"
            )

        def times(rows) -> tuple[TimeSample, ...]:
            return tuple(TimeSample(int(r), int(t), int(p), _seconds(s)) for r, t, p, s in rows)

        try:
            devices = tuple(
                DeviceProfile(
                    name=dv["name"], kind=dv["kind"], torch_device=dv["torch_device"],
                    num_threads=int(dv["num_threads"]), slowdown=float(dv["slowdown"]),
                    layer=times(dv["layer"]), embedding=times(dv["embedding"]),
                    head=times(dv["head"]), call=times(dv["call"]),
                    memory=tuple(MemorySample(int(r), int(t), int(p), int(b))
                                 for r, t, p, b in dv["memory"]),
                    context_bytes=int(dv["context_bytes"]),
                    layer_weight_bytes=int(dv["layer_weight_bytes"]),
                    kv_bytes_per_token_per_layer=int(dv["kv_bytes_per_token_per_layer"]),
                    embedding_weight_bytes=int(dv["embedding_weight_bytes"]),
                    head_weight_bytes=int(dv["head_weight_bytes"]),
                    peak_memory_bytes=int(dv["peak_memory_bytes"]),
                    decode_layer=times(dv.get("decode_layer") or ()),
                    decode_head=times(dv.get("decode_head") or ()),
                    decode_call=times(dv.get("decode_call") or ()),
                    lent_threads=int(dv.get("lent_threads") or 0),
                    lent_layer=times(dv.get("lent_layer") or ()),
                )
                for dv in d["devices"]
            )
            links = tuple(
                LinkProfile(
                    src=lk["src"], dst=lk["dst"], latency_s=float(lk["latency_s"]),
                    bandwidth_bytes_s=float(lk["bandwidth_bytes_s"]),
                    samples=tuple(LinkSample(int(b), _seconds(t)) for b, t in lk["samples"]),
                )
                for lk in d["links"]
            )
            return cls(
                model_name=d["model_name"],
                model_shape=tuple(d["model_shape"].items()),
                dtype=d["dtype"], torch_version=d["torch_version"], date=d["date"],
                cluster_name=d["cluster_name"], device_names=tuple(d["device_names"]),
                devices=devices, links=links, quick=bool(d.get("quick", False)),
                version=int(version),
                calibration=(None if d.get("calibration") is None
                             else Calibration.from_dict(d["calibration"])),
            )
        except ProfileMismatchError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileMismatchError(
                f"profile file is malformed ({type(e).__name__}: {e}); re-run hpipe profile"
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ProfileMismatchError("not a profile: the file must hold the JSON object "
                                       "'hpipe profile' writes")
        return cls.from_dict(data)


def _seconds(value) -> float:
    """A measured time: a finite number >= 0 (a hand edit may leave anything)."""
    t = float(value)
    if not math.isfinite(t) or t < 0:
        raise ProfileMismatchError(f"profile file holds a time of {value!r} s; re-run hpipe "
                                   "profile")
    return t


def model_shape(model: ModelSpec) -> tuple[tuple[str, object], ...]:
    return tuple((f, getattr(model, f)) for f in SHAPE_FIELDS)


def read_profile(path: str | Path) -> Profile:
    """A profile from a file; a missing or non-JSON file is a user error naming the path."""
    p = Path(path)
    if not p.exists():
        raise ProfileMismatchError(
            f"--profile {str(path)!r}: no such file; create one with "
            "hpipe profile --model ... --cluster ... --out " + str(path)
        )
    text = read_text_file(p, what="--profile", error=ProfileMismatchError)
    try:
        return Profile.from_json(text)
    except json.JSONDecodeError as e:
        raise ProfileMismatchError(f"--profile {str(p)!r}: not a JSON profile ({e}); write it "
                                   "with 'hpipe profile ... --out FILE'") from None
    except ProfileMismatchError as e:
        raise ProfileMismatchError(f"--profile {str(p)!r}: {e}") from None


def check_profile(profile: Profile, model: ModelSpec, cluster: ClusterSpec, dtype: str) -> None:
    """Refuse a profile measured for another model, dtype or cluster; the message says which.

    Devices are matched by name, in order. A changed ``slowdown`` is refused too: the profile's
    times include the emulated sleep, so they would silently describe another device.
    """
    names = tuple(d.name for d in cluster.devices)
    if len(profile.device_names) != len(names):
        raise ProfileMismatchError(
            f"the profile has {len(profile.device_names)} devices "
            f"({', '.join(profile.device_names)}) but cluster {cluster.name!r} has {len(names)} "
            f"({', '.join(names)}); profile this cluster: hpipe profile --cluster ..."
        )
    if profile.device_names != names:
        raise ProfileMismatchError(
            f"the profile's devices are {list(profile.device_names)} but cluster "
            f"{cluster.name!r} has {list(names)}; profile this cluster: hpipe profile --cluster ..."
        )
    want = dict(model_shape(model))
    have = dict(profile.model_shape)
    diffs = [f"{k} {have.get(k)!r} vs {want[k]!r}" for k in SHAPE_FIELDS if have.get(k) != want[k]]
    if diffs:
        raise ProfileMismatchError(
            f"the profile is for another model: {profile.model_name!r}, not {model.name!r} "
            f"({'; '.join(diffs)}); profile this model: hpipe profile --model ..."
        )
    if profile.dtype != dtype:
        raise ProfileMismatchError(
            f"the profile was measured in {profile.dtype} but the plan uses {dtype}; "
            f"re-profile with --dtype {dtype} or plan with --dtype {profile.dtype}"
        )
    for dev in cluster.devices:
        got = profile.device(dev.name)
        if got.slowdown != dev.slowdown:
            raise ProfileMismatchError(
                f"device {dev.name!r} was profiled with emulated slowdown {got.slowdown:g} but "
                f"the cluster now says {dev.slowdown:g}; its times include the slowdown, so "
                "re-run hpipe profile with this cluster file"
            )
