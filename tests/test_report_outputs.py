"""Chrome trace, PNG Gantt and tables from simulated timelines (fake cost, no planner needed)."""

import json
import struct

import pytest

from hpipe.cluster import paper_cluster
from hpipe.plan.compare import even_layer_split, result_from_plan
from hpipe.plan.plan import Plan, StagePlan
from hpipe.report.gantt import plot_timelines
from hpipe.report.tables import memory_table, performance_table
from hpipe.report.trace import chrome_trace, write_chrome_trace
from hpipe.sim import simulate
from hpipe.spec import model_preset

GIB = 2**30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SpeedCost:
    """Time grows with layers, rows, tokens and prefix, over a per-device speed; fixed memory per
    layer, so a plan that piles layers on one device overflows it."""

    times_tp_groups = True

    def __init__(self, speeds, mem_per_layer_bytes=GIB):
        self.speeds = speeds
        self.mem_per_layer = mem_per_layer_bytes

    def stage_time_s(self, devices, layer_start, layer_stop, *, batch, tokens, prefix,
                     has_embedding, has_head):
        work = (layer_stop - layer_start) * batch * tokens * (1 + (prefix + tokens / 2) / 1024)
        return work * 1e-5 / self.speeds[devices[0]]

    def transfer_time_s(self, src, dst, num_bytes):
        return 1e-4 + num_bytes / 1e9

    def stage_memory_bytes(self, devices, layer_start, layer_stop, **kw):
        return (layer_stop - layer_start) * self.mem_per_layer


MODEL = model_preset("llama-7b")
CLUSTER = paper_cluster()
COST = SpeedCost([1, 1, 1, 1, 3.5, 3.5])


def _plan(method, stages, slices, batch=6, microbatches=1):
    return Plan(method=method, model=MODEL, cluster=CLUSTER, batch=batch, seq_len=sum(slices),
                dtype="float16", stages=stages, slices=tuple(slices),
                num_microbatches=microbatches)


EVEN = even_layer_split(32, 6)
SKEWED = (StagePlan((0,), 0, 3), StagePlan((1,), 3, 6), StagePlan((2,), 6, 9),
          StagePlan((4,), 9, 20), StagePlan((5,), 20, 32))  # p100-3 gets nothing


@pytest.fixture(scope="module")
def timelines():
    return {
        "even": simulate(_plan("terapipe", EVEN, [256] * 8), COST),
        "hpipe": simulate(_plan("hpipe", SKEWED, [640, 512, 384, 320, 192]), COST),
        "gpipe": simulate(_plan("gpipe", EVEN, [2048], microbatches=3), COST),
    }


def test_trace_has_one_event_per_interval_with_microsecond_times(timelines, tmp_path):
    tls = [timelines["even"], timelines["hpipe"]]
    path = write_chrome_trace(tmp_path / "t.json", tls)
    trace = json.loads(path.read_text())  # valid JSON
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == sum(len(t.intervals) for t in tls)
    for pid, tl in enumerate(tls):
        mine = sorted((e for e in xs if e["pid"] == pid), key=lambda e: (e["ts"], e["tid"]))
        ivs = sorted(tl.intervals, key=lambda iv: (iv.start_s, 2 * iv.row + (iv.kind == "send")))
        for e, iv in zip(mine, ivs):
            assert e["ts"] == pytest.approx(iv.start_s * 1e6)
            assert e["dur"] == pytest.approx((iv.end_s - iv.start_s) * 1e6)
            assert e["args"]["slice"] == iv.slice_index and e["args"]["unit"] == iv.unit
            # sends on their own track, right under the device's compute track
            assert e["tid"] == 2 * iv.row + (1 if iv.kind == "send" else 0)
    names = {e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "4: 3090-0" in names and "4: 3090-0 send" in names
    meta = trace["otherData"]["hpipe"]
    assert [m["method"] for m in meta] == ["terapipe", "hpipe"]
    assert meta[0]["predicted"] is True and meta[0]["emulated"] is False


def test_trace_labels_must_match_timelines(timelines):
    with pytest.raises(ValueError, match="2 labels for 1 timelines"):
        chrome_trace([timelines["even"]], labels=["a", "b"])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    return len(data), width, height


def test_gantt_stacked_and_overlay_pngs_are_real_images(timelines, tmp_path):
    stacked = plot_timelines([timelines["even"], timelines["hpipe"], timelines["gpipe"]],
                             tmp_path / "stacked.png", titles=["even", "hpipe", "gpipe"])
    n_bytes, w, h = _png_size(stacked)
    assert n_bytes > 20_000 and w > 1000 and h > 600
    overlay = plot_timelines([(timelines["hpipe"], timelines["even"])], tmp_path / "overlay.png")
    n_bytes, w, h = _png_size(overlay)
    assert n_bytes > 10_000 and w > 1000
    with pytest.raises(ValueError, match="1 titles for 2 panels"):
        plot_timelines([timelines["even"], timelines["hpipe"]], tmp_path / "x.png", titles=["a"])


def test_tables_show_oom_per_device_and_in_performance():
    # 17 layers x 1 GiB on p100-0 overflow its 16 GiB; 15 GiB fit the 24 GiB 3090.
    base = result_from_plan(_plan("base", (StagePlan((0,), 0, 17), StagePlan((4,), 17, 32)),
                                  [2048]), COST)
    hp = result_from_plan(_plan("hpipe", SKEWED, [1024, 1024]), COST)
    assert base.oom_devices == ("p100-0",) and not base.runs
    results = {"base": base, "hpipe": hp}
    mem = memory_table(results)
    lines = {ln.split()[0]: ln.split() for ln in mem.splitlines()[2:]}
    assert lines["base"][1] == "OOM" and lines["base"][5] == "15360"  # 3090-0: 15 layers
    assert lines["hpipe"][4] == "-"  # p100-3 holds no layers
    perf = performance_table(results, markdown=True)
    base_row = next(r for r in perf.splitlines() if r.startswith("| base"))
    assert "OOM" in base_row and "OOM on p100-0" in base_row
    hp_row = next(r for r in perf.splitlines() if r.startswith("| hpipe"))
    assert "OOM" not in hp_row and "| ok" in hp_row
