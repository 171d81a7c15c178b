"""Eviction policies: registered names for kvpress scorers, each giving a budget-independent token ranking.

This package's namespace is the table alone (`catalog`: no torch, no kvpress), so a plan file can be checked
anywhere; the presses, rankings and scoring that run a policy are in `presses` and `scoring`.
"""

from polykv_search.policies.catalog import (
    DEFAULT_POLICIES,
    N_SINK_RECENT,
    PER_HEAD_POLICIES,
    PER_HEAD_POLICY_SETS,
    POLICIES,
    REFUSED,
    PolicySpec,
    check_policy_names,
    params_problems,
    policy_params,
    scorer_key,
)

__all__ = ["DEFAULT_POLICIES", "N_SINK_RECENT", "PER_HEAD_POLICIES", "PER_HEAD_POLICY_SETS", "POLICIES", "PolicySpec",
           "REFUSED", "check_policy_names", "params_problems", "policy_params", "scorer_key"]
