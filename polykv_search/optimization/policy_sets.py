"""Policy sets: the candidate policies of each plan `run` optimizes (the per-head default: six policies that keep a
head's newest tokens, then those six and five scorers alone), their names in the guard's tables, and their checks."""

from __future__ import annotations

from collections.abc import Sequence

from polykv_search.calibration.profile import HEAD_FISHER
from polykv_search.errors import ConfigError
from polykv_search.export import KVPRESS
from polykv_search.optimization.run import OptimizeConfig
from polykv_search.optimization.targets import STREAMING
from polykv_search.policies import PER_HEAD_POLICY_SETS, check_policy_names


def candidate_sets(config: OptimizeConfig, policies: Sequence[str] | None,
                   policy_sets: Sequence[Sequence[str]] | None, *, guard: bool = True
                   ) -> tuple[list[str] | None, list[list[str]]]:
    """(the policies `run` calibrates, None for the mode's default; the candidate sets its guard chooses between,
    empty for one plan). `--cost head_fisher` defaults to PER_HEAD_POLICY_SETS when no candidates are given at all
    (with the guard off, to the first set alone); an engine target (trtllm, duo-attention), to streaming alone.
    Every set must be among the calibrated policies and name every policy `--only` restricts; ConfigError
    otherwise."""
    if config.target != KVPRESS:  # an engine target plans StreamingLLM only: calibrate what it reads
        if policy_sets:
            raise ConfigError(f"--target {config.target} plans StreamingLLM only; drop --policy-set")
        chosen = check_policy_names(list(policies)) if policies else [STREAMING]
        if STREAMING not in chosen:
            raise ConfigError(f"--target {config.target} plans from the streaming costs; add streaming to --policies "
                              f"({', '.join(chosen)}) or drop --policies")
        return chosen, []
    if policy_sets is None:
        defaults = config.cost == HEAD_FISHER and policies is None and config.policies is None
        policy_sets = (PER_HEAD_POLICY_SETS if guard else PER_HEAD_POLICY_SETS[:1]) if defaults else ()
    elif len(policy_sets) > 1 and not guard:
        raise ConfigError("several policy sets need the guard to choose between their plans; give one set, or drop "
                          "--no-guard")
    sets = [check_policy_names(list(chosen)) for chosen in policy_sets]
    if not sets:
        return (check_policy_names(list(policies)) if policies else None), []
    if config.policies is not None:
        raise ConfigError("give the plan's candidate policies either as policy sets or as the optimize config's "
                          "policies, not both")
    refuse_sets_end_to_end(config)
    seen = [frozenset(chosen) for chosen in sets]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"policy sets {' and '.join(','.join(c) for c in sets if seen.count(frozenset(c)) > 1)} "
                          "are the same set; give each once")
    calibrated = check_policy_names(list(policies)) if policies else list(dict.fromkeys(p for s in sets for p in s))
    for chosen in sets:
        missing = [p for p in chosen if p not in calibrated]
        if missing:
            raise ConfigError(f"policy set {','.join(chosen)} names {', '.join(missing)}, which --policies does not "
                              f"calibrate ({', '.join(calibrated)}); add them to --policies")
        restricted = [p for p in config.allowed or {} if p not in chosen]
        if restricted:
            raise ConfigError(f"--only restricts {', '.join(restricted)}, which policy set {','.join(chosen)} does "
                              "not hold; add it to every set or drop that --only")
    return calibrated, sets


def set_names(policy_sets: Sequence[Sequence[str]]) -> list[tuple[str, list[str]]]:
    """(the guard's name for the plan of each further policy set, the set): "plan (N policies)", with the set's
    place (the first set, the plan's own, is 1) where two of them have the same size."""
    sets = [check_policy_names(list(chosen)) for chosen in policy_sets]
    sizes = [len(chosen) for chosen in sets]

    def count(n: int) -> str:
        return f"{n} {'policy' if n == 1 else 'policies'}"

    return [(f"plan ({count(n)})" if sizes.count(n) == 1 else f"plan (set {k + 2}, {count(n)})", chosen)
            for k, (n, chosen) in enumerate(zip(sizes, sets))]


def refuse_sets_end_to_end(config: OptimizeConfig) -> None:
    """ConfigError when `config`'s solver measures plans end to end: policy sets are plans solved from the profile."""
    if config.end_to_end:
        raise ConfigError(f"--solver {config.solver} measures its plans end to end; policy sets are for the "
                          "solvers that optimize from the profile (dp, ilp)")
