"""The fitted cost model: per-device layer, embedding and head times fitted to a profile. Pure.

``FittedCost(profile, model, cluster, dtype)`` implements the ``CostModel`` protocol, so the
planners and the simulator use it exactly as they use the analytic roofline.

[Note: the fitted form] TeraPipe's latency model is t = t0(b, s) + a*b*s + b'*b*p + c*b*s*p,
with t0 read from a table of no-context timings. We fit, per device and per layer,

    t(b, s, p) = k0 + k1*b*s + k2*b*p + k3*b*s*p + k4*b*s^2

by least squares over the whole (b, s, p) grid, each term being a piece of work:
  k0       per call: reading the layer's weights, kernel launches, Python and dispatch;
  k1*b*s   the matmuls (2 * params per token) and the elementwise ops;
  k2*b*p   reading the cached K, V of the prefix (memory-bound, per row);
  k3*b*s*p attention scores and values against the prefix (the slope algorithms.md names:
           per-token time grows linearly with position);
  k4*b*s^2 causal attention inside the slice itself, which t0(b, s) absorbs in TeraPipe's form.
Why not TeraPipe's table for t0: the slicing DP asks for every slice length on a g-token grid
and the layer DP for the whole prompt, mostly lengths the profile never measured; a table
must interpolate and cannot extrapolate, while k0 + k1*b*s + k4*b*s^2 is t0(b, s) in closed
form and extrapolates along the same physics. The residuals are printed by ``hpipe profile``
so a poor fit shows.

The fit minimises *relative* error (rows weighted by 1/t): a slice of 16 tokens and a prompt
of 2048 matter equally to a pipeline's bubbles, and plain least squares would fit the long
ones and miss the short ones by 2x. Coefficients are kept non-negative (active-set refit):
every term is work, and a negative one would make a longer slice cheaper somewhere on the
grid the DP explores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpipe.cluster import ClusterSpec
from hpipe.cost.profile_file import DeviceProfile, LinkProfile, Profile, check_profile
from hpipe.spec import ModelSpec, dtype_bytes

LAYER_TERMS = ("1", "b*s", "b*p", "b*s*p", "b*s^2")
# The head runs on the rows and tokens the last stage receives; whether it projects every
# token or only the last one, 1 + b + b*s covers both.
HEAD_TERMS = ("1", "b", "b*s")
EMBED_TERMS = ("1", "b*s")
CALL_TERMS = ("1", "b*s", "s*(p+s)")  # Python per call; rotary per token; the prefix mask
MEMORY_TERMS = ("b*s", "b*s*(p+s)")  # activations; attention scores over prefix + slice
# A decode step of one layer: the weights read once, per-row work, each row's KV read.
DECODE_LAYER_TERMS = ("1", "b", "b*p")
DECODE_HEAD_TERMS = ("1", "b")  # the vocabulary matrix read once, per-row logits
DECODE_CALL_TERMS = ("1", "b")


def decode_layer_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(b), b, b * p], axis=-1)


def decode_rows_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(b), b], axis=-1)


def layer_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(b), b * s, b * p, b * s * p, b * s * s], axis=-1)


def head_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(b), b, b * s], axis=-1)


def embed_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(b), b * s], axis=-1)


def call_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(b), b * s, s * (p + s)], axis=-1)


def memory_features(b: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.stack([b * s, b * s * (p + s)], axis=-1)


def fit_nonnegative(x: np.ndarray, y: np.ndarray, *, relative: bool = True) -> np.ndarray:
    """Least squares ``x @ k ~= y`` with ``k >= 0``; relative error when ``relative``.

    Active set: solve, drop the most negative coefficient, repeat. With <= 5 terms this is at
    most 5 small solves, and it avoids a scipy dependency for one NNLS call.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    assert x.ndim == 2 and y.shape == (x.shape[0],), (x.shape, y.shape)
    w = 1.0 / np.maximum(np.abs(y), 1e-12) if relative else np.ones_like(y)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        xa = x[:, active] * w[:, None]
        # Column scaling: terms differ by up to 1e9 (1 vs b*s*p), which lstsq handles badly.
        scale = np.maximum(np.abs(xa).max(axis=0), 1e-30)
        sol, *_ = np.linalg.lstsq(xa / scale, y * w, rcond=None)
        sol = sol / scale
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            return coef
        del active[int(np.argmin(sol))]
    return coef


@dataclass(frozen=True)
class DeviceFit:
    """Fitted coefficients for one device (seconds, or bytes for memory), in the *_TERMS order."""

    layer: tuple[float, ...]
    embedding: tuple[float, ...]
    head: tuple[float, ...]
    call: tuple[float, ...]
    memory: tuple[float, ...]
    layer_rel_error_max: float  # worst relative residual of the layer fit over the grid
    # From the decode grid; None when the profile has none (decode then extrapolates the
    # prefill fit to one-token slices).
    decode_layer: tuple[float, ...] | None = None
    decode_head: tuple[float, ...] | None = None
    decode_call: tuple[float, ...] | None = None


def _samples(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arr = np.array([[s.rows, s.tokens, s.prefix, s.time_s] for s in samples], dtype=np.float64)
    return arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]


def fit_device(dev: DeviceProfile) -> DeviceFit:
    """Fit one device's samples. Pure; the profiler checked there are enough of them."""
    b, s, p, t = _samples(dev.layer)
    layer = fit_nonnegative(layer_features(b, s, p), t)
    pred = layer_features(b, s, p) @ layer
    rel = float(np.max(np.abs(pred - t) / t)) if len(t) else 0.0
    eb, es, ep, et = _samples(dev.embedding)
    hb, hs, hp, ht = _samples(dev.head)
    if dev.call:
        cb, cs, cp, ct = _samples(dev.call)
        call = fit_nonnegative(call_features(cb, cs, cp), ct)
    else:
        call = np.zeros(len(CALL_TERMS))
    if dev.memory:
        m = np.array([[x.rows, x.tokens, x.prefix, x.workspace_bytes] for x in dev.memory],
                     dtype=np.float64)
        mem = fit_nonnegative(memory_features(m[:, 0], m[:, 1], m[:, 2]), m[:, 3],
                              relative=False)
    else:
        mem = np.zeros(len(MEMORY_TERMS))
    decode = {}
    for part, samples, features in (("decode_layer", dev.decode_layer, decode_layer_features),
                                    ("decode_head", dev.decode_head, decode_rows_features),
                                    ("decode_call", dev.decode_call, decode_rows_features)):
        if samples:
            db, ds, dp, dt = _samples(samples)
            decode[part] = tuple(float(v) for v in fit_nonnegative(features(db, ds, dp), dt))
    return DeviceFit(
        **decode,
        layer=tuple(float(v) for v in layer),
        embedding=tuple(float(v) for v in fit_nonnegative(embed_features(eb, es, ep), et)),
        head=tuple(float(v) for v in fit_nonnegative(head_features(hb, hs, hp), ht)),
        call=tuple(float(v) for v in call),
        memory=tuple(float(v) for v in mem),
        layer_rel_error_max=rel,
    )


def _eval(features, coef: tuple[float, ...], b: int, s: int, p: int) -> float:
    f = features(np.array(float(b)), np.array(float(s)), np.array(float(p)))
    return float(f @ np.array(coef))


@dataclass(frozen=True)
class FittedCost:
    """CostModel from a profile. Refuses a profile of another model, dtype or cluster.

    With ``calibrated`` (the default) and a profile that has a calibration run, each device's
    compute is multiplied by its measured/predicted ratio from that run (see
    ``hpipe.profile.calibrate``, [Note: why calibrate]); ``calibrated=False`` gives the grid fit
    alone, which is what the calibration itself compares against.
    """

    profile: Profile
    model: ModelSpec
    cluster: ClusterSpec
    dtype: str
    calibrated: bool = True
    fits: tuple[DeviceFit, ...] = field(init=False, repr=False)
    compute_scale: tuple[float, ...] = field(init=False)
    # TP groups are an unmeasured estimate here (see stage_time_s): HPipe's search skips them.
    times_tp_groups = False

    def __post_init__(self) -> None:
        check_profile(self.profile, self.model, self.cluster, self.dtype)
        fits = tuple(fit_device(self.profile.device(d.name)) for d in self.cluster.devices)
        object.__setattr__(self, "fits", fits)
        cal = self.profile.calibration if self.calibrated else None
        scale = cal.compute_scale if cal is not None else (1.0,) * len(fits)
        object.__setattr__(self, "compute_scale", tuple(scale))

    # -- CostModel -----------------------------------------------------------------------
    def layer_time_s(self, device: int, *, batch: int, tokens: int, prefix: int) -> float:
        return _eval(layer_features, self.fits[device].layer, batch, tokens, prefix)

    def lent_speedup(self, device: int, *, tokens: int, threads: int) -> float | None:
        """How many times faster a prefill compute of ``tokens`` new tokens on device index
        ``device`` runs alone on ``threads`` borrowed threads (hpipe/lending.py) than on its own
        threads with every worker busy: the profile's lent samples over its grid samples at the
        same slices, interpolated in log tokens and flat beyond them, at most ``threads`` over
        the device's own. None when the profile did not time this device on that many threads
        (the caller then assumes).

        The cap: alone on 2 threads, a slice ran up to 2.05x faster than on 1 with both workers
        busy. Some of that is real (the busy grid also pays the workers' contention for caches
        and memory), some is the drift between two measurements taken seconds apart; a cap at
        the thread ratio keeps the drift from making lent computes look better than perfect
        scaling. (At that calibration, one whole-prompt stage after the other, each lent,
        was priced 8.53 s and a 6-slice pipeline 8.76 s; both measured 8.2 s.)"""
        dev = self.profile.device(self.cluster.devices[device].name)
        pts = dev.lent_speedups()
        if dev.lent_threads != threads or not pts:
            return None
        ratio = np.interp(np.log(max(tokens, 1)), [np.log(t) for t, _ in pts],
                          [r for _, r in pts])
        return float(min(ratio, threads / dev.num_threads))

    def stage_time_s(self, devices: tuple[int, ...], layer_start: int, layer_stop: int, *,
                     batch: int, tokens: int, prefix: int, has_embedding: bool,
                     has_head: bool) -> float:
        times = []
        for d in devices:
            fit = self.fits[d]
            t = (layer_stop - layer_start) * _eval(layer_features, fit.layer, batch, tokens, prefix)
            t += _eval(call_features, fit.call, batch, tokens, prefix)
            if has_embedding:
                t += _eval(embed_features, fit.embedding, batch, tokens, prefix)
            if has_head:
                t += _eval(head_features, fit.head, batch, tokens, prefix)
            times.append(t * self.compute_scale[d])
        if len(devices) == 1:
            return times[0]
        # [design] Tensor parallelism was not profiled: assume an ideal split of the measured
        # single-device time over the group, plus two all-reduces of the activation per layer
        # (Megatron's layout) over the group's measured link. An optimistic estimate, said so.
        g = len(devices)
        act_bytes = batch * tokens * self.model.hidden * dtype_bytes(self.dtype)
        ring = 2 * (g - 1) / g * act_bytes  # ring all-reduce moves 2(g-1)/g of the data
        allreduce = self.transfer_time_s(devices[0], devices[1], ring)
        return max(times) / g + 2 * (layer_stop - layer_start) * allreduce

    def decode_time_s(self, devices: tuple[int, ...], layer_start: int, layer_stop: int, *,
                      batch: int, context: int, has_embedding: bool, has_head: bool) -> float:
        """A decode step from the profile's decode grid (batch x context, one new token per
        row); a profile without one extrapolates the prefill grid to one-token slices."""
        if any(self.fits[d].decode_layer is None for d in devices):
            return self.stage_time_s(devices, layer_start, layer_stop, batch=batch, tokens=1,
                                     prefix=context, has_embedding=has_embedding,
                                     has_head=has_head)
        times = []
        for d in devices:
            fit = self.fits[d]
            t = (layer_stop - layer_start) * _eval(decode_layer_features, fit.decode_layer,
                                                   batch, 1, context)
            t += _eval(decode_rows_features, fit.decode_call, batch, 1, context)
            if has_embedding:
                t += _eval(embed_features, fit.embedding, batch, 1, 0)
            if has_head:
                t += _eval(decode_rows_features, fit.decode_head, batch, 1, context)
            times.append(t * self.compute_scale[d])
        if len(devices) == 1:
            return times[0]
        # As stage_time_s: an ideal split of the measured time, plus two all-reduces a layer.
        g = len(devices)
        act_bytes = batch * self.model.hidden * dtype_bytes(self.dtype)
        allreduce = self.transfer_time_s(devices[0], devices[1], 2 * (g - 1) / g * act_bytes)
        return max(times) / g + 2 * (layer_stop - layer_start) * allreduce

    def link_fit(self, src: int, dst: int) -> tuple[float, float] | None:
        """(latency_s, bandwidth_bytes_s) measured between two devices, or None."""
        a, b = self.cluster.devices[src].name, self.cluster.devices[dst].name
        lk: LinkProfile | None = self.profile.link(a, b)
        return None if lk is None else (lk.latency_s, lk.bandwidth_bytes_s)

    def transfer_time_s(self, src: int, dst: int, num_bytes: float) -> float:
        if src == dst:
            return 0.0
        fit = self.link_fit(src, dst)
        if fit is None:
            # Only neighbours are ping-ponged; a pair the profile skipped (another host
            # order) falls back to the cluster file's figures.
            return self.cluster.link(src, dst).transfer_time_s(num_bytes)
        latency_s, bandwidth = fit
        return latency_s + num_bytes / bandwidth

    def stage_memory_bytes(self, devices: tuple[int, ...], layer_start: int, layer_stop: int, *,
                           batch: int, seq_len: int, units: tuple[tuple[int, int, int], ...],
                           has_embedding: bool, has_head: bool) -> int:
        """Context + weights + KV cache (counted from the real tensors when profiling) + the
        largest fitted workspace over ``units``; a TP group splits weights and KV evenly."""
        g = len(devices)
        dev = self.profile.device(self.cluster.devices[devices[0]].name)
        n = layer_stop - layer_start
        weights = n * dev.layer_weight_bytes
        weights += dev.embedding_weight_bytes if has_embedding else 0
        weights += dev.head_weight_bytes if has_head else 0
        kv = n * batch * seq_len * dev.kv_bytes_per_token_per_layer
        fit = self.fits[devices[0]]
        work = max((_eval(memory_features, fit.memory, r, t, p) for r, t, p in units),
                   default=0.0)
        return int(dev.context_bytes + (weights + kv) / g + work)


__all__ = ["FittedCost", "DeviceFit", "fit_device", "fit_nonnegative", "LAYER_TERMS"]
