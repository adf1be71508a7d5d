"""``hpipe experiment paper --out DIR``: reproduce every table and figure of the paper's section 4.

Writes tables (markdown), figures (PNG), Chrome traces, summary.json and report.md under DIR,
shows a progress bar on stderr, and prints HPipe's ratios against Base, GPipe and TeraPipe
beside the paper's, and HPipe's latency against the FLOP lower bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("experiment", help="reproduce the paper's experiments",
                              description=__doc__)
    p.add_argument("which", choices=("paper",), help="which experiment set to run")
    p.add_argument("--out", type=Path, required=True, help="directory for tables and figures")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hpipe.commands.settings import prepare_output_dir
    from hpipe.experiment import PaperExperiment
    from hpipe.report.markdown import headline_lines

    prepare_output_dir(args.out, "--out")  # before minutes of work, not after
    exp = PaperExperiment(out_dir=args.out)
    steps = exp.steps()
    with tqdm(steps, desc="experiment paper", unit="step", file=sys.stderr,
              disable=args.no_progress or not sys.stderr.isatty()) as bar:
        for name, step in bar:
            bar.set_postfix_str(name)
            step()
    summary = exp.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print("\n".join(headline_lines(summary)))
    print(f"\nwrote {len(summary['files'])} files to {args.out} (start with report.md)")
    return 0
