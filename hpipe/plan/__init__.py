"""Planning: the Plan type, the workload and slicing DPs, the baselines, and brute-force oracles."""

from hpipe.plan.plan import Plan, StagePlan
from hpipe.spec import METHODS

__all__ = ["METHODS", "Plan", "StagePlan"]
