"""The options ``plan`` and ``simulate`` share, and how they become a model spec and a cost model."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpipe.plan.plan import DTYPES
from hpipe.profile import add_profile_argument, load_cost
from hpipe.spec import ModelSpec, model_preset


def add_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default="paper", help="'paper', 'local:N' or a cluster YAML file")
    p.add_argument("--model", default="llama-7b",
                   help="model preset name, HF model dir / config.json, or .gguf file")
    p.add_argument("--seq-len", type=int, default=2048, help="prompt tokens per sequence")
    p.add_argument("--batch", type=int, default=6, help="sequences per batch")
    p.add_argument("--dtype", default="float16", choices=DTYPES)
    p.add_argument("--grain-tokens", type=int, default=None,
                   help="slicing grid in tokens (default 16, coarser past 4k tokens)")
    add_profile_argument(p)


def load_model_spec(arg: str) -> ModelSpec:
    """A preset name, an HF model directory / config.json, or a GGUF file (metadata only)."""
    path = Path(arg)
    if not path.exists():
        return model_preset(arg)  # raises UnknownPresetError listing the presets
    if path.suffix == ".gguf":
        from hpipe.model.source import open_model

        return open_model(path).spec
    from hpipe.model.config import spec_from_hf_config

    return spec_from_hf_config(path)


def cost_model(args, model: ModelSpec, cluster, dtype: str):
    """The fitted model from ``--profile`` when given, else the analytic roofline."""
    from hpipe.cost.analytic import AnalyticCost

    return load_cost(args, model, cluster, dtype) or AnalyticCost(model, cluster, dtype)
