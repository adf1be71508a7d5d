"""The options ``plan`` and ``simulate`` share, how they become a model spec and a cost model, and
the output-path check of the commands that write files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hpipe.cost import cost_model
from hpipe.errors import OutputPathError, PromptError
from hpipe.spec import DTYPES, ModelSpec, model_preset


def add_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default="paper", help="'paper', 'local:N' or a cluster YAML file")
    p.add_argument("--model", default="llama-7b",
                   help="model preset name, HF model dir / config.json, or .gguf file")
    p.add_argument("--seq-len", type=in_range(int, 1), default=2048,
                   help="prompt tokens per sequence")
    p.add_argument("--batch", type=in_range(int, 1), default=6, help="sequences per batch")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: the --profile's dtype, else float16")
    p.add_argument("--grain-tokens", type=in_range(int, 1), default=None,
                   help="slicing grid in tokens (default 16, coarser past 4k tokens)")
    p.add_argument("--no-tp", dest="allow_tp", action="store_false",
                   help="keep HPipe to pure pipelines (one device per stage); by default its "
                        "search also tries tensor-parallel pairs inside a host")
    add_profile_argument(p)
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"),
                   help="the attention kernel whose memory counts: 'sdpa' (hpipe's runtime, "
                        "no score tensor) or 'eager' (HF eager attention, as the paper's "
                        "systems ran; Base then runs out of memory where the paper says)")


def add_profile_argument(parser) -> None:
    """``--profile FILE`` for plan / simulate / run, one spelling everywhere."""
    parser.add_argument(
        "--profile", metavar="FILE", default=None,
        help="a profile from 'hpipe profile': plan with measured device and link costs "
             "instead of the analytic catalog figures",
    )


def add_calibration_argument(parser) -> None:
    """``--no-calibration`` / ``--recalibrate`` for run / demo (see hpipe/profile/quick.py)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--no-calibration", action="store_true",
        help="without --profile, plan from the catalog's figures instead of a quick "
             "calibration of this machine's workers (measured once, a few seconds, then cached; "
             "HPIPE_CALIBRATION=off does the same)",
    )
    group.add_argument(
        "--recalibrate", action="store_true",
        help="measure the quick calibration again and replace the cached one, e.g. when it "
             "was taken while the machine was busy (HPIPE_CALIBRATION=refresh does the same)",
    )


def prepare_output(path: Path | None, flag: str) -> None:
    """Create the folder of an output file before the work that fills it, so a path that cannot
    be written fails now rather than after a run or a profile whose results it would lose."""
    if path is None:
        return
    if path.is_dir():
        raise OutputPathError(f"{flag} {str(path)!r} is a directory; give a file name in it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{flag} {str(path)!r}: cannot create its folder "
                              f"{str(path.parent)!r} ({e.strerror or e})") from None
    _probe_writable(path.parent, f"{flag} {str(path)!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{flag} {str(path)!r} exists and is not writable; give another "
                              "path or change its permissions")


def prepare_output_dir(path: Path, flag: str) -> None:
    """An output folder, created now and checked writable before the work that fills it."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {str(path)!r} exists and is not a directory; give a "
                              "directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{flag} {str(path)!r}: cannot create it ({e.strerror or e}); "
                              "give a folder you can write") from None
    _probe_writable(path, f"{flag} {str(path)!r}")


def _probe_writable(folder: Path, what: str) -> None:
    """Write and remove a file in ``folder``: permission bits do not tell (root passes every
    check, and /proc or a read-only mount refuse files anyway)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hpipe-probe-"):
            pass
    except OSError as e:
        raise OutputPathError(f"{what}: cannot write in the folder {str(folder)!r} "
                              f"({e.strerror or e}); give a folder you can write") from None


def read_prompt_file(path: Path) -> str:
    """--prompt-file's text (UTF-8), refused by name when it is not a readable text file."""
    if not path.is_file():
        raise PromptError(f"--prompt-file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"--prompt-file {str(path)!r} is not UTF-8 text (byte {e.start}: "
                          f"{e.reason}); convert it, or pass token ids with --prompt-ids") from None
    except OSError as e:
        raise PromptError(f"--prompt-file {str(path)!r}: {e.strerror or e}") from None
    if not text.strip():
        raise PromptError(f"--prompt-file {str(path)!r} is empty; give a file with the prompt's "
                          "text")
    return text


def in_range(kind: type, lo: float | None = None, hi: float | None = None, *,
             above: bool = False):
    """argparse type: ``kind`` (int or float) within [lo, hi] (lo excluded when ``above``),
    refused with the range. Every numeric flag has one."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        low_bad = lo is not None and (value <= lo if above else value < lo)
        if low_bad or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                want = f"in {'(' if above else '['}{lo:g}, {hi:g}]"
            elif lo is not None:
                want = f"{'>' if above else '>='} {lo:g}"
            else:
                want = f"<= {hi:g}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    return parse


def positive(kind: type):
    """argparse type: a ``kind`` > 0."""
    return in_range(kind, 0, above=True)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for comma-separated integers (--layers, --slices, --prompt-ids)."""
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 8,8,4,4,4,4") from None


def resolve_dtype(args) -> str:
    """--dtype if given, else the profile's (so a profile plans as measured), else float16."""
    if getattr(args, "dtype", None):
        return args.dtype
    if getattr(args, "profile", None):
        from hpipe.cost import read_profile

        return read_profile(args.profile).dtype
    return "float16"


def load_model_spec(arg: str) -> ModelSpec:
    """A preset name, a bundled model ('smollm2'), an HF model directory / config.json, or a
    GGUF file (metadata only)."""
    from hpipe.model.source import BUNDLED_MODELS

    path = Path(arg)
    if arg in BUNDLED_MODELS:
        from hpipe.model.source import open_model

        return open_model(arg).spec
    if not path.exists():
        return model_preset(arg)  # raises UnknownPresetError listing the presets
    if path.suffix == ".gguf":
        from hpipe.model.source import open_model

        return open_model(path).spec
    from hpipe.model.config import spec_from_hf_config

    return spec_from_hf_config(path)


def load_settings(args):
    """(cluster, model spec, cost model) from the shared options; resolves ``args.dtype``."""
    from hpipe.cluster import load_cluster

    args.dtype = resolve_dtype(args)
    cluster = load_cluster(args.cluster)
    model = load_model_spec(args.model)
    return cluster, model, cost_model(model, cluster, args.dtype, profile=args.profile,
                                      attention=getattr(args, "attention", "sdpa"))
