"""``hpipe experiment paper``: every table and figure of the paper's section 4, on the simulator.

The experiment is a list of named steps (so the CLI can show a progress bar); each step plans,
simulates, and writes its tables/figures under ``out_dir``. ``summary()`` returns everything as
plain JSON-able data, from which ``hpipe.report.markdown`` writes report.md and the CLI prints
the headline ratios. All numbers come from the analytic cost model on spec-sheet figures: they
are predictions, and report.md says so.

HPipe here is the paper's: a pure pipeline (``allow_tp=False``). hpipe's own search may also
put a tensor-parallel pair of devices on a stage (the default of ``hpipe plan``); one step
reports what that finds, beside the paper's method rather than in its place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpipe.cluster import ClusterSpec, paper_cluster
from hpipe.plan.compare import (
    PAPER_METHODS,
    MethodResult,
    evaluate_methods,
    even_layer_split,
    result_from_plan,
)
from hpipe.plan.plan import Plan
from hpipe.report.bound import gap_breakdown, latency_lower_bound
from hpipe.report.gantt import plot_timelines
from hpipe.report.tables import MB, energy_table, memory_table, performance_table, render
from hpipe.report.trace import write_chrome_trace
from hpipe.spec import model_preset

# (preset, batch) pairs of the paper's main experiments, at 2048 tokens.
MAIN_MODELS = (("llama-7b", 6), ("gpt3-2.7b", 12))
SEQ_LEN = 2048
# The objectives beyond the prefill: one request's whole latency, and 16 running at once.
OBJECTIVE_SETTING = {"seq_len": 2048, "max_new_tokens": 256, "concurrency": 16}
ABLATION_SLICES = (1, 2, 4, 8, 16, 32, 64, 128)
SCALING_MODEL = ("llama-13b", 6)
# The length sweep uses a 32k-context LLaMA-2-7B at batch 1: at batch 6, 32k tokens of KV cache
# alone (~103 GB in fp16) exceed the cluster's 112 GB once the 13.5 GB of weights are added.
SWEEP_MODEL, SWEEP_BATCH = "llama-2-7b-32k", 1
SWEEP_LENGTHS = (2048, 4096, 8192, 16384, 32768)
SWEEP_METHODS = ("base", "gpb", "terapipe", "hpipe")


def uniform_slices(seq_len: int, num_slices: int) -> tuple[int, ...]:
    """``num_slices`` near-equal slices, the longer ones first."""
    q, r = divmod(seq_len, num_slices)
    return tuple(q + (1 if i < r else 0) for i in range(num_slices))


def _with(plan: Plan, *, method: str, stages=None, slices=None) -> Plan:
    """A manual variant of ``plan`` (same setting), e.g. HPipe's layer split with uniform slices."""
    return Plan(method=method, model=plan.model, cluster=plan.cluster, batch=plan.batch,
                seq_len=plan.seq_len, dtype=plan.dtype, stages=stages or plan.stages,
                slices=slices or plan.slices)


def plan_row_labels(plan: Plan) -> list[str]:
    """'3090-0  L0-7' per device row: the layer split is what the timeline figure explains."""
    return [f"{plan.cluster.devices[d].name}  L{s.layer_start}-{s.layer_stop - 1}"
            for s in plan.stages for d in s.devices]


def _result_json(r: MethodResult) -> dict:
    tl = r.timeline
    out = {"status": r.status, "runs": r.runs, "oom_devices": list(r.oom_devices),
           "memory_mb": {n: round(m / MB) for n, m in zip(r.device_names, r.memory_bytes)}}
    if r.plan is not None:
        out["layers"] = {"+".join(r.plan.cluster.devices[d].name for d in s.devices):
                         [s.layer_start, s.layer_stop] for s in r.plan.stages}
        out["slices"] = list(r.plan.slices)
        out["num_microbatches"] = r.plan.num_microbatches
    if tl is not None:
        out.update(latency_s=tl.prefill_latency_s, throughput_tok_s=tl.prefill_throughput_tok_s,
                   dyn_energy_j=tl.dynamic_energy_j(), total_energy_j=tl.total_energy_j(),
                   utilisation=dict(zip(tl.row_names, tl.utilisation())))
    return out


@dataclass
class PaperExperiment:
    """Runs the paper's experiments step by step and writes them under ``out_dir``."""

    out_dir: Path
    cluster: ClusterSpec = field(default_factory=paper_cluster)
    dtype: str = "float16"
    results: dict[str, dict[str, MethodResult]] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    sweep_lengths: tuple[int, ...] = SWEEP_LENGTHS
    allow_tp: bool = False  # the paper's HPipe has one device per stage

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        steps: list[tuple[str, Callable[[], None]]] = []
        for name, batch in MAIN_MODELS:
            steps.append((f"methods {name}", lambda n=name, b=batch: self._methods(n, b)))
        for name, _ in MAIN_MODELS:
            steps.append((f"timeline {name}", lambda n=name: self._timeline(n)))
            steps.append((f"ablation {name}", lambda n=name: self._ablation(n)))
        steps.append(("bound llama-7b", lambda: self._bound("llama-7b")))
        steps.append(("hpipe with tensor parallelism", self._tensor_parallel))
        steps.append(("objectives llama-7b", self._objectives))
        steps.append((f"scaling {SCALING_MODEL[0]}",
                       lambda: self._methods(*SCALING_MODEL, scaling=True)))
        for length in self.sweep_lengths:
            steps.append((f"sweep {length}", lambda n=length: self._sweep(n)))
        steps.append(("figures and report", self._finish))
        return steps

    def run(self) -> dict:
        for _, step in self.steps():
            step()
        return self.summary()

    # -- helpers -----------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> Path:
        path = self.out_dir / name
        path.write_text(text if text.endswith("\n") else text + "\n")
        self.files.append(name)
        return path

    def _cost(self, model):
        from hpipe.cost import cost_model

        # The paper's systems ran eager attention: its score tensors are why Base runs out
        # of memory there (hpipe/cost/memory.py, [Note: attention workspace]).
        return cost_model(model, self.cluster, self.dtype, attention="eager")

    # -- steps -------------------------------------------------------------------------------
    def _methods(self, name: str, batch: int, *, scaling: bool = False) -> None:
        model = model_preset(name)
        res = evaluate_methods(PAPER_METHODS, model=model, cluster=self.cluster, batch=batch,
                               seq_len=SEQ_LEN, dtype=self.dtype, cost=self._cost(model),
                               allow_tp=self.allow_tp)
        self.results[name] = res
        self.data.setdefault("models", {})[name] = {
            "batch": batch, "seq_len": SEQ_LEN, "scaling_only": scaling,
            "methods": {m: _result_json(r) for m, r in res.items()},
        }
        self._write(f"{name}_performance.md", performance_table(res, markdown=True))
        self._write(f"{name}_memory.md", memory_table(res, markdown=True))
        self._write(f"{name}_energy.md", energy_table(res, markdown=True))

    def _timeline(self, name: str) -> None:
        """The paper's timeline figure: even split with uniform slices, TeraPipe, then HPipe."""
        res = self.results[name]
        hp = res["hpipe"]
        assert hp.plan is not None, f"HPipe found no plan for {name}: {hp.error}"
        cost = self._cost(hp.plan.model)
        k = len(hp.plan.slices)
        even = _with(hp.plan, method="manual",
                     stages=even_layer_split(hp.plan.model.num_layers, self.cluster.num_devices),
                     slices=uniform_slices(SEQ_LEN, k))
        panels = [("even_uniform", f"even split, {k} uniform slices",
                   result_from_plan(even, cost))]
        if res["terapipe"].timeline is not None:
            panels.append(("terapipe", "TeraPipe (even split, TeraPipe slicing)", res["terapipe"]))
        panels.append(("hpipe", "HPipe (workload DP + slicing DP)", hp))
        titles = [f"{name}: {t}" + ("" if r.runs else f" [{r.status}]") for _, t, r in panels]
        tls = [r.timeline for _, _, r in panels]
        plot_timelines(tls, self.out_dir / f"{name}_timeline.png", titles=titles,
                       row_labels=[plan_row_labels(r.plan) for _, _, r in panels])
        self.files.append(f"{name}_timeline.png")
        # One trace with all panels (one process each) and one per panel, for Perfetto.
        write_chrome_trace(self.out_dir / f"{name}_timeline_trace.json", tls, labels=titles)
        self.files.append(f"{name}_timeline_trace.json")
        for (slug, _, r), title in zip(panels, titles):
            write_chrome_trace(self.out_dir / f"{name}_{slug}_trace.json", [r.timeline],
                               labels=[title])
            self.files.append(f"{name}_{slug}_trace.json")
        self.data.setdefault("timeline", {})[name] = {
            t: {"latency_s": r.timeline.prefill_latency_s,
                "utilisation": dict(zip(r.timeline.row_names, r.timeline.utilisation()))}
            for _, t, r in panels}

    def _ablation(self, name: str) -> None:
        """Uniform 1..128 slices on HPipe's layer split vs HPipe's dynamic slicing."""
        hp = self.results[name]["hpipe"]
        assert hp.plan is not None and hp.timeline is not None
        cost = self._cost(hp.plan.model)
        uniform = {}
        for n in ABLATION_SLICES:
            r = result_from_plan(_with(hp.plan, method="manual",
                                       slices=uniform_slices(SEQ_LEN, n)), cost)
            uniform[n] = {"latency_s": r.timeline.prefill_latency_s, "runs": r.runs}
        # Every count, not only powers of two: where does an equal slicing come closest?
        every = {}
        for n in range(1, max(ABLATION_SLICES) + 1):
            r = result_from_plan(_with(hp.plan, method="manual",
                                       slices=uniform_slices(SEQ_LEN, n)), cost)
            if r.runs:
                every[n] = r.timeline.prefill_latency_s
        best_any = min(every, key=every.get) if every else None
        self.data.setdefault("ablation", {})[name] = {
            "uniform": uniform, "dynamic_latency_s": hp.timeline.prefill_latency_s,
            "dynamic_slices": list(hp.plan.slices),
            "best_any_count": ({"num_slices": best_any, "latency_s": every[best_any]}
                               if best_any else None),
        }
        best = min(uniform, key=lambda n: uniform[n]["latency_s"])
        rows = [[str(n), f"{v['latency_s']:.3f}", "" if v["runs"] else "OOM",
                 "best uniform" if n == best else ""] for n, v in uniform.items()]
        rows.append([f"dynamic ({len(hp.plan.slices)})", f"{hp.timeline.prefill_latency_s:.3f}",
                     "", f"{100 * (1 - hp.timeline.prefill_latency_s / uniform[best]['latency_s']):.1f}% below best uniform"])
        self._write(f"{name}_ablation.md",
                    render(["num_slices", "latency_s", "memory", "note"], rows, markdown=True))

    def _bound(self, name: str) -> None:
        hp = self.results[name]["hpipe"]
        assert hp.plan is not None and hp.timeline is not None
        model = hp.plan.model
        bound = latency_lower_bound(model, self.cluster, self._cost(model),
                                    batch=hp.plan.batch, seq_len=SEQ_LEN)
        gap = gap_breakdown(hp.plan, hp.timeline, bound)
        self.data["bound"] = {
            "model": name, "total_tflops": bound.total_flops / 1e12,
            "rates_tflops_s": {n: r / 1e12 for n, r in zip(bound.device_names,
                                                            bound.rates_flops_s)},
            "bound_s": bound.bound_s, "hpipe_latency_s": gap.latency_s,
            "gap": gap.latency_s / bound.bound_s - 1,
            "shares": {"useful": gap.useful, "idle": gap.idle, "below_rate": gap.below_rate},
            "idle_by_device": dict(gap.idle_by_device),
            "utilisation_by_device": dict(gap.utilisation_by_device),
        }

    def _tensor_parallel(self) -> None:
        """HPipe's search with tensor-parallel pairs allowed, beside the paper's pure pipeline."""
        for name, batch in MAIN_MODELS:
            model = model_preset(name)
            r = evaluate_methods(("hpipe",), model=model, cluster=self.cluster, batch=batch,
                                 seq_len=SEQ_LEN, dtype=self.dtype, cost=self._cost(model),
                                 allow_tp=True)["hpipe"]
            self.data.setdefault("tensor_parallel", {})[name] = _result_json(r)

    def _objectives(self) -> None:
        """Beyond the paper: HPipe's plan for each objective, one LLaMA-7B request of
        ``OBJECTIVE_SETTING`` (and that many running at once for throughput)."""
        from hpipe.plan.compare import compare_objectives

        model = model_preset("llama-7b")
        s = OBJECTIVE_SETTING
        rows = compare_objectives(model=model, cluster=self.cluster, batch=1,
                                  seq_len=s["seq_len"], dtype=self.dtype,
                                  cost=self._cost(model), max_new_tokens=s["max_new_tokens"],
                                  concurrency=s["concurrency"], allow_tp=self.allow_tp)
        self.data["objectives"] = {"model": "llama-7b", **s, "rows": rows}

    def _sweep(self, length: int) -> None:
        model = model_preset(SWEEP_MODEL)
        res = evaluate_methods(SWEEP_METHODS, model=model, cluster=self.cluster,
                               batch=SWEEP_BATCH, seq_len=length, dtype=self.dtype,
                               cost=self._cost(model), allow_tp=self.allow_tp)
        self.data.setdefault("sweep", {})[str(length)] = {m: _result_json(r)
                                                          for m, r in res.items()}

    def _finish(self) -> None:
        from hpipe.report.figures import plot_ablation, plot_sweep
        from hpipe.report.markdown import headline, write_report

        plot_ablation(self.data["ablation"], self.out_dir / "ablation.png")
        plot_sweep(self.data["sweep"], self.out_dir / "seq_sweep.png",
                   title=f"{SWEEP_MODEL}, batch {SWEEP_BATCH}, paper cluster")
        self.files += ["ablation.png", "seq_sweep.png"]
        self.data["headline"] = headline(self.data)
        self._write("scaling.md", _scaling_table(self.data))
        self._write("seq_sweep.md", _sweep_table(self.data))
        write_report(self.data, self.out_dir / "report.md")
        self.files.append("report.md")
        self.files.append("summary.json")
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary(), indent=1))

    def summary(self) -> dict:
        return {**self.data, "out_dir": str(self.out_dir), "files": list(self.files)}


def _lat(m: dict) -> str:
    if not m.get("runs"):
        return "OOM" if m.get("oom_devices") else "infeasible"
    return f"{m['latency_s']:.3f}"


def _scaling_table(data: dict) -> str:
    methods = ("base", "gpipe", "terapipe", "hpipe")
    rows = []
    for name, d in data["models"].items():
        ms = d["methods"]
        hp = ms["hpipe"]
        speed = []
        for ref in ("base", "gpipe", "terapipe"):
            ok = ms[ref].get("runs") and hp.get("runs")
            speed.append(f"{ms[ref]['latency_s'] / hp['latency_s']:.2f}x" if ok else "-")
        rows.append([name, str(d["batch"])] + [_lat(ms[m]) for m in methods] + speed)
    return render(["model", "batch"] + [f"{m}_s" for m in methods]
                  + ["hpipe_vs_base", "hpipe_vs_gpipe", "hpipe_vs_terapipe"], rows, markdown=True)


def _sweep_table(data: dict) -> str:
    rows = []
    for length, ms in data["sweep"].items():
        hp = ms["hpipe"]
        row = [length] + [_lat(ms[m]) for m in SWEEP_METHODS]
        row.append(f"{ms['base']['latency_s'] / hp['latency_s']:.2f}x"
                   if ms["base"].get("runs") and hp.get("runs") else "-")
        row.append(f"{hp['throughput_tok_s'] / 1e3:.2f}" if hp.get("runs") else "-")
        rows.append(row)
    return render(["seq_len"] + [f"{m}_s" for m in SWEEP_METHODS]
                  + ["hpipe_vs_base", "hpipe_ktok_s"], rows, markdown=True)
