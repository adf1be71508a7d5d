"""Emulated hosts: a tbf-shaped veth link measures at its rate, and everything is cleaned up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpipe.netns import _list_ours, netns_network
from tests import netns_fixture
from tests.netns_fixture import free_port, require_netns

netns2 = netns_fixture.netns2  # the fixture, by the name the tests ask for

pytestmark = pytest.mark.netns


def _pingpong(net, sizes=(4096, 1 << 20, 4 << 20)) -> dict:
    port = str(free_port())
    addr = net.hosts[0].address
    argv = [sys.executable, "-m", "hpipe.profile.links", "--master-addr", addr,
            "--master-port", port, "--world-size", "2", "--repeats", "3",
            "--sizes", *map(str, sizes)]
    p0 = net.popen(0, [*argv, "--rank", "0"], stdout=subprocess.PIPE, text=True)
    p1 = net.popen(1, [*argv, "--rank", "1"], stdout=subprocess.DEVNULL)
    out, _ = p0.communicate(timeout=60)
    assert p1.wait(timeout=30) == 0 and p0.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_shaped_link_measures_at_its_rate(netns2):
    fit = _pingpong(netns2)
    rate_bytes_s = 200e6 / 8
    # tbf shapes to the rate; TCP over it gets 85-100% of it. Far below an unshaped veth
    # (several GB/s), so this shows the shaping is in force.
    assert 0.75 * rate_bytes_s < fit["bandwidth_bytes_s"] < 1.1 * rate_bytes_s, fit
    assert 0 < fit["latency_s"] < 5e-3, fit


def test_namespaces_are_removed_even_on_error():
    require_netns()
    before = set(_list_ours())
    with pytest.raises(RuntimeError, match="boom"):
        with netns_network(2, rates_mbit=100) as net:
            assert len(set(_list_ours()) - before) == 3  # two hosts and the switch
            proc = net.popen(0, ["sleep", "60"])
            raise RuntimeError("boom")
    assert set(_list_ours()) == before
    assert proc.poll() is not None  # the process it started was stopped too


def test_addresses_stay_inside_the_namespaces(netns2):
    # The machine's own namespace gets no address of the emulated subnet.
    own = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert netns2.hosts[0].address not in own
    inside = subprocess.run(netns2.exec_argv(0, ["ip", "-o", "addr"]), capture_output=True,
                            text=True).stdout
    assert netns2.hosts[0].address in inside
