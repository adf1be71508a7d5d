"""Local clusters that want more cores than the machine has are named, not silently timed."""

import logging
import os

from hpipe.cluster import local_cluster, parse_cluster
from hpipe.runtime.launch import cpu_demand_cores, warn_if_oversubscribed


def _cluster(slowdowns, threads=1):
    return parse_cluster({"name": "emu", "hosts": [{"name": "h", "intra_link": "loopback", "devices": [
        {"name": f"cpu{i}", "type": "cpu", "num_threads": threads, "slowdown": k}
        for i, k in enumerate(slowdowns)]}]})


def test_demand_counts_threads_and_divides_by_the_slowdown():
    assert cpu_demand_cores(local_cluster(3, num_threads=2)) == 6
    assert cpu_demand_cores(_cluster((1, 2, 4))) == 1 + 0.5 + 0.25


def test_oversubscribed_cluster_warns_with_the_numbers(caplog):
    cores = len(os.sched_getaffinity(0))
    too_many = local_cluster(cores + 1)
    with caplog.at_level(logging.WARNING, logger="hpipe.runtime.launch"):
        warn_if_oversubscribed([too_many], busy_cores=0.0)
    assert f"need about {cores + 1:.1f} cores" in caplog.text and f"has {cores}" in caplog.text
    caplog.clear()
    fits = _cluster((4.0,) * cores)
    with caplog.at_level(logging.WARNING, logger="hpipe.runtime.launch"):
        warn_if_oversubscribed([fits], busy_cores=0.0)
    assert caplog.text == ""


def test_a_busy_machine_warns_that_timings_will_be_off(caplog):
    """Two one-thread workers fit a 2-core machine only when nothing else runs there."""
    cores = len(os.sched_getaffinity(0))
    req = local_cluster(cores)
    with caplog.at_level(logging.WARNING, logger="hpipe.runtime.launch"):
        warn_if_oversubscribed([req], busy_cores=1.0)
    assert "other processes keep about 1.0 of this machine's" in caplog.text
    assert "run when the machine is idle" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpipe.runtime.launch"):
        warn_if_oversubscribed([req], busy_cores=0.3)  # a shell's noise: no warning
    assert caplog.text == ""


def test_busy_cores_are_measured_now_not_averaged_over_a_minute():
    """A process spinning during the window shows up; the reading is a share of the cores."""
    import threading
    import time

    from hpipe.runtime.launch import busy_cores_now

    stop = time.monotonic() + 0.6

    def spin() -> None:
        while time.monotonic() < stop:
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        busy = busy_cores_now(window_s=0.3)
    finally:
        spinner.join()
    assert 0.5 <= busy <= (os.cpu_count() or 1) + 1e-9
