"""Study: does refining a per-head plan around itself (probes at its operating point) help, out of fold?

    python studies/head_refine_crossfit.py outputs/study/pol11_p3/profile.safetensors --budgets 64,128

The isolated per-head costs the DP reads are measured with every other head whole, which under-counts starving many
heads at once. This measures the costs at the plan itself instead, and refines the plan with them:

1. The calibration samples are split into the guard's folds; each fold's plan is optimized without its samples
   (`--policy-set`, the six that keep a head's newest tokens by default: the set the guard keeps at 64 and 128).
2. Around each fold plan, on the samples it was optimized on: for every KV head, the plan with that head moved one
   grid level up and one down (its policy kept), each row's exact teacher-forced KL to the full cache (the shared
   engine, rows starting at the head's layer from the plan's own hidden states). The cost of a move is the mean
   change of the share of the output distribution lost, 1 - exp(-KL), against the plan's own.
3. The exact DP of `optimize --max-changes` (per-layer plans; `trust_region` in optimization/refine.py), over heads,
   picks the moves with the largest predicted gain: at most one per head, at most K in all, net tokens at most 0
   (tokens left over stay unused).
4. One pass answers each sample greedily with the plan made without it, refined (each K) or not, and with the
   uniform policies: task loss (1 - the task's score; lower is better) and KL, mean over tasks.

Every number comes from the calibration samples. bfloat16 answers shift with their decoding batch, so differences of
a few hundredths are within noise (docs/results-per-head.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from polykv_search import api
from polykv_search.calibration import Profile
from polykv_search.engine import EndToEndObjective
from polykv_search.optimization.crossfit import DEFAULT_FOLDS, fold_plans
from polykv_search.optimization.refine import trust_region
from polykv_search.optimization.run import OptimizeConfig
from polykv_search.plan import HeadPlan, Plan, SearchInfo, uniform_ladders
from polykv_search.policies import PER_HEAD_POLICY_SETS

COMPARE = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"


def one_level_moves(plan: Plan, grid: list[int]) -> list[tuple[int, int, HeadPlan, int]]:
    """(layer, KV head, the head moved one grid level up or down with its policy, token change) for every head."""
    out = []
    for layer in plan.layers:
        for h, head in enumerate(layer.heads or ()):
            above = [g for g in grid if g > head.budget]
            below = [g for g in grid if g < head.budget]
            for level in above[:1] + below[-1:]:
                out.append((layer.index, h, HeadPlan(policy=head.policy, params=head.params, budget=level),
                            level - head.budget))
    return out


def with_moves(plan: Plan, moves, info, note: str = "") -> Plan:
    """`plan` with each move's head replaced (the plan's average budget kept: a refined plan may use fewer tokens)."""
    new = {(layer, h): head for layer, h, head, _ in moves}
    layers = [layer if layer.heads is None else
              replace(layer, heads=tuple(new.get((layer.index, h), head) for h, head in enumerate(layer.heads)))
              for layer in plan.layers]
    return Plan.build(info, average_budget=plan.average_budget, layers=layers,
                      search=SearchInfo(solver="refine-heads", status="benchmark", objective=0.0, notes=note))


def best_moves(moves, gains: list[float], most: int) -> tuple[list, float]:
    """The moves minimizing the summed predicted change: at most one per head, at most `most`, net tokens <= 0."""
    heads: dict[tuple[int, int], list[int]] = {}  # (layer, KV head) -> its moves' indices
    for i, (layer, h, _, _) in enumerate(moves):
        heads.setdefault((layer, h), []).append(i)
    members = list(heads.values())
    cost, taken = trust_region([[(gains[i], moves[i][3]) for i in chosen] for chosen in members], most)
    return [moves[members[unit][option]] for unit, option in taken], cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--budgets", default="64,128")
    parser.add_argument("--policy-set", default=",".join(PER_HEAD_POLICY_SETS[0]))
    parser.add_argument("--max-changes", default="4,8,16,1000", help="the trust regions K to compare, a comma list")
    parser.add_argument("--data", default=api.CALIBRATION_DATA)
    parser.add_argument("--compare", default=COMPARE)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("outputs/studies/head_refine_crossfit.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    profile = Profile.load(args.profile)
    budgets = [float(b) for b in args.budgets.split(",")]
    trusts = [int(k) for k in args.max_changes.split(",")]
    samples, _ = api.resolve_samples(args.data, max_samples=profile.num_samples)
    if [s.id for s in samples] != [s["id"] for s in profile.header["samples"]]:
        raise SystemExit(f"{args.profile}: the profile's samples are not the first {len(samples)} of {args.data}")
    config = OptimizeConfig(cost="head_fisher", policies=tuple(args.policy_set.split(","))).validated()
    fold_of, ladders = fold_plans(profile, budgets, config=config, folds=DEFAULT_FOLDS)
    lm = api.resolve_model(profile.model.model_id, dtype=args.dtype)
    plans = {(k, b): ladder.plan_for(b) for k, ladder in enumerate(ladders) for b in budgets}
    moves = {key: one_level_moves(plan, profile.budgets) for key, plan in plans.items()}
    compare = args.compare.split(",")
    uniform = uniform_ladders(lm.info, compare, budgets)
    every = [*plans.values(), *(f.plan_for(b) for _, f in uniform for b in budgets)]  # refined plans: the same scorers
    scorers = {name: scorer for plan in every for name, scorer in plan.scorers.items()}
    objective = EndToEndObjective(lm, samples, policies=list(scorers.values()), metric="task")  # one prefill a sample
    engine = objective.engine
    sums: dict[tuple[int, float], list[float]] = {}
    counts: dict[tuple[int, float], int] = defaultdict(int)
    for state in objective.states:
        sample = state.sample
        for (k, b), plan in plans.items():
            if fold_of[sample.id] == k:
                continue  # fold k is answered by plan k, which was optimized on the other folds' samples
            rows = [plan, *(with_moves(plan, [m], lm.info) for m in moves[(k, b)])]
            measured = engine.answer_metrics_many(state, rows, reference=plan)
            change = [m["lost"] - measured[0]["lost"] for m in measured[1:]]
            sums[(k, b)] = [a + c for a, c in zip(sums.get((k, b), [0.0] * len(change)), change)]
            counts[(k, b)] += 1
        print(f"{sample.id}: probed around {sum(k != fold_of[sample.id] for k in range(len(ladders)))} fold plan(s) "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    refined, predicted = {}, {}
    for (k, b), plan in plans.items():
        gains = [s / counts[(k, b)] for s in sums[(k, b)]]
        for most in trusts:
            chosen, cost = best_moves(moves[(k, b)], gains, most)
            refined[(k, b, most)] = with_moves(plan, chosen, lm.info, note=f"{len(chosen)} moves")
            predicted[f"fold {k} at {b:g}, K={most}"] = {"moves": len(chosen), "predicted_lost_change": cost}
            print(f"fold plan {k} at {b:g}, K={most}: {len(chosen)} moves, predicted change of the share lost "
                  f"{cost:+.4f}", flush=True)
    names = ["fold plan", *(f"refined K={k}" for k in trusts), *compare]
    width = max(len(n) for n in names)
    print(f"{len(objective.states)} calibration samples, {len(ladders)} folds; mean over tasks (lower is better)")
    print("budget  metric " + " ".join(f"{n:>{width}}" for n in names))
    table = {}
    for b in budgets:
        def for_sample(sample, b=b):
            k = fold_of[sample.id]
            return [plans[(k, b)], *(refined[(k, b, most)] for most in trusts), *(f.plan_for(b) for _, f in uniform)]

        values = objective.measure_each(for_sample, len(names))
        table[f"{b:g}"] = {name: v for name, v in zip(names, values)}
        for metric in ("task", "kl"):
            print(f"{b:>6g} {metric:>7} " + " ".join(f"{v[metric]:>{width}.3f}" for v in values), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"profile": args.profile, "policy_set": args.policy_set, "budgets": budgets,
                                    "predicted": predicted, "measured": table,
                                    "seconds": time.perf_counter() - started}, indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
