"""Profiling: measure devices and links (``measure``, ``links``), store them (``profile_file``).

This package is where hpipe touches hardware to learn costs; the fit itself is pure and lives
in ``hpipe.cost.fitted``. Importing the package is cheap (no torch): ``load_cost`` is what
plan / simulate / run call for ``--profile``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpipe.profile.profile_file import Profile, check_profile, read_profile

if TYPE_CHECKING:
    from hpipe.cluster import ClusterSpec
    from hpipe.cost.base import CostModel
    from hpipe.spec import ModelSpec


def load_cost(args, model: ModelSpec, cluster: ClusterSpec, dtype: str) -> CostModel | None:
    """The fitted cost model from ``args.profile`` when given, else None (use the analytic one).

    For the CLI commands that take ``--profile profile.json``: a profile of another model,
    dtype or cluster raises ProfileMismatchError naming the difference.
    """
    path = getattr(args, "profile", None)
    if not path:
        return None
    from hpipe.cost.fitted import FittedCost

    return FittedCost(read_profile(path), model, cluster, dtype)


def add_profile_argument(parser) -> None:
    """``--profile FILE`` for plan / simulate / run, one spelling everywhere."""
    parser.add_argument(
        "--profile", metavar="FILE", default=None,
        help="a profile from 'hpipe profile': plan with measured device and link costs "
             "instead of the analytic catalog figures",
    )


__all__ = ["Profile", "add_profile_argument", "check_profile", "load_cost", "read_profile"]
