"""Device and link catalog: public spec-sheet figures for the analytic cost model.

Peak FLOP/s are dense (no sparsity). "fp16" is what PyTorch gets for fp16/bf16 matmuls with
fp32 accumulation, which halves the headline tensor rate on GeForce cards (RTX 3090: 71 TFLOP/s
with fp16 accumulate, 35.6 with fp32 accumulate). Idle powers are rough figures from
nvidia-smi readings reported for idle cards; the spec sheets give only board power.
A profile (``hpipe profile``) replaces all of these with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class DeviceKind:
    memory_gib: float
    fp16_tflops: float
    fp32_tflops: float
    mem_bandwidth_gbs: float  # GB/s
    busy_power_w: float
    idle_power_w: float
    source: str

    def as_fields(self) -> dict:
        return {
            "memory_bytes": int(self.memory_gib * GIB),
            "peak_flops_fp16": self.fp16_tflops * 1e12,
            "peak_flops_fp32": self.fp32_tflops * 1e12,
            "mem_bandwidth_bytes_s": self.mem_bandwidth_gbs * 1e9,
            "busy_power_w": self.busy_power_w,
            "idle_power_w": self.idle_power_w,
        }


DEVICE_CATALOG: dict[str, DeviceKind] = {
    # One core of a desktop x86 CPU with AVX2 FMA (2 x 8 fp32 FMA/cycle at ~3 GHz = 96 GFLOP/s
    # peak); no fast fp16 path, so fp16 = fp32. Memory: what a worker may use on a 24 GiB box.
    "cpu": DeviceKind(8, 0.096, 0.096, 20, 30, 5, "x86 core with AVX2 FMA, 2 FMA units"),
    # NVIDIA Tesla P100 PCIe 16 GB datasheet: 18.7 TF fp16, 9.3 TF fp32, 732 GB/s, 250 W.
    "p100": DeviceKind(16, 18.7, 9.3, 732, 250, 30, "NVIDIA Tesla P100 PCIe datasheet"),
    # NVIDIA V100 PCIe 32 GB datasheet: 112 TF tensor, 14 TF fp32, 900 GB/s, 250 W.
    "v100": DeviceKind(32, 112, 14, 900, 250, 35, "NVIDIA V100 PCIe datasheet"),
    # NVIDIA T4 datasheet: 65 TF fp16 tensor, 8.1 TF fp32, 320 GB/s, 70 W.
    "t4": DeviceKind(16, 65, 8.1, 320, 70, 10, "NVIDIA T4 datasheet"),
    # GeForce RTX 3090 (Ampere GA102 whitepaper): 35.6 TF fp16 tensor w/ fp32 acc, 35.6 TF fp32,
    # 936 GB/s, 350 W.
    "rtx3090": DeviceKind(24, 35.6, 35.6, 936, 350, 30, "NVIDIA Ampere GA102 whitepaper"),
    # GeForce RTX 4090 (Ada whitepaper): 165.2 TF fp16 tensor w/ fp32 acc, 82.6 TF fp32,
    # 1008 GB/s, 450 W.
    "rtx4090": DeviceKind(24, 165.2, 82.6, 1008, 450, 25, "NVIDIA Ada Lovelace whitepaper"),
    # NVIDIA A10 datasheet: 125 TF fp16 tensor, 31.2 TF fp32, 600 GB/s, 150 W.
    "a10": DeviceKind(24, 125, 31.2, 600, 150, 20, "NVIDIA A10 datasheet"),
    # NVIDIA A100 80 GB SXM datasheet: 312 TF bf16, 19.5 TF fp32, 2039 GB/s, 400 W.
    "a100": DeviceKind(80, 312, 19.5, 2039, 400, 55, "NVIDIA A100 datasheet (80GB SXM)"),
    # NVIDIA H100 SXM datasheet: 989 TF bf16 dense, 67 TF fp32, 3350 GB/s, 700 W.
    "h100": DeviceKind(80, 989, 67, 3350, 700, 70, "NVIDIA H100 datasheet (SXM)"),
}


@dataclass(frozen=True)
class LinkKind:
    bandwidth_gbps: float  # Gbit/s achievable, not the line rate
    latency_s: float
    source: str


LINK_CATALOG: dict[str, LinkKind] = {
    # PCIe 3.0 x16: 15.75 GB/s line rate, ~12 GB/s achieved by cudaMemcpy peer copies.
    "pcie3": LinkKind(12 * 8, 10e-6, "PCIe 3.0 x16, ~12 GB/s achieved"),
    # PCIe 4.0 x16: 31.5 GB/s line rate, ~24 GB/s achieved.
    "pcie4": LinkKind(24 * 8, 10e-6, "PCIe 4.0 x16, ~24 GB/s achieved"),
    # NVLink 3 (A100): 600 GB/s total over 12 links (25 GB/s per direction each); a GPU pair
    # talking through NVSwitch gets ~100 GB/s one way in practice, which is what we use.
    "nvlink": LinkKind(100 * 8, 5e-6, "NVLink 3, one pair's share"),
    # 1 GbE: 1000 Mbit/s line rate, ~940 Mbit/s TCP goodput; ~100 us per message through the stack.
    "1gbe": LinkKind(0.94, 100e-6, "1 Gbit Ethernet, TCP goodput"),
    # 10 GbE: ~9.4 Gbit/s goodput, ~30 us.
    "10gbe": LinkKind(9.4, 30e-6, "10 Gbit Ethernet, TCP goodput"),
    # Two processes on one machine over gloo's TCP loopback; a profile measures the real figure.
    "loopback": LinkKind(16, 50e-6, "gloo over TCP loopback, rough"),
}
