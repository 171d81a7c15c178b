"""Which calibrate mode measures each profile cost: `run --cost X` calibrates with the mode X needs, on the grid
and with the policies that cost's plans default to (per KV head: PER_HEAD_POLICIES on HEAD_BUDGETS)."""

from __future__ import annotations

from collections.abc import Sequence

from polykv_search.calibration.budgets import HEAD_BUDGETS
from polykv_search.calibration.profile import AROUND_KL, HEAD_FISHER, HEAD_KL
from polykv_search.calibration.run import CalibrationConfig
from polykv_search.errors import ConfigError
from polykv_search.policies import DEFAULT_POLICIES, PER_HEAD_POLICIES

# cost kind -> the CalibrationConfig switch that measures it (None: every profile holds it)
COST_MODES: dict[str, str | None] = {
    "mass_lost": None, "out_err": None,
    "layer_kl": "layer_kl", "layer_nll": "layer_kl",  # one `--layer-kl` pass measures both
    AROUND_KL: "around",  # probes around the asked budgets themselves
    HEAD_KL: "head_kl", HEAD_FISHER: "head_fisher",
}
PER_HEAD_MODES = ("head_kl", "head_fisher")


def calibration_for_cost(cost: str, *, budgets: Sequence[float], policies: Sequence[str] | None = None,
                         grid: Sequence[int] | None = None, max_context_tokens: int | None = None
                         ) -> CalibrationConfig:
    """The calibration that measures `cost` for plans at `budgets`: its mode (COST_MODES), `policies` (default: the
    per-head set for a per-head cost, else every default policy) and `grid` (default: HEAD_BUDGETS per head, else
    calibrate's own)."""
    if cost not in COST_MODES:
        raise ConfigError(f"--cost {cost!r} is not one of {', '.join(COST_MODES)}")
    mode = COST_MODES[cost]
    per_head = mode in PER_HEAD_MODES
    around: tuple[int, ...] = ()
    if mode == "around":
        if any(not float(b).is_integer() for b in budgets):
            raise ConfigError(f"--cost around_kl measures whole-token operating points; --budget {list(budgets)} "
                              "has a fraction: use whole numbers of tokens per layer")
        around = tuple(int(b) for b in budgets)
    return CalibrationConfig(policies=tuple(policies) if policies else PER_HEAD_POLICIES if per_head else
                             DEFAULT_POLICIES,
                             budgets=tuple(grid) if grid else HEAD_BUDGETS if per_head else CalibrationConfig().budgets,
                             layer_kl=mode == "layer_kl", head_kl=mode == "head_kl",
                             head_fisher=mode == "head_fisher", around=around, max_context_tokens=max_context_tokens)
