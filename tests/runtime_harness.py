"""One harness for every runtime equivalence test: a case is a line of data, a launch runs many.

A ``Case`` names a model, a layer split, a slicing, a batch and a schedule. ``launch_cases``
runs all cases of one worker count in ONE local launch (worker start-up, i.e. importing torch in
each process, is the expensive part on a 2-core machine), and ``reference`` runs the same case
in this process with ``hpipe.model.generate.generate``. ``assert_equivalent`` is the contract:

- last-position prefill logits within ``LOGITS_ATOL`` (float32 on CPU; the pipeline and the
  reference run the same kernels, but with a different thread count per process and, for
  GPipe, smaller micro-batches, which changes reduction order: observed differences are ~1e-6,
  and the tiny models' logits span ~10, so 1e-4 has room yet is far below any greedy margin);
- generated token ids identical (greedy, or seeded sampling with the same Sampler).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpipe.cluster import ClusterSpec, local_cluster, parse_cluster
from hpipe.model.generate import GenerationResult, Sampler, generate
from hpipe.plan.plan import Plan, StagePlan
from hpipe.runtime import RunRequest, RunResult, check_request, launch_local
from hpipe.spec import ModelSpec

LOGITS_ATOL = 1e-4


@dataclass(frozen=True)
class Case:
    """``layers``: layer count per stage; ``slices``: token slices (their sum is the prompt);
    ``groups``: devices per stage (a tensor-parallel group where > 1), default one each."""

    name: str
    model: str  # a key of the paths given to launch_cases ("llama", "gpt2", "smollm2", ...)
    layers: tuple[int, ...]
    slices: tuple[int, ...]
    batch: int = 1
    method: str = "manual"  # only a label for the timeline; the structure is in the fields
    num_microbatches: int = 1
    max_new_tokens: int = 4
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's own
    groups: tuple[int, ...] = ()
    lend: bool = False  # the plan's lend_idle_threads (hpipe/lending.py)

    @property
    def prompt_len(self) -> int:
        return sum(self.slices)

    @property
    def num_devices(self) -> int:
        return sum(self.groups) if self.groups else len(self.layers)


def prompt_for(case: Case, spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    """Seeded random ids, avoiding the specials at the bottom of the vocabulary."""
    rng = random.Random(f"{case.name}-{spec.vocab_size}")
    return tuple(tuple(rng.randrange(3, spec.vocab_size) for _ in range(case.prompt_len))
                 for _ in range(case.batch))


def plan_for(case: Case, spec: ModelSpec, cluster: ClusterSpec) -> Plan:
    stages, start, device = [], 0, 0
    for i, n in enumerate(case.layers):
        size = case.groups[i] if case.groups else 1
        stages.append(StagePlan(tuple(range(device, device + size)), start, start + n))
        start, device = start + n, device + size
    return Plan(method=case.method, model=spec, cluster=cluster, batch=case.batch,
                seq_len=case.prompt_len, dtype="float32", stages=tuple(stages),
                slices=case.slices, num_microbatches=case.num_microbatches,
                lend_idle_threads=case.lend)


def request_for(case: Case, path: Path | str, spec: ModelSpec, num_workers: int,
                *, cluster: ClusterSpec | None = None) -> RunRequest:
    cluster = cluster or local_cluster(num_workers)
    req = RunRequest(model=str(path), plan=plan_for(case, spec, cluster),
                     prompt_ids=prompt_for(case, spec), max_new_tokens=case.max_new_tokens,
                     temperature=case.temperature, top_p=case.top_p, seed=case.seed,
                     eos_token_ids=_eos(case, spec), label=case.name)
    check_request(req, spec)
    return req


def launch_cases(cases: list[Case], paths: dict[str, Path | str], specs: dict[str, ModelSpec],
                 num_workers: int) -> dict[str, RunResult]:
    """Run every case on ``num_workers`` local workers in a single launch."""
    reqs = [request_for(c, paths[c.model], specs[c.model], num_workers) for c in cases]
    results = launch_local(reqs, world_size=num_workers)
    return {r.label: r for r in results}


def launch_on_own_clusters(cases: list[Case], paths: dict[str, Path | str],
                           specs: dict[str, ModelSpec]) -> dict[str, RunResult]:
    """Run every case on a ``local:N`` cluster of its own device count, all in ONE launch of as
    many workers as the largest needs (a rank that a case does not use sits it out)."""
    reqs = [request_for(c, paths[c.model], specs[c.model], c.num_devices) for c in cases]
    results = launch_local(reqs)
    return {r.label: r for r in results}


def reference(case: Case, model, spec: ModelSpec) -> GenerationResult:
    """The single-process run of the same case (same slices, same sampler settings)."""
    sampler = Sampler(temperature=case.temperature, top_p=case.top_p, seed=case.seed)
    return generate(model, [list(r) for r in prompt_for(case, spec)],
                    max_new_tokens=case.max_new_tokens, slices=case.slices, sampler=sampler,
                    eos_token_ids=_eos(case, spec))


def _eos(case: Case, spec: ModelSpec) -> tuple[int, ...]:
    return spec.eos_token_ids if case.eos_token_ids is None else case.eos_token_ids


def with_eos_at(case: Case, model, spec: ModelSpec, *, step: int) -> Case:
    """``case`` with EOS set to the token row 0 produces at decode ``step`` (found by a
    reference run without EOS), so decoding must stop there: the early-stop path."""
    free = reference(dataclasses.replace(case, eos_token_ids=()), model, spec)
    return dataclasses.replace(case, eos_token_ids=(free.output_ids[0][step],))


def assert_equivalent(result: RunResult, ref: GenerationResult) -> None:
    diff = (result.prefill_logits - ref.prefill_logits).abs().max().item()
    assert result.prefill_logits.shape == ref.prefill_logits.shape, (
        result.prefill_logits.shape, ref.prefill_logits.shape)
    assert diff <= LOGITS_ATOL, f"{result.label}: max |logits - reference| = {diff:.3g}"
    assert result.output_ids == ref.output_ids, (
        f"{result.label}: pipeline {result.output_ids} != reference {ref.output_ids}")
    assert torch.isfinite(result.prefill_logits).all()


def assert_stopped_early(result: RunResult, ref: GenerationResult, case) -> None:
    """An early-EOS case: outputs equal the reference and row 0 was cut before max_new_tokens;
    a batch of one also ran no decode step past its EOS."""
    assert_equivalent(result, ref)
    assert len(result.output_ids[0]) < case.max_new_tokens
    if case.batch == 1:
        assert result.num_decode_steps == len(ref.output_ids[0]) < case.max_new_tokens - 1


def slow_cluster(num_workers: int, slowdown: float = 1.0) -> ClusterSpec:
    """``num_workers`` local CPU workers, each emulated ``slowdown`` x slower: a tiny model's
    request then lasts seconds, long enough to signal, cancel or queue behind."""
    return parse_cluster({"name": "slow" if slowdown > 1 else f"local:{num_workers}",
                          "hosts": [{"name": "local", "intra_link": "loopback",
                                     "devices": [{"name": f"cpu{i}", "type": "cpu",
                                                  "slowdown": slowdown}
                                                 for i in range(num_workers)]}]})


def write_slow_cluster(path: Path, slowdown: float, num_workers: int = 2) -> Path:
    """``slow_cluster`` as a cluster file, for CLI tests."""
    import yaml

    path.write_text(yaml.safe_dump(slow_cluster(num_workers, slowdown).to_dict()))
    return path


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (its workers, and multiprocessing's resource tracker)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(kids)


def all_gone(pids: list[int], timeout_s: float = 10) -> bool:
    """Whether every process in ``pids`` has ended (or is a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
