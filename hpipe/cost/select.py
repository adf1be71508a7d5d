"""Which cost model to use: decided here, once, for every command, planner and report."""

from __future__ import annotations

from pathlib import Path

from hpipe.cluster import ClusterSpec
from hpipe.cost.base import CostModel
from hpipe.cost.profile_file import Profile, read_profile
from hpipe.spec import ModelSpec


def cost_model(model: ModelSpec, cluster: ClusterSpec, dtype: str, *,
               profile: str | Path | Profile | None = None,
               attention: str = "sdpa") -> CostModel:
    """The model fitted to ``profile`` (a file from ``hpipe profile``, or one already read)
    when given, else the analytic roofline from the catalog's spec-sheet figures.

    A profile of another model, dtype or cluster raises ProfileMismatchError naming the
    difference. ``attention``: the kernel whose workspace the analytic model charges
    ("sdpa", hpipe's runtime; "eager", the paper's systems); a profile measured the runtime's.
    """
    if profile is None or profile == "":
        from hpipe.cost.analytic import AnalyticCost

        return AnalyticCost(model, cluster, dtype, attention=attention)
    from hpipe.cost.fitted import FittedCost

    prof = profile if isinstance(profile, Profile) else read_profile(profile)
    return FittedCost(prof, model, cluster, dtype)
