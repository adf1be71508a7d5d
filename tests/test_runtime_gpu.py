"""GPU pipelines, skipped on CPU-only machines: a truly heterogeneous CPU + GPU pipeline (gloo,
CUDA activations staged through host memory) and an all-GPU pipeline (NCCL), each equal to the
single-process CPU reference through the shared harness."""

from __future__ import annotations

import pytest
import torch
from runtime_harness import Case, assert_equivalent, reference, request_for

from hpipe.cluster import parse_cluster
from hpipe.runtime import launch_local

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CASE = Case("gpu", "llama", layers=(2, 2), slices=(6, 4, 2), batch=2)


def _cluster(torch_devices: tuple[str, ...]):
    return parse_cluster({"name": "gpu-test", "hosts": [{
        "name": "local", "intra_link": "pcie4",
        "devices": [{"name": f"d{i}", "type": "cpu", "torch_device": d}
                    for i, d in enumerate(torch_devices)]}]})


def _run_and_check(torch_devices, tiny_checkpoints) -> None:
    from hpipe.model.source import open_model

    path = tiny_checkpoints["llama"]
    src = open_model(path)
    req = request_for(CASE, path, src.spec, len(torch_devices), cluster=_cluster(torch_devices))
    [result] = launch_local([req], world_size=len(torch_devices))
    # float32 on both sides (TF32 is off for matmuls by default), so the CPU tolerance holds.
    assert_equivalent(result, reference(CASE, src.load_model(), src.spec))


@pytest.mark.parametrize("torch_devices", [("cuda:0", "cpu"), ("cpu", "cuda:0")])
def test_cpu_plus_gpu_pipeline_equals_reference(torch_devices, tiny_checkpoints):
    _run_and_check(torch_devices, tiny_checkpoints)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_all_gpu_pipeline_over_nccl_equals_reference(tiny_checkpoints):
    _run_and_check(("cuda:0", "cuda:1"), tiny_checkpoints)
