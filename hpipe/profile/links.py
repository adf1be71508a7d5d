"""Link profiling: ping-pong between two ranks over a few message sizes -> latency and bandwidth.

Run on both ends of a link inside an initialised ``torch.distributed`` group (the same gloo
transport the runtime sends activations over, so the figures are the runtime's, not a raw
socket's). One-way time = half the median round trip; ``fit_link`` turns the sizes into
t = latency + bytes / bandwidth.

Also a script, for a link the runtime is not up for (the netns test uses it):
    python -m hpipe.profile.links --master-addr A --master-port P --rank R --world-size 2
rank 0 prints the samples and the fit as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from hpipe.cost.profile_file import LinkSample

# 4 KiB pins the latency; 1 and 8 MiB are the size of real activations (a 512-token slice of
# a 576-wide fp32 model is 1.2 MB; 2048 tokens of LLaMA-7B in fp16 are 16 MB). The largest size
# must take well above the latency floor, or the slope is noise: on a loaded 2-core box gloo's
# loopback showed a ~2 ms floor for 4 KiB to 4 MiB alike, and the quick fit said 200 Gbit/s.
# 16 MiB moves in ~8 ms at loopback's ~2 GB/s.
SIZES_BYTES = (4 << 10, 256 << 10, 1 << 20, 8 << 20, 16 << 20)
QUICK_SIZES_BYTES = (4 << 10, 1 << 20, 16 << 20)


def measure_link(peer: int, *, initiator: bool, sizes_bytes: Sequence[int] = SIZES_BYTES,
                 repeats: int = 5, warmup: int = 2, group=None) -> tuple[LinkSample, ...]:
    """Ping-pong with rank ``peer``; both ends call this with opposite ``initiator``.

    Only the initiator's clock is used (it sees the whole round trip); the responder returns
    an empty tuple. Times are the median of ``repeats`` after ``warmup`` untimed rounds
    (the first messages of a gloo pair pay for connection set-up).
    """
    import torch
    import torch.distributed as dist

    out = []
    for size in sizes_bytes:
        buf = torch.zeros(max(1, size // 4), dtype=torch.float32)
        rtts = []
        for r in range(warmup + repeats):
            if initiator:
                t0 = time.perf_counter()
                dist.send(buf, peer, group=group)
                dist.recv(buf, peer, group=group)
                if r >= warmup:
                    rtts.append(time.perf_counter() - t0)
            else:
                dist.recv(buf, peer, group=group)
                dist.send(buf, peer, group=group)
        if initiator:
            out.append(LinkSample(num_bytes=buf.numel() * 4, time_s=statistics.median(rtts) / 2))
    return tuple(out)


def fit_link(samples: Sequence[LinkSample]) -> tuple[float, float]:
    """(latency_s, bandwidth_bytes_s) for t = latency + bytes / bandwidth.

    Bandwidth is the slope over the messages of >= 256 KiB (all of them when fewer than two
    are that large); latency is the smallest message's one-way time. Not one least-squares line
    through everything: a tbf-shaped link lets a message inside its burst through at wire speed,
    so small messages beat the line and a joint fit returns latency 0 (seen on a 200 Mbit veth).
    """
    big = [s for s in samples if s.num_bytes >= 256 << 10]
    if len(big) < 2:
        big = list(samples)
    x = np.array([[1.0, s.num_bytes] for s in big])
    y = np.array([s.time_s for s in big])
    from hpipe.cost.fitted import fit_nonnegative

    _, inv_bw = fit_nonnegative(x, y, relative=False)
    if inv_bw <= 0:  # every size took the same time: bandwidth beyond what we can see
        inv_bw = 1e-12
    smallest = min(samples, key=lambda s: s.num_bytes)
    return float(smallest.time_s), float(1.0 / inv_bw)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpipe.profile.links")
    ap.add_argument("--master-addr", required=True)
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="*", default=list(QUICK_SIZES_BYTES))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{args.master_addr}:{args.master_port}",
                            rank=args.rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        samples = measure_link(1 - args.rank if args.world_size == 2 else (args.rank + 1) % 2,
                               initiator=args.rank == 0, sizes_bytes=args.sizes,
                               repeats=args.repeats)
        if args.rank == 0:
            lat, bw = fit_link(samples)
            print(json.dumps({"samples": [[s.num_bytes, s.time_s] for s in samples],
                              "latency_s": lat, "bandwidth_bytes_s": bw}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
