"""Clusters: hosts, their devices in pipeline order, and the links between them.

A cluster is plain data (frozen dataclasses) read from YAML or built from a preset name:
``paper`` (the HPipe paper's 4 x P100 + 2 x RTX 3090 over 1 Gbps) or ``local:N`` (N CPU worker
processes on this machine). Validation names the offending field and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpipe.catalog import DEVICE_CATALOG, GIB, LINK_CATALOG, DeviceKind, LinkKind
from hpipe.errors import ClusterError, UnknownPresetError
from hpipe.textfile import read_text_file

GB = 1e9


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link. ``bandwidth_gbps`` is in Gbit/s, as network gear is sold."""

    kind: str
    bandwidth_gbps: float
    latency_s: float

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    def transfer_time_s(self, num_bytes: float) -> float:
        """[design] t_t = latency + bytes / bandwidth (algorithms.md section 2)."""
        return self.latency_s + num_bytes / self.bandwidth_bytes_s


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the pipeline, with the figures the analytic cost model needs.

    ``slowdown`` > 1 is an *emulation* knob: the runtime sleeps after each compute so a fast
    device behaves like one k times slower (k x the compute's CPU time; hpipe.emulation). It
    is labelled as emulation wherever it shows.
    """

    name: str
    kind: str
    host: str
    memory_bytes: int
    peak_flops_fp16: float
    peak_flops_fp32: float
    mem_bandwidth_bytes_s: float
    busy_power_w: float
    idle_power_w: float
    torch_device: str = "cpu"  # "cpu" or "cuda:K" for the real runtime
    num_threads: int = 1  # torch intra-op threads of a CPU worker
    slowdown: float = 1.0

    def peak_flops(self, dtype: str) -> float:
        return self.peak_flops_fp32 if dtype == "float32" else self.peak_flops_fp16

    @property
    def emulated(self) -> bool:
        return self.slowdown != 1.0

    @property
    def lends_cores(self) -> bool:
        """A worker on CPU cores of the catalog's ``cpu`` kind: its threads can be lent to a
        neighbour (hpipe/lending.py). A modelled GPU or custom device (the paper's cluster runs
        them as CPU processes with an emulated slowdown) has no cores the cost model would know
        how to price."""
        return self.kind == "cpu" and self.torch_device == "cpu"


@dataclass(frozen=True)
class HostSpec:
    name: str
    intra_link: LinkSpec
    device_names: tuple[str, ...]


@dataclass(frozen=True)
class ClusterSpec:
    """Devices in pipeline order (hosts kept contiguous) and the links joining hosts."""

    name: str
    hosts: tuple[HostSpec, ...]
    devices: tuple[DeviceSpec, ...]
    # (host_a, host_b, link) with host_a < host_b lexicographically; symmetric.
    host_links: tuple[tuple[str, str, LinkSpec], ...]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def device_index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise ClusterError(f"no device named {name!r} in cluster {self.name!r}")

    def link(self, src: int, dst: int) -> LinkSpec:
        """The link a tensor crosses from device index ``src`` to ``dst``."""
        a, b = self.devices[src], self.devices[dst]
        if a.host == b.host:
            return next(h.intra_link for h in self.hosts if h.name == a.host)
        key = tuple(sorted((a.host, b.host)))
        for ha, hb, link in self.host_links:
            if (ha, hb) == key:
                return link
        raise ClusterError(
            f"no link between hosts {key[0]!r} and {key[1]!r}; add "
            f"'links: [{{between: [{key[0]}, {key[1]}], kind: 1gbe}}]' to the cluster file"
        )

    @property
    def emulated(self) -> bool:
        return any(d.emulated for d in self.devices)

    def lendable_threads(self, device: int) -> int:
        """The threads a compute of device index ``device`` may run on when it is alone on its
        host (hpipe/lending.py): every CPU worker's threads of that host; 0 when it cannot
        borrow (not a ``cpu`` worker on CPU cores, an emulated slowdown that would scale the
        borrowed cores too, or nothing to borrow)."""
        me = self.devices[device]
        if not (me.lends_cores and not me.emulated):
            return 0
        total = sum(d.num_threads for d in self.devices if d.host == me.host and d.lends_cores)
        return total if total > me.num_threads else 0

    def host_orders(self) -> list[tuple[int, ...]]:
        """Device orders that keep each host's devices adjacent, one per permutation of hosts.

        [design] The paper fixes the device order; we try the few host orders (<= 4 hosts
        gives <= 24) because which host sits in front of the slow link matters.
        """
        import itertools

        by_host = {h.name: [i for i, d in enumerate(self.devices) if d.host == h.name]
                   for h in self.hosts}
        orders = []
        for perm in itertools.permutations(h.name for h in self.hosts):
            orders.append(tuple(i for name in perm for i in by_host[name]))
        return orders

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hosts": [
                {
                    "name": h.name,
                    "intra_link": dataclasses.asdict(h.intra_link),
                    "devices": [
                        dataclasses.asdict(d) for d in self.devices if d.host == h.name
                    ],
                }
                for h in self.hosts
            ],
            "links": [
                {"between": [a, b], **dataclasses.asdict(link)} for a, b, link in self.host_links
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClusterSpec:
        return parse_cluster(d)


def _number(value) -> float | None:
    """A finite number, or None. PyYAML (YAML 1.1) reads ``5e-05`` (no dot) as a string, so
    numeric strings count too; booleans do not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _check_keys(value: dict, known: tuple[str, ...], where: str, *,
                also: tuple[str, ...] = ()) -> None:
    """Refuse a key the loader would otherwise ignore: a typo such as ``bandwidth: 5`` or
    ``slowdwn: 3`` must not silently fall back to the catalog figure. ``also``: accepted but
    not suggested (to_dict's spelling)."""
    unknown = [str(k) for k in value if k not in known and k not in also]
    if unknown:
        raise ClusterError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(known)}")


_LINK_KEYS = ("between", "kind", "bandwidth_gbps", "latency_s")
_HOST_KEYS = ("name", "intra_link", "devices")
_CLUSTER_KEYS = ("name", "hosts", "links")


def _link_from(value, where: str) -> LinkSpec:
    """A link given by catalog kind ('pcie3') or by explicit bandwidth_gbps/latency_s."""
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ClusterError(f"{where}: expected a link kind or a mapping, got {value!r}")
    _check_keys(value, _LINK_KEYS, where)
    kind = value.get("kind", "custom")
    base: LinkKind | None = None
    if kind != "custom":
        if not isinstance(kind, str) or kind not in LINK_CATALOG:
            raise ClusterError(
                f"{where}.kind: unknown link kind {kind!r}; known: {', '.join(sorted(LINK_CATALOG))}"
            )
        base = LINK_CATALOG[kind]
    bw = value.get("bandwidth_gbps", base.bandwidth_gbps if base else None)
    lat = value.get("latency_s", base.latency_s if base else 0.0)
    if bw is None:
        raise ClusterError(f"{where}: a custom link needs bandwidth_gbps")
    if _number(bw) is None or _number(bw) <= 0:
        raise ClusterError(f"{where}.bandwidth_gbps must be a positive number, got {bw!r}")
    if _number(lat) is None or _number(lat) < 0:
        raise ClusterError(f"{where}.latency_s must be >= 0, got {lat!r}")
    bw, lat = _number(bw), _number(lat)
    return LinkSpec(kind=kind, bandwidth_gbps=float(bw), latency_s=float(lat))


# YAML key -> (DeviceSpec attribute, scale to SI units). to_dict writes the attribute names.
_EXPLICIT = {
    "memory_gb": ("memory_bytes", GIB),
    "fp16_tflops": ("peak_flops_fp16", 1e12),
    "fp32_tflops": ("peak_flops_fp32", 1e12),
    "mem_bandwidth_gbs": ("mem_bandwidth_bytes_s", GB),
    "busy_power_w": ("busy_power_w", 1.0),
    "idle_power_w": ("idle_power_w", 1.0),
}


_DEVICE_KEYS = ("name", "type", *_EXPLICIT, "slowdown", "num_threads", "torch_device")
# The spelling ClusterSpec.to_dict writes (plan and profile files carry their cluster).
_DEVICE_KEYS_TO_DICT = ("kind", "host", *(attr for attr, _ in _EXPLICIT.values()))


def _device_from(value: dict, host: str, where: str) -> DeviceSpec:
    if not isinstance(value, dict) or "name" not in value:
        raise ClusterError(f"{where}: each device needs a 'name' (and a 'type' or explicit figures)")
    if not isinstance(value["name"], str) or not value["name"]:
        # A YAML name like 0 or 1.5 would be stringified and then match nothing the user wrote.
        raise ClusterError(f"{where}.name must be a text name, got {value['name']!r}; quote it "
                           f"(name: \"{value['name']}\")")
    _check_keys(value, _DEVICE_KEYS, where, also=_DEVICE_KEYS_TO_DICT)
    # Accept both the YAML spelling (type, memory_gb, ...) and to_dict's (kind, memory_bytes, ...).
    fields: dict = {}
    kind = value.get("type", value.get("kind", "custom"))
    if kind != "custom":
        if not isinstance(kind, str) or kind not in DEVICE_CATALOG:
            raise ClusterError(
                f"{where}.type: unknown device {kind!r}; known: {', '.join(sorted(DEVICE_CATALOG))}"
                " (or give memory_gb, fp16_tflops, fp32_tflops, mem_bandwidth_gbs, busy_power_w, idle_power_w)"
            )
        fields.update(DEVICE_CATALOG[kind].as_fields())
    for key, (attr, scale) in _EXPLICIT.items():
        if key in value:
            v = _number(value[key])
            # idle power may be 0 (a figure nobody measured); everything else must be > 0
            if v is None or (v < 0 if attr == "idle_power_w" else v <= 0):
                raise ClusterError(f"{where}.{key} must be a positive number, got {value[key]!r}")
            fields[attr] = v * scale
        elif attr in value:
            fields[attr] = value[attr]
    missing = [k for k, (a, _) in _EXPLICIT.items() if a not in fields]
    if missing:
        raise ClusterError(f"{where}: custom device {value['name']!r} is missing {', '.join(missing)}")
    slowdown = value.get("slowdown", 1.0)
    if _number(slowdown) is None or _number(slowdown) < 1.0:
        raise ClusterError(f"{where}.slowdown must be a number >= 1 (an emulated slower device), got {slowdown!r}")
    slowdown = _number(slowdown)
    threads = value.get("num_threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ClusterError(f"{where}.num_threads must be a positive integer, got {threads!r}")
    torch_device = str(value.get("torch_device", "cpu"))
    if not re.fullmatch(r"cpu|cuda(:\d+)?", torch_device):
        raise ClusterError(f"{where}.torch_device must be 'cpu' or 'cuda:K', got {torch_device!r}")
    return DeviceSpec(
        name=str(value["name"]), kind=kind, host=host,
        memory_bytes=int(fields["memory_bytes"]),
        peak_flops_fp16=float(fields["peak_flops_fp16"]),
        peak_flops_fp32=float(fields["peak_flops_fp32"]),
        mem_bandwidth_bytes_s=float(fields["mem_bandwidth_bytes_s"]),
        busy_power_w=float(fields["busy_power_w"]), idle_power_w=float(fields["idle_power_w"]),
        torch_device=torch_device, num_threads=threads, slowdown=float(slowdown),
    )


def parse_cluster(d: dict, *, name: str | None = None) -> ClusterSpec:
    """Validate a cluster mapping (the YAML file's content) into a ClusterSpec; anything
    malformed is a ClusterError naming the field."""
    try:
        return _parse_cluster(d, name=name)
    except ClusterError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # A shape the field checks below did not foresee (found by tests/test_input_fuzz.py):
        # still the user's file, so a typed error, not a traceback.
        raise ClusterError(f"malformed cluster description ({type(e).__name__}: {e}); compare "
                           "it with the files in examples/") from None


def _parse_cluster(d: dict, *, name: str | None = None) -> ClusterSpec:
    if not isinstance(d, dict):
        raise ClusterError(f"a cluster file must be a mapping with 'hosts', got {type(d).__name__}")
    _check_keys(d, _CLUSTER_KEYS, "cluster")
    hosts_in = d.get("hosts")
    if not hosts_in:
        raise ClusterError("cluster is empty: 'hosts' must list at least one host with devices")
    if not isinstance(hosts_in, list):
        raise ClusterError(f"'hosts' must be a list of hosts ('- name: ...'), got {hosts_in!r}")
    hosts, devices, seen = [], [], set()
    for hi, h in enumerate(hosts_in):
        where = f"hosts[{hi}]"
        if not isinstance(h, dict) or "name" not in h:
            raise ClusterError(f"{where}: each host needs a 'name'")
        _check_keys(h, _HOST_KEYS, where)
        if str(h["name"]) in {x.name for x in hosts}:
            # Hosts are keyed by name (links, host orders): two with one name would merge.
            raise ClusterError(f"{where}: duplicate host name {str(h['name'])!r}; give each "
                               "host its own name (a host may list several devices)")
        devs = h.get("devices") or []
        if not devs:
            raise ClusterError(f"{where} ({h['name']!r}): 'devices' is empty")
        if not isinstance(devs, list):
            raise ClusterError(f"{where}.devices must be a list of devices ('- {{name: ..., "
                               f"type: ...}}'), got {devs!r}")
        intra = _link_from(h.get("intra_link", "pcie3"), f"{where}.intra_link")
        names = []
        for di, dv in enumerate(devs):
            dev = _device_from(dv, str(h["name"]), f"{where}.devices[{di}]")
            if dev.name in seen:
                raise ClusterError(f"{where}.devices[{di}]: duplicate device name {dev.name!r}")
            seen.add(dev.name)
            devices.append(dev)
            names.append(dev.name)
        hosts.append(HostSpec(name=str(h["name"]), intra_link=intra, device_names=tuple(names)))
    host_names = {h.name for h in hosts}
    links = []
    links_in = d.get("links") or []
    if not isinstance(links_in, list):
        raise ClusterError(f"'links' must be a list ('- {{between: [a, b], kind: 1gbe}}'), "
                           f"got {links_in!r}")
    for li, lk in enumerate(links_in):
        where = f"links[{li}]"
        between = lk.get("between") if isinstance(lk, dict) else None
        if not isinstance(between, list) or len(between) != 2:
            raise ClusterError(f"{where}.between must name two hosts, got {between!r}")
        for hn in between:
            if str(hn) not in host_names:
                raise ClusterError(
                    f"{where}.between refers to host {hn!r}, which is not in the cluster "
                    f"(hosts: {', '.join(sorted(host_names))})"
                )
        a, b = sorted(map(str, between))
        if a == b:
            raise ClusterError(f"{where}.between names host {a!r} twice; a host's own link "
                               "is its intra_link")
        if any((a, b) == (x, y) for x, y, _ in links):
            raise ClusterError(f"{where}: a second link between {a!r} and {b!r}; give each "
                               "pair of hosts one link")
        spec = {k: v for k, v in lk.items() if k != "between"}
        links.append((a, b, _link_from(spec, where)))
    cluster = ClusterSpec(name=str(d.get("name", name or "cluster")), hosts=tuple(hosts),
                          devices=tuple(devices), host_links=tuple(links))
    # Every pair of hosts that could become neighbours must be joined.
    for i in range(len(hosts)):
        for j in range(i + 1, len(hosts)):
            a = cluster.device_index(hosts[i].device_names[0])
            b = cluster.device_index(hosts[j].device_names[0])
            cluster.link(a, b)  # raises ClusterError naming the missing pair
    return cluster


def paper_cluster() -> ClusterSpec:
    """The paper's testbed: host 1 with 4 x P100, host 2 with 2 x RTX 3090, 1000 Mbps between."""
    return parse_cluster({
        "name": "paper",
        "hosts": [
            {"name": "host1", "intra_link": "pcie3",
             "devices": [{"name": f"p100-{i}", "type": "p100"} for i in range(4)]},
            {"name": "host2", "intra_link": "pcie4",
             "devices": [{"name": f"3090-{i}", "type": "rtx3090"} for i in range(2)]},
        ],
        "links": [{"between": ["host1", "host2"], "kind": "1gbe"}],
    })


def local_cluster(num_workers: int, *, num_threads: int = 1) -> ClusterSpec:
    """``local:N``: N CPU worker processes on this machine, joined by loopback."""
    if num_workers < 1:
        raise ClusterError(f"local:N needs N >= 1, got {num_workers}")
    return parse_cluster({
        "name": f"local:{num_workers}",
        "hosts": [{"name": "local", "intra_link": "loopback",
                   "devices": [{"name": f"cpu{i}", "type": "cpu", "num_threads": num_threads}
                               for i in range(num_workers)]}],
    })


def load_cluster(arg: str) -> ClusterSpec:
    """A cluster from a CLI argument: 'paper', 'local:N', or a path to a YAML file."""
    if arg == "paper":
        return paper_cluster()
    if arg.startswith("local:"):
        try:
            n = int(arg.split(":", 1)[1])
        except ValueError:
            raise ClusterError(f"--cluster {arg!r}: expected local:N with an integer N, e.g. local:2") from None
        return local_cluster(n)
    path = Path(arg)
    if not path.exists():
        raise UnknownPresetError(
            f"--cluster {arg!r} is neither a preset (paper, local:N) nor an existing YAML file"
        )
    text = read_text_file(path, what="--cluster", error=ClusterError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ClusterError(f"--cluster {str(path)!r}: not valid YAML{where}: {what}") from None
    try:
        return parse_cluster(data, name=path.stem)
    except ClusterError as e:
        raise ClusterError(f"--cluster {str(path)!r}: {e}") from None


__all__ = [
    "ClusterSpec", "DeviceSpec", "HostSpec", "LinkSpec", "DeviceKind", "load_cluster",
    "local_cluster", "paper_cluster", "parse_cluster",
]
