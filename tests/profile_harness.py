"""A synthetic profile of SmolLM2's shape on local:2, shared by the profile-file, fitted-cost,
calibration and fuzz tests: times follow a known formula, so a fit can be checked against it."""

from __future__ import annotations

from hpipe.cost.profile_file import (
    DeviceProfile,
    LinkProfile,
    LinkSample,
    MemorySample,
    Profile,
    TimeSample,
    model_shape,
)
from hpipe.spec import model_preset

MODEL = model_preset("smollm2-135m")


def device_profile(name: str, slowdown: float = 1.0) -> DeviceProfile:
    grid = [(b, s, p) for b in (1, 2) for s in (16, 64, 256) for p in (0, 256, 1024)]
    return DeviceProfile(
        name=name, kind="cpu", torch_device="cpu", num_threads=1, slowdown=slowdown,
        layer=tuple(TimeSample(b, s, p, slowdown * (1e-3 + 2e-6 * b * s + 1e-9 * b * s * p))
                    for b, s, p in grid),
        embedding=tuple(TimeSample(b, s, 0, 1e-5 + 1e-8 * b * s) for b, s, _ in grid[::3]),
        head=tuple(TimeSample(b, s, 0, 1e-4 + 1e-6 * b) for b, s, _ in grid[::3]),
        call=tuple(TimeSample(b, s, p, 5e-5) for b, s, p in grid),
        memory=tuple(MemorySample(b, s, p, 4 * 576 * b * s + 36 * b * s * (p + s))
                     for b, s, p in grid),
        context_bytes=300 << 20, layer_weight_bytes=14 << 20,
        kv_bytes_per_token_per_layer=768, embedding_weight_bytes=113 << 20,
        head_weight_bytes=113 << 20, peak_memory_bytes=900 << 20,
    )


def make_profile(names=("cpu0", "cpu1"), slowdowns=(1.0, 1.0), model=MODEL) -> Profile:
    # A link needs two devices, and every device its slowdown (zip would drop the extras).
    assert len(names) == len(slowdowns) >= 2, (names, slowdowns)
    return Profile(
        model_name=model.name, model_shape=model_shape(model), dtype="float32",
        torch_version="2.13.0", date="2026-01-01T00:00:00+00:00", cluster_name="local:2",
        device_names=tuple(names),
        devices=tuple(device_profile(n, s) for n, s in zip(names, slowdowns)),
        links=(LinkProfile(names[0], names[1], (LinkSample(1024, 5e-5), LinkSample(1 << 20, 1e-3)),
                           latency_s=4e-5, bandwidth_bytes_s=1.1e9),),
    )
