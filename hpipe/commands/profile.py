"""``hpipe profile``: measure every device and link of a cluster for a model -> profile.json.

    hpipe profile --model PATH|smollm2|PRESET --cluster local:N|FILE --out profile.json [--quick]

Runs one worker per device, as ``hpipe run`` does (or, under torchrun, is one of them), times a
real stage of the model over a (batch, slice, prefix) grid, ping-pongs every pair of devices,
and writes the samples. ``hpipe plan/simulate/run --profile profile.json`` then plan with the
fitted model (``hpipe.cost.fitted``). A PRESET (e.g. llama-7b) is profiled on random weights
written to a temporary directory: a layer's time does not depend on its weights' values.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from hpipe.commands.settings import in_range, prepare_output
from hpipe.errors import OutputPathError
from hpipe.profile import MIN_PROFILE_TOKENS
from hpipe.spec import DTYPES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure devices and links -> profile.json",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, .gguf file, 'smollm2' or a preset")
    p.add_argument("--cluster", required=True, help="'local:N' or a cluster YAML file")
    p.add_argument("--out", type=Path, required=True, help="profile file to write")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    # --seq-len and --batch are what plan/simulate/run call the same quantities.
    p.add_argument("--max-tokens", "--seq-len", dest="max_tokens",
                   type=in_range(int, MIN_PROFILE_TOKENS), default=None,
                   help="longest prompt to plan for: the grid spans it (default 2048, 1024 quick)")
    p.add_argument("--max-batch", "--batch", dest="max_batch", type=in_range(int, 1), default=2,
                   help="largest batch in the grid")
    p.add_argument("--quick", action="store_true",
                   help="a small grid and fewer repeats: under a minute for a small model")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip the calibration run (one real pipelined prefill after the grid, "
                        "whose measured/predicted compute ratio per device corrects the fit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (per device: layer time and fit error; per link: "
                        "bandwidth and latency) instead of text")
    p.set_defaults(func=run)
    return p


@contextlib.contextmanager
def _model_path(arg: str):
    """A path open_model reads: the argument itself, or random weights for a preset."""
    if Path(arg).exists() or arg == "smollm2":
        yield arg
        return
    from hpipe.spec import model_preset

    spec = model_preset(arg)  # UnknownPresetError lists the presets
    from hpipe.profile.random_model import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="hpipe-profile-") as tmp:
        yield str(write_random_checkpoint(spec, Path(tmp), max_layers=2))


def run(args: argparse.Namespace) -> int:
    from hpipe.cluster import load_cluster
    from hpipe.cost.fitted import fit_device
    from hpipe.profile.launch import make_job, profile_local, profile_torchrun
    from hpipe.profile.measure import default_grid
    from hpipe.runtime.launch import torchrun_env

    prepare_output(args.out, "--out")  # before minutes of profiling, not after
    cluster = load_cluster(args.cluster)
    max_tokens = args.max_tokens or (1024 if args.quick else 2048)
    grid = default_grid(max_tokens, quick=args.quick, max_batch=args.max_batch)
    bars: dict = {}

    def on_progress(what: str, done: int, total: int) -> None:
        if args.no_progress or not sys.stderr.isatty():  # bars only for a person watching
            return
        from tqdm import tqdm

        if what not in bars:
            label = what
            dev = next((d for d in cluster.devices if d.name == what), None)
            if dev is not None and dev.emulated:
                label += f" (emulated x{dev.slowdown:g})"
            bars[what] = tqdm(total=total, desc=label, unit="pt" if dev else "pair",
                              file=sys.stderr, leave=True)
        bar = bars[what]
        bar.update(done - bar.n)

    try:
        with _model_path(args.model) as model_path:
            # A preset is profiled on a two-layer random twin: nothing to run a pipeline on.
            calibrate = not args.no_calibrate and model_path == args.model
            job = make_job(model_path, cluster, args.dtype, grid, quick=args.quick,
                           calibrate=calibrate)
            env = torchrun_env()
            profile = (profile_torchrun(job, env, on_progress) if env
                       else profile_local(job, on_progress=on_progress))
    finally:
        for bar in bars.values():
            bar.close()
    if profile is None:  # a torchrun rank other than 0
        return 0
    if Path(args.model).exists() is False and args.model != "smollm2":
        # Name the preset, not the temporary directory, so --profile matches --model PRESET.
        import dataclasses

        profile = dataclasses.replace(profile, model_name=args.model)
    try:
        args.out.write_text(profile.to_json())
    except OSError as e:  # checked writable at the start, but a disk can fill meanwhile
        import tempfile

        fd, spare = tempfile.mkstemp(prefix="hpipe-profile-", suffix=".json")
        with open(fd, "w") as f:
            f.write(profile.to_json())
        raise OutputPathError(f"--out {str(args.out)!r}: could not write the profile "
                              f"({e.strerror or e}); it was saved to {spare} instead") from None
    fits = {dev.name: fit_device(dev) for dev in profile.devices}
    if args.json:
        import json

        print(json.dumps(summary_json(profile, cluster, fits, args.out), indent=1))
    else:
        print(summary_text(profile, cluster, grid, fits, args))
    return 0


def summary_json(profile, cluster, fits, out: Path) -> dict:
    """Per device: layer time and fit error; per link: bandwidth and latency."""
    cal = profile.calibration
    scale = dict(zip(profile.device_names, cal.compute_scale)) if cal else {}
    return {
        "out": str(out), "model": profile.model_name, "dtype": profile.dtype,
        "cluster": cluster.name, "emulated": profile.emulated,
        "devices": [{"name": d.name, "kind": d.kind, "slowdown": d.slowdown,
                     "layer_fit_rel_error_max": fits[d.name].layer_rel_error_max,
                     "calibration_compute_scale": scale.get(d.name),
                     "lent_threads": d.lent_threads,
                     "lent_speedup_by_tokens": {str(t): r for t, r in d.lent_speedups()}}
                    for d in profile.devices],
        "calibration": None if cal is None else cal.to_dict(),
        "links": [{"src": lk.src, "dst": lk.dst,
                   "bandwidth_gbps": lk.bandwidth_bytes_s * 8 / 1e9,
                   "latency_s": lk.latency_s} for lk in profile.links],
    }


def summary_text(profile, cluster, grid, fits, args) -> str:
    cal = profile.calibration
    scale = dict(zip(profile.device_names, cal.compute_scale)) if cal else {}
    lines = [f"profiled {profile.model_name} ({profile.dtype}) on {cluster.name!r}: "
             f"{len(grid.points())} grid points per device, {len(profile.links)} links"
             + ("  [EMULATED devices: times include the slowdown sleep]"
                if profile.emulated else "")]
    for dev in profile.devices:
        fit = fits[dev.name]
        one = next(s for s in dev.layer if s.rows == 1 and s.prefix == 0)
        lines.append(
            f"  {dev.name:<10} {dev.kind:<6} x{dev.slowdown:<4g} layer {one.time_s * 1e3:7.2f} "
            f"ms @ {one.tokens} tokens; fit worst error {fit.layer_rel_error_max:.0%}"
            + (f"; in a pipeline x{scale[dev.name]:.2f}" if dev.name in scale else "")
            + ("; alone on {} threads {}".format(dev.lent_threads, ", ".join(
                f"{r:.2f}x @ {t}" for t, r in dev.lent_speedups()))
               if dev.lent_speedups() else "")
            + ("  (emulated)" if dev.slowdown != 1.0 else ""))
    for lk in profile.links:
        lines.append(f"  {lk.src} <-> {lk.dst}: {lk.bandwidth_bytes_s * 8 / 1e9:.2f} Gbit/s, "
                     f"latency {lk.latency_s * 1e6:.0f} us")
    if cal is not None:
        lines.append(
            f"  calibration: layers {list(cal.layer_counts)}, {len(cal.slices)} equal slices "
            f"of {sum(cal.slices)} tokens: measured {cal.measured_latency_s:.3f} s, the grid "
            f"fit predicted {cal.predicted_latency_s:.3f} s; each device's compute is scaled "
            "by its own ratio")
    elif not args.no_calibrate:
        lines.append("  calibration: not run (a preset's random twin, or the even split did "
                     "not fit); predictions are the grid fit alone")
    lines.append(f"wrote {args.out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m hpipe.commands.profile ...``: the command without the hpipe front door, for
    ``torchrun -m`` (one rank per device on emulated or real hosts)."""
    ap = argparse.ArgumentParser(prog="hpipe")
    add_parser(ap.add_subparsers())
    args = ap.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)])
    args.command = "profile"
    from hpipe.commands.contract import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
