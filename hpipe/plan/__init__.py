"""Planning: the Plan type, the workload and slicing DPs, the baselines, and brute-force oracles."""

from hpipe.plan.plan import METHODS, Plan, StagePlan

__all__ = ["METHODS", "Plan", "StagePlan"]
