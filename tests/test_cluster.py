"""Cluster files: every malformed input names the offending field (pytest.raises + match)."""

import pytest

from hpipe.cluster import load_cluster, parse_cluster
from hpipe.errors import ClusterError, UnknownPresetError


def _one_host(**dev):
    return {"hosts": [{"name": "h", "devices": [{"name": "g0", "type": "p100", **dev}]}]}


def test_paper_preset():
    c = load_cluster("paper")
    assert [d.kind for d in c.devices] == ["p100"] * 4 + ["rtx3090"] * 2
    assert c.link(3, 4).kind == "1gbe" and c.link(0, 1).kind == "pcie3"
    assert c.host_orders() == [(0, 1, 2, 3, 4, 5), (4, 5, 0, 1, 2, 3)]


def test_unknown_device():
    with pytest.raises(ClusterError, match=r"hosts\[0\]\.devices\[0\]\.type: unknown device 'p1000'"):
        parse_cluster({"hosts": [{"name": "h", "devices": [{"name": "g", "type": "p1000"}]}]})


@pytest.mark.parametrize("bw", [0, -5])
def test_zero_or_negative_link_bandwidth(bw):
    d = {"hosts": [{"name": "a", "devices": [{"name": "x", "type": "t4"}]},
                   {"name": "b", "devices": [{"name": "y", "type": "t4"}]}],
         "links": [{"between": ["a", "b"], "bandwidth_gbps": bw}]}
    with pytest.raises(ClusterError, match=r"links\[0\]\.bandwidth_gbps must be a positive number"):
        parse_cluster(d)


def test_intra_link_bandwidth_zero():
    d = {"hosts": [{"name": "a", "intra_link": {"bandwidth_gbps": 0},
                    "devices": [{"name": "x", "type": "t4"}]}]}
    with pytest.raises(ClusterError, match=r"hosts\[0\]\.intra_link\.bandwidth_gbps"):
        parse_cluster(d)


def test_link_to_no_host():
    d = {"hosts": [{"name": "a", "devices": [{"name": "x", "type": "t4"}]}],
         "links": [{"between": ["a", "nowhere"], "kind": "1gbe"}]}
    with pytest.raises(ClusterError, match=r"refers to host 'nowhere'"):
        parse_cluster(d)


def test_missing_link_between_hosts():
    d = {"hosts": [{"name": "a", "devices": [{"name": "x", "type": "t4"}]},
                   {"name": "b", "devices": [{"name": "y", "type": "t4"}]}]}
    with pytest.raises(ClusterError, match=r"no link between hosts 'a' and 'b'"):
        parse_cluster(d)


@pytest.mark.parametrize("d", [{}, {"hosts": []}])
def test_empty_cluster(d):
    with pytest.raises(ClusterError, match="cluster is empty"):
        parse_cluster(d)


def test_host_without_devices():
    with pytest.raises(ClusterError, match=r"hosts\[0\] \('h'\): 'devices' is empty"):
        parse_cluster({"hosts": [{"name": "h", "devices": []}]})


def test_bad_explicit_figures():
    with pytest.raises(ClusterError, match=r"memory_gb must be a positive number, got -1"):
        parse_cluster(_one_host(memory_gb=-1))
    with pytest.raises(ClusterError, match=r"slowdown must be a number >= 1"):
        parse_cluster(_one_host(slowdown=0.5))


def test_unknown_cluster_arg_and_yaml_round_trip(tmp_path):
    with pytest.raises(UnknownPresetError, match="neither a preset"):
        load_cluster(str(tmp_path / "missing.yaml"))
    f = tmp_path / "c.yaml"
    f.write_text("hosts:\n- name: h\n  devices:\n  - {name: g0, type: a10}\n  - {name: g1, type: a10}\n")
    c = load_cluster(str(f))
    assert c.num_devices == 2 and parse_cluster(c.to_dict()) == c


def test_cluster_written_as_json_reads_back_as_yaml():
    # PyYAML reads JSON's 5e-05 (no dot) as a string; the loader must still take it as a number.
    import json

    import yaml

    from hpipe.cluster import paper_cluster, parse_cluster

    cluster = paper_cluster()
    assert parse_cluster(yaml.safe_load(json.dumps(cluster.to_dict()))) == cluster


def _two_hosts(**extra):
    return {"hosts": [{"name": "a", "devices": [{"name": "x", "type": "t4"}]},
                      {"name": "b", "devices": [{"name": "y", "type": "t4"}]}], **extra}


def test_duplicate_host_names_are_refused_not_a_planner_crash():
    # Two hosts named 'a' used to reach the planner, which indexed a device twice (KeyError).
    d = {"hosts": [{"name": "a", "devices": [{"name": "x", "type": "t4"}]},
                   {"name": "a", "devices": [{"name": "y", "type": "t4"}]}]}
    with pytest.raises(ClusterError, match=r"hosts\[1\]: duplicate host name 'a'"):
        parse_cluster(d)


@pytest.mark.parametrize("d,match", [
    # A typo must not silently leave the catalog figure in place.
    (_one_host(slowdwn=3), r"hosts\[0\]\.devices\[0\]: unknown key\(s\) 'slowdwn'; known: .*slowdown"),
    (_two_hosts(links=[{"between": ["a", "b"], "kind": "1gbe", "bandwidth": 5}]),
     r"links\[0\]: unknown key\(s\) 'bandwidth'; known: .*bandwidth_gbps"),
    (_two_hosts(link=[{"between": ["a", "b"], "kind": "1gbe"}]),
     r"cluster: unknown key\(s\) 'link'; known: name, hosts, links"),
    (_two_hosts(links=[{"between": ["a", "b"], "kind": "1gbe"},
                       {"between": ["b", "a"], "kind": "10gbe"}]),
     r"links\[1\]: a second link between 'a' and 'b'"),
    ({"hosts": {"name": "a", "devices": [{"name": "x", "type": "t4"}]}}, "'hosts' must be a list"),
    ({"hosts": [{"name": "a", "devices": {"name": "x", "type": "t4"}}]},
     r"hosts\[0\]\.devices must be a list"),
    (_one_host(num_threads=True), r"num_threads must be a positive integer, got True"),
    (_one_host(torch_device="cudaX"), r"torch_device must be 'cpu' or 'cuda:K', got 'cudaX'"),
])
def test_keys_and_shapes_the_loader_would_otherwise_ignore(d, match):
    with pytest.raises(ClusterError, match=match):
        parse_cluster(d)


def test_numeric_host_names_match_their_links():
    # YAML reads `name: 1` as an int; the link `between: [1, 2]` must still find the hosts.
    d = {"hosts": [{"name": 1, "devices": [{"name": "x", "type": "t4"}]},
                   {"name": 2, "devices": [{"name": "y", "type": "t4"}]}],
         "links": [{"between": [1, 2], "kind": "10gbe"}]}
    assert parse_cluster(d).link(0, 1).kind == "10gbe"
