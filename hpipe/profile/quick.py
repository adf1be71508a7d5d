"""A quick calibration of this machine, so that plans and predictions start from measured speeds.

The analytic cost model prices a CPU from catalog figures, and on the machines we tried it was
1.3-1.8x pessimistic: ``make demo`` predicted a 10.1 s prefill that measured 5.7 s, and a
newcomer's first impression was that the predictions are wrong. ``hpipe profile`` fixes that
but takes a minute or more and has to be known about. So ``hpipe run`` and ``hpipe demo`` on
local CPU workers calibrate by themselves: the profiler's own workers time one block of the
model over a small grid (``measure.calibration_grid``: 11 points, two passes), all workers at
once as a pipeline keeps them (see [Note: concurrent or one at a time] in launch.py), then each
worker alone on the threads a lone compute borrows (hpipe/lending.py; [Note: lent threads
measured alone]), plus one ping-pong per pair. It takes 7-13 s for SmolLM2 on 2 CPU cores
(about 1 s of it the lent threads).

[Note: alike workers, one speed] Workers of one host with the same threads and slowdown run on
the same kind of core, so their grids differ by noise alone; planned from as measured, that
noise split the demo's 30 layers 14 + 16 on two identical workers (one grid point 0.030 s on
cpu0, 0.023 s on cpu1), and the stage with 16 computed 1.25x as long as the other. So the plan
sees, for each group of alike workers, one grid: the median of theirs, point by point
(``pool_alike``). The cache keeps what was measured.

The result is an ordinary profile (``quick=True``, no calibration run) kept under the user's
cache directory, keyed by everything it depends on: the model file (path, size, mtime), the
cluster's devices, the dtype, the grid's length, the torch version, the CPU model and the
number of cores. The next run with the same key reads it back.

``$HPIPE_CACHE_DIR`` moves the cache (default ``$XDG_CACHE_HOME/hpipe``, else
``~/.cache/hpipe``); ``HPIPE_CALIBRATION=off`` (or ``--no-calibration``) keeps the analytic
model; ``HPIPE_CALIBRATION=refresh`` (or ``--recalibrate``) measures again and replaces the
entry.

[Note: a stale calibration] A shared machine's speed drifts: on this 2-core VM the same
calibration grid's 4096-token point took 0.62-0.70 s within minutes, and a calibration taken in
a slow spell predicted runs 1.3x slower than they measured. An entry keeps what it measured, so
a run that measures its prefill more than STALE_RATIO off the prediction of a *cached* entry
says so and names ``--recalibrate`` (``stale_hint``). A fresh calibration that is off says
nothing: measuring again would not help.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from hpipe.cluster import ClusterSpec
from hpipe.cost.profile_file import DeviceProfile, Profile, TimeSample, read_profile

log = logging.getLogger(__name__)

STALE_RATIO = 1.25  # measured/predicted beyond this either way: the cached entry may be stale
CALIBRATION_VERSION = 2  # bump when the grid or the measurement changes: old entries go stale
MIN_GRID_TOKENS = 1024  # a shorter prompt still gets a grid this long (plans reach past it)


@dataclass(frozen=True)
class QuickCalibration:
    """A quick calibration's profile and where it is cached; ``measured_s`` None: read back."""

    profile: Profile
    path: Path
    measured_s: float | None

    def describe(self) -> str:
        how = (f"measured in {self.measured_s:.1f} s" if self.measured_s is not None
               else f"cached from {self.profile.date}")
        return (f"planned from a quick calibration of this machine ({how}; {self.path}). "
                "For a full one: hpipe profile --out FILE, then --profile FILE")


def calibration_wanted(flag_off: bool) -> bool:
    """False when ``--no-calibration`` or ``HPIPE_CALIBRATION=off`` (or 0/no/false)."""
    env = os.environ.get("HPIPE_CALIBRATION", "").strip().lower()
    return not flag_off and env not in ("off", "0", "no", "false")


def refresh_wanted(flag_refresh: bool) -> bool:
    """True when ``--recalibrate`` or ``HPIPE_CALIBRATION=refresh``: measure, replace the entry."""
    return flag_refresh or os.environ.get("HPIPE_CALIBRATION", "").strip().lower() == "refresh"


def stale_hint(calibration: QuickCalibration, measured_s: float,
               predicted_s: float) -> str | None:
    """What to tell a user whose run measured far from a cached calibration's prediction (see
    [Note: a stale calibration]); None when the entry was just measured or the run agrees."""
    if calibration.measured_s is not None or measured_s <= 0 or predicted_s <= 0:
        return None
    ratio = measured_s / predicted_s
    if 1 / STALE_RATIO <= ratio <= STALE_RATIO:
        return None
    how = "faster" if ratio < 1 else "slower"
    return (f"the prefill ran {max(ratio, 1 / ratio):.2f}x {how} than the quick calibration "
            f"cached on {calibration.profile.date} predicted ({measured_s:.2f} s measured, "
            f"{predicted_s:.2f} s predicted). If this machine was busier or idler then, "
            "--recalibrate measures it again (or HPIPE_CALIBRATION=refresh)")


def can_calibrate(cluster: ClusterSpec) -> bool:
    """Local CPU workers only: the calibration runs where ``hpipe run`` launches them. A GPU's
    or another host's speed is measured by ``hpipe profile`` on that device."""
    return all(d.torch_device == "cpu" for d in cluster.devices) and len(cluster.hosts) == 1


def grid_tokens(prompt_tokens: int, max_seq_len: int) -> int:
    """The grid's longest prompt: the next power of two at or above the prompt (at least
    MIN_GRID_TOKENS, at most the model's context), so prompts of similar lengths share one."""
    n = MIN_GRID_TOKENS
    while n < prompt_tokens:
        n *= 2
    return max(min(n, max_seq_len), min(prompt_tokens, max_seq_len))


def cache_dir() -> Path:
    if os.environ.get("HPIPE_CACHE_DIR"):
        return Path(os.environ["HPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hpipe"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_key(model: str, cluster: ClusterSpec, dtype: str, max_tokens: int) -> str:
    """What the calibration depends on, hashed (see the module's docstring)."""
    import torch

    path = Path(model)
    if path.exists():
        st = path.stat()
        model_id = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    else:  # a bundled name ("smollm2"): its file is found by the loader
        from hpipe.model.source import find_smollm2_gguf

        found = find_smollm2_gguf()
        st = found.stat()
        model_id = [str(found), st.st_size, st.st_mtime_ns]
    devices = [[d.name, d.torch_device, d.num_threads, d.slowdown] for d in cluster.devices]
    what = {"version": CALIBRATION_VERSION, "model": model_id, "devices": devices,
            "dtype": dtype, "max_tokens": max_tokens, "torch": torch.__version__,
            "cpu": _cpu_model(), "cores": os.cpu_count()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


TIME_TABLES = ("layer", "embedding", "head", "call", "decode_layer", "decode_head", "decode_call",
               "lent_layer")


def pool_alike(profile: Profile) -> Profile:
    """Each group of alike workers (kind, device, threads, slowdown; a quick calibration's
    workers are all on this host) gets one grid, the pointwise median of theirs (see
    [Note: alike workers, one speed]); a group whose grids differ in shape is left as
    measured."""
    groups: dict[tuple, list[DeviceProfile]] = {}
    for d in profile.devices:
        groups.setdefault((d.kind, d.torch_device, d.num_threads, d.slowdown), []).append(d)
    pooled: dict[str, DeviceProfile] = {}
    for alike in groups.values():
        shape = [[[(t.rows, t.tokens, t.prefix) for t in getattr(d, name)]
                  for name in TIME_TABLES] for d in alike]
        if len(alike) < 2 or any(s != shape[0] for s in shape):
            continue
        tables = {name: tuple(TimeSample(pts[0].rows, pts[0].tokens, pts[0].prefix,
                                         statistics.median(t.time_s for t in pts))
                              for pts in zip(*(getattr(d, name) for d in alike)))
                  for name in TIME_TABLES}
        for d in alike:
            pooled[d.name] = dataclasses.replace(d, **tables)
    return dataclasses.replace(profile,
                               devices=tuple(pooled.get(d.name, d) for d in profile.devices))


def quick_calibration(model: str, cluster: ClusterSpec, dtype: str, *, prompt_tokens: int,
                      max_seq_len: int, on_notice=None,
                      refresh: bool = False) -> QuickCalibration:
    """The cached calibration for this key, or a new one measured now and cached (always new
    with ``refresh``); ``on_notice(text)`` hears that a measurement starts."""
    max_tokens = grid_tokens(prompt_tokens, max_seq_len)
    path = cache_dir() / "calibration" / f"{cache_key(model, cluster, dtype, max_tokens)}.json"
    if path.exists() and not refresh:
        try:
            return QuickCalibration(pool_alike(read_profile(path)), path, None)
        except Exception as e:  # a damaged cache entry is measured again, not an error
            log.warning("ignoring the damaged calibration %s (%s); measuring again", path, e)
    from hpipe.profile.launch import ProfileJob, profile_local
    from hpipe.profile.links import QUICK_SIZES_BYTES
    from hpipe.profile.measure import calibration_grid

    job = ProfileJob(model=model, cluster=cluster, dtype=dtype,
                     grid=calibration_grid(max_tokens), link_sizes_bytes=QUICK_SIZES_BYTES,
                     link_repeats=3, quick=True, calibrate=False)
    if on_notice is not None:
        on_notice(f"calibrating this machine's {cluster.num_devices} CPU worker(s) for "
                  f"{Path(model).name} ({dtype}, prompts up to {max_tokens} tokens), once: "
                  "seconds for a small model, then cached")
    t0 = time.perf_counter()
    profile = profile_local(job)
    measured_s = time.perf_counter() - t0
    try:  # write then rename: a concurrent run never reads half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(profile.to_json())
        tmp.replace(path)
    except OSError as e:  # an unwritable cache costs the next run a calibration, nothing more
        log.warning("could not cache the calibration at %s (%s)", path, e)
    return QuickCalibration(pool_alike(profile), path, measured_s)
