"""pytest fixtures for emulated hosts: network namespaces joined by shaped veths (hpipe.netns).

Import the fixtures into a test module (``from tests.netns_fixture import netns2  # noqa``).
They skip, with the reason, where root or iproute2 is missing, and always clean up.
"""

from __future__ import annotations

import socket

import pytest

from hpipe.netns import netns_network, netns_unavailable_reason


def require_netns() -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


def free_port() -> int:
    # A port free in the machine's namespace; a fresh namespace has every port free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def netns2():
    """Two hosts, each uplink shaped to 200 Mbit/s: slow enough to see, fast enough for tests."""
    require_netns()
    with netns_network(2, rates_mbit=200) as net:
        yield net


@pytest.fixture
def netns_factory():
    """``make(num_hosts, rates_mbit)`` -> a network, torn down after the test."""
    require_netns()
    import contextlib

    with contextlib.ExitStack() as stack:
        yield lambda n, rates_mbit=None: stack.enter_context(netns_network(n, rates_mbit=rates_mbit))
