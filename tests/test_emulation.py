"""The emulated-slowdown rule: k x the compute's own CPU time, whatever the wait for a core."""

import pytest

from hpipe.emulation import emulated_sleep_s


def test_real_devices_never_sleep():
    assert emulated_sleep_s(1.0, wall_s=2.0, cpu_s=1.0) == 0.0


def test_uncontended_compute_is_stretched_k_fold():
    # 1 s of work on a free core, k = 3: sleep 2 s, so the unit takes 3 s.
    assert emulated_sleep_s(3.0, wall_s=1.0, cpu_s=1.0) == pytest.approx(2.0)


def test_waiting_for_a_core_is_absorbed_not_multiplied():
    # The same 1 s of work took 2 s of wall time (another worker held the core half the time):
    # the unit still ends 3 s after it began, as a device 3x slower than a free core would.
    wall_s = 2.0
    assert wall_s + emulated_sleep_s(3.0, wall_s=wall_s, cpu_s=1.0) == pytest.approx(3.0)


def test_a_wait_beyond_the_slack_sleeps_nothing():
    assert emulated_sleep_s(3.0, wall_s=4.0, cpu_s=1.0) == 0.0


def test_cpu_time_is_spread_over_the_threads():
    # Two threads, 2 CPU s in 1 s of wall: 1 s of own time, k = 2 -> sleep 1 s.
    assert emulated_sleep_s(2.0, wall_s=1.0, cpu_s=2.0, num_threads=2) == pytest.approx(1.0)


def test_gpu_computes_stretch_the_wall_time():
    assert emulated_sleep_s(2.5, wall_s=0.4) == pytest.approx(0.6)
