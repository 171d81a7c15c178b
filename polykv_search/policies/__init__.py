"""Eviction policies: registered names for kvpress scorers, each giving a budget-independent token ranking."""

from polykv_search.policies.registry import (
    DEFAULT_POLICIES,
    POLICIES,
    PolicySpec,
    check_policy_names,
    make_press,
    rank_scores,
)

__all__ = ["DEFAULT_POLICIES", "POLICIES", "PolicySpec", "check_policy_names", "make_press", "rank_scores"]
