"""Emulated slow devices: how long a device with ``slowdown`` k sleeps after a compute.

[Note: slowdown on CPU time] This machine has no slow GPU, so a cluster file may say that a
CPU worker is k times slower than it is, and the worker (and the profiler, the same way) then
stretches every compute to k times its *uncontended* duration: the CPU seconds the compute
used, per torch thread. Measured wall time would be the wrong base: when more workers than
cores compute at once (three emulated devices on two cores), a compute that waited for a core
would be stretched k-fold again, so the emulated device's speed would depend on its neighbours'
timing, not on k. On CPU time the sleep absorbs the wait instead, and a device with k >= 2
finishes at start + k x (its own work) as long as it got a core at least 1/k of the time. A
worker at k = 1 is a real device and is not touched. On a GPU the CPU clock says nothing about
the kernels, so there the base is the (synchronised) wall time.
"""

from __future__ import annotations


def emulated_sleep_s(slowdown: float, *, wall_s: float, cpu_s: float | None = None,
                     num_threads: int = 1) -> float:
    """Seconds to sleep after a compute of ``wall_s`` wall / ``cpu_s`` CPU seconds.

    ``cpu_s`` None (a GPU compute) stretches the wall time: (k - 1) x wall_s.
    """
    if slowdown <= 1.0:
        return 0.0
    if cpu_s is None:
        return (slowdown - 1.0) * wall_s
    own_s = min(wall_s, cpu_s / max(1, num_threads))
    return max(0.0, slowdown * own_s - wall_s)
