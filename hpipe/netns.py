"""Several emulated "hosts" on one Linux machine: network namespaces joined by shaped veths.

``netns_network(num_hosts, rates_mbit=...)`` builds, as a context manager,

    [hpipe-<pid>-h0] hpeth0 ==veth== sw-h0 \
    [hpipe-<pid>-h1] hpeth0 ==veth== sw-h1 -- br0 in [hpipe-<pid>-sw]
    ...                                    /

one namespace per host with its own loopback (devices of one host talk over it, unshaped) and
one veth to a bridge in a switch namespace. A host's uplink is shaped in *both* directions with
``tc qdisc ... tbf rate R`` (host side egress and switch side egress), so traffic between two
hosts crosses two R-limited queues: the slower host's rate is the link's rate. Everything lives
in namespaces created here: no address, route or qdisc is added to the machine's own network.

Latency: ``netem`` is not in this kernel, and we do without it rather than fake it: tbf adds
no delay beyond queueing, so a link here has veth latency (tens of microseconds) and the
shaped bandwidth. The profiler measures whatever latency there is (``hpipe.profile.links``),
so the planner's figures stay true; a WAN-like latency would need netem.

Clean-up always happens: on leaving the block (also on error), at interpreter exit (atexit),
and namespaces left by a process that died without either (SIGKILL) are removed the next time
a network is built, recognised by the dead pid in their name. Processes started with
``NetnsNetwork.popen`` are terminated before their namespace is deleted.

Workers: ``launch_netns(requests, rates_mbit=...)`` runs the runtime's requests with one
``torchrun`` per host of their cluster (``ip netns exec NS python -m torch.distributed.run
--nnodes H --node-rank h --nproc-per-node <its devices> ...``, static rendezvous at host 0's
veth address, ``HPIPE_HOST`` naming the cluster host), each rank being ``python -m hpipe.netns
--rank-of requests.pkl``, i.e. the runtime's own torchrun mode.

Script: ``python -m hpipe.netns --hosts 2 --rate-mbit 1000 -- CMD`` runs CMD (in the machine's
namespace) with HPIPE_NETNS_HOSTS="ns0=addr0,ns1=addr1" set, then cleans up;
``python -m hpipe.netns --cleanup`` removes leftovers.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREFIX = "hpipe-"
IFNAME = "hpeth0"  # the same name in every host namespace, so GLOO_SOCKET_IFNAME is one value
SUBNET = "10.213.0"  # private, and only ever assigned inside our namespaces


class NetnsError(RuntimeError):
    """Building the namespaces failed (the message carries the failing ip/tc command)."""


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be built here, or None when they can (for pytest skips)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, or in a container as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(argv: Sequence[str]) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if p.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def _list_ours() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete our namespaces whose creating process is gone; returns their names."""
    removed = []
    for ns in _list_ours():
        try:
            pid = int(ns[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class NetnsHost:
    netns: str
    address: str  # IPv4 of IFNAME in that namespace
    rate_mbit: float | None  # uplink shaping, both directions; None = unshaped veth


@dataclass
class NetnsNetwork:
    """A built network. Mutable only in the processes it tracks for clean-up."""

    switch: str
    hosts: tuple[NetnsHost, ...]
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def exec_argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def env(self, base: dict | None = None) -> dict:
        """Environment for a torch.distributed process in any host namespace: gloo must bind
        the veth (its default is the address the machine's hostname resolves to, which does
        not exist inside the namespace)."""
        env = dict(os.environ if base is None else base)
        env["GLOO_SOCKET_IFNAME"] = IFNAME
        env["TP_SOCKET_IFNAME"] = IFNAME
        return env

    def popen(self, host: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in host ``host``'s namespace; it is terminated on clean-up."""
        kwargs.setdefault("env", self.env())
        p = subprocess.Popen(self.exec_argv(host, argv), **kwargs)
        self._procs.append(p)
        return p

    def stop_processes(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()

    def env_value(self) -> str:
        return ",".join(f"{h.netns}={h.address}" for h in self.hosts)


def _tbf(ns: str, dev: str, rate_mbit: float) -> None:
    # burst: 1 ms at the rate (>= 32 KiB so one TSO segment fits), queue bounded at 50 ms.
    burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 * 1e-3))
    _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
          "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"])


def _delete(names: Sequence[str]) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def netns_network(
    num_hosts: int, *, rates_mbit: Sequence[float | None] | float | None = None,
) -> Iterator[NetnsNetwork]:
    """Build ``num_hosts`` namespaces on one shaped switch; delete them on exit, always.

    ``rates_mbit``: one figure for every uplink, or one per host (None leaves it unshaped).
    """
    if num_hosts < 1:
        raise ValueError(f"num_hosts must be >= 1, got {num_hosts}")
    if rates_mbit is None or isinstance(rates_mbit, (int, float)):
        rates = [rates_mbit] * num_hosts
    else:
        rates = list(rates_mbit)
        if len(rates) != num_hosts:
            raise ValueError(f"rates_mbit has {len(rates)} entries for {num_hosts} hosts")
    removed = cleanup_stale()
    if removed:
        log.info("removed stale namespaces %s", removed)
    tag = f"{PREFIX}{os.getpid()}-{id(rates) % 10000}"
    switch = f"{tag}-sw"
    created: list[str] = []
    net = NetnsNetwork(switch=switch, hosts=())

    def cleanup() -> None:
        net.stop_processes()
        _delete(created)
        created.clear()

    atexit.register(cleanup)
    try:
        _run(["ip", "netns", "add", switch])
        created.append(switch)
        _run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", switch, "link", "set", "br0", "up"])
        _run(["ip", "-n", switch, "link", "set", "lo", "up"])
        hosts = []
        for i, rate in enumerate(rates):
            ns = f"{tag}-h{i}"
            _run(["ip", "netns", "add", ns])
            created.append(ns)
            port = f"sw-h{i}"
            _run(["ip", "-n", switch, "link", "add", port, "type", "veth",
                  "peer", "name", IFNAME, "netns", ns])
            _run(["ip", "-n", switch, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", switch, "link", "set", port, "up"])
            addr = f"{SUBNET}.{i + 1}"
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            if rate is not None:
                if rate <= 0:
                    raise ValueError(f"rates_mbit[{i}] must be > 0 Mbit/s, got {rate}")
                _tbf(ns, IFNAME, rate)  # host -> switch
                _tbf(switch, port, rate)  # switch -> host
            hosts.append(NetnsHost(netns=ns, address=addr, rate_mbit=rate))
        net.hosts = tuple(hosts)
        yield net
    finally:
        cleanup()
        atexit.unregister(cleanup)


def torchrun_argv(net: NetnsNetwork, host: int, num_procs: int, program: Sequence[str],
                  *, port: int = 29533) -> list[str]:
    """torchrun for emulated host ``host`` with ``num_procs`` processes (one per device).

    Static rendezvous at host 0's veth address; every namespace has all ports free, so a fixed
    port is safe.
    """
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(net.hosts)}",
            f"--node-rank={host}", f"--nproc-per-node={num_procs}",
            f"--master-addr={net.hosts[0].address}", f"--master-port={port}", *program]


def run_torchrun_netns(cluster, program: Sequence[str], *,
                       rates_mbit: Mapping[str, float | None] | float | None = None,
                       timeout_s: float = 1200.0, quiet: bool = True) -> None:
    """One namespace per host of ``cluster`` (a ClusterSpec), ``program`` under torchrun in
    each with one process per device, then clean up.

    ``rates_mbit``: one uplink rate for every host, or host name -> rate (None: unshaped).
    Each process gets ``HPIPE_HOST=<cluster host name>``: every namespace shares the machine's
    hostname, and the runtime finds a rank's device by (HPIPE_HOST, LOCAL_RANK).
    """
    names = [h.name for h in cluster.hosts]
    if isinstance(rates_mbit, Mapping):
        rates = [rates_mbit.get(n) for n in names]
    else:
        rates = [rates_mbit] * len(names)
    with netns_network(len(names), rates_mbit=rates) as net:
        out = subprocess.DEVNULL if quiet else None
        procs = [net.popen(k, torchrun_argv(net, k, len(h.device_names), program), stdout=out,
                           env={**net.env(), "HPIPE_HOST": h.name})
                 for k, h in enumerate(cluster.hosts)]
        codes = [p.wait(timeout=timeout_s) for p in procs]
        if any(codes):
            raise NetnsError(f"torchrun exited with codes {codes} on hosts {names} "
                             f"({net.env_value()})")


def launch_netns(requests: list, *,
                 rates_mbit: Mapping[str, float | None] | float | None = None) -> list:
    """The runtime's ``launch_local`` across emulated hosts: one namespace per host of the
    requests' cluster, shaped per ``rates_mbit``. Returns rank 0's ``RunResult`` list."""
    import pickle
    import tempfile
    from pathlib import Path

    cluster = requests[0].plan.cluster
    with tempfile.TemporaryDirectory(prefix="hpipe-netns-") as tmp:
        req_path, out_path = Path(tmp) / "requests.pkl", Path(tmp) / "results.pkl"
        req_path.write_bytes(pickle.dumps(requests))
        run_torchrun_netns(cluster, ["-m", "hpipe.netns", "--rank-of", str(req_path),
                                     "--out", str(out_path)], rates_mbit=rates_mbit)
        return pickle.loads(out_path.read_bytes())


def _rank_main(requests_path: str, out_path: str) -> int:
    """One torchrun rank of ``launch_netns``: the runtime's torchrun mode on pickled requests."""
    import pickle
    from pathlib import Path

    from hpipe.runtime.launch import run_as_torchrun_rank, torchrun_env

    results = run_as_torchrun_rank(pickle.loads(Path(requests_path).read_bytes()),
                                   env=torchrun_env())
    if results is not None:
        Path(out_path).write_bytes(pickle.dumps(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--rank-of"]:
        return _rank_main(argv[1], argv[argv.index("--out") + 1])
    ap = argparse.ArgumentParser(prog="python -m hpipe.netns", description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--rate-mbit", type=float, default=None, help="uplink rate, e.g. 1000")
    ap.add_argument("--cleanup", action="store_true", help="remove leftovers and exit")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD to run while the network is up")
    args = ap.parse_args(argv)
    if args.cleanup:
        print("removed:", " ".join(cleanup_stale()) or "nothing")
        return 0
    reason = netns_unavailable_reason()
    if reason:
        print(f"hpipe.netns: {reason}", file=sys.stderr)
        return 2
    cmd = [c for c in args.cmd if c != "--"] or ["ip", "netns", "list"]
    with netns_network(args.hosts, rates_mbit=args.rate_mbit) as net:
        env = dict(os.environ, HPIPE_NETNS_HOSTS=net.env_value(), GLOO_SOCKET_IFNAME=IFNAME)
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["--rank-of"]:  # a torchrun rank
        from hpipe.runtime.launch import leave_rank

        leave_rank(code)
    sys.exit(code)
