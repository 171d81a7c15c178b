"""Study: how much better a per-head plan looks on the calibration samples it was optimized on than on others,
and how plans made other ways compare out of fold.

    python studies/guard_crossfit.py outputs/readme/smollm2/profile.safetensors --budgets 64,128,256 \
        --dtype bfloat16
    python studies/guard_crossfit.py outputs/study/pol6/profile.safetensors --budgets 64,128,256,512 \
        --policy-sets expected_attention_recent,h2o_recent,streaming all       # candidates restricted, or not
    python studies/guard_crossfit.py PROFILE_A PROFILE_B                     # two calibrations of the same samples
    python studies/guard_crossfit.py PROFILE --budgets 64,128 --policy-sets <the six> --floors 1 64   # floors

Takes one or more profiles (from `run` or `calibrate`; their samples must be the first N of --data, as `run` takes
them) and, at each budget, measures by task loss (1 - the task's score of the greedy answer; lower is better) on the
calibration samples: the plan optimized on every sample of the first profile with the first --policy-sets entry
(in-sample, what an uncross-fitted guard measures), for every profile, every --policy-sets entry and every --floors
value the plans optimized without each sample's fold (out of fold, what `run`'s guard measures), and the uniform
policies, all in one pass over the same samples. Every number comes from calibration data. bfloat16 answers shift
with the batch they are decoded in (benchmarks/eval_batching.py), so differences of a few hundredths are within noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polykv_search import api
from polykv_search.calibration import Profile
from polykv_search.engine import EndToEndObjective
from polykv_search.optimization.crossfit import DEFAULT_FOLDS, fold_plans
from polykv_search.optimization.run import OptimizeConfig, optimize_profile
from polykv_search.plan import uniform_ladders

COMPARE = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+")
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--cost", default="head_fisher")
    parser.add_argument("--policy-sets", nargs="+", default=["all"],
                        help="candidate policies of the out-of-fold plans, one comma list per variant (after the "
                             "profiles); all: the profile's")
    parser.add_argument("--floors", nargs="+", type=int, default=[1],
                        help="least tokens a KV head keeps in the out-of-fold plans (optimize --floor), one variant "
                             "per value")
    parser.add_argument("--data", default=api.CALIBRATION_DATA)
    parser.add_argument("--compare", default=COMPARE)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    profiles = [Profile.load(path) for path in args.profiles]
    first = profiles[0]
    budgets = [float(b) for b in args.budgets.split(",")]
    samples, _ = api.resolve_samples(args.data, max_samples=first.num_samples)
    for path, profile in zip(args.profiles, profiles):
        if profile.model.model_id != first.model.model_id:
            raise SystemExit(f"{path}: a profile of {profile.model.model_id}, not of {first.model.model_id}")
        if [s.id for s in samples] != [s["id"] for s in profile.header["samples"]]:
            raise SystemExit(f"{path}: the profile's samples are not the first {len(samples)} of {args.data}")
        for chosen in args.policy_sets:
            missing = [] if chosen == "all" else sorted(set(chosen.split(",")) - set(profile.policies))
            if missing:
                raise SystemExit(f"{path}: no costs for {', '.join(missing)} (its policies: "
                                 f"{', '.join(profile.policies)})")
    first_set = args.policy_sets[0]
    whole = optimize_profile(first, budgets, config=OptimizeConfig(  # as `run` writes it: the first set's plan
        cost=args.cost, policies=None if first_set == "all" else tuple(first_set.split(","))).validated())
    variants = []  # (column name, sample id -> fold, fold ladders)
    for k, (path, profile) in enumerate(zip(args.profiles, profiles)):
        for j, chosen in enumerate(args.policy_sets):
            for floor in args.floors:
                config = OptimizeConfig(cost=args.cost, floor=floor, policies=None if chosen == "all" else
                                        tuple(chosen.split(","))).validated()
                count = len(config.policies or profile.policies)
                name = "out-of-fold" + (f" {k + 1}:{Path(path).parent.name}" if len(profiles) > 1 else "") + \
                    (f" set {j + 1} ({count}p)" if len(args.policy_sets) > 1 else "") + \
                    (f" floor {floor}" if len(args.floors) > 1 else "")
                variants.append((name, *fold_plans(profile, budgets, config=config, folds=args.folds)))
    lm = api.resolve_model(first.model.model_id, dtype=args.dtype)
    compare = args.compare.split(",")
    uniform = uniform_ladders(lm.info, compare, budgets)
    files = [whole, *(f for _, _, fold_files in variants for f in fold_files)] + [f for _, f in uniform]
    scorers = {name: scorer for f in files for rung in f.plans for name, scorer in rung.scorers.items()}
    objective = EndToEndObjective(lm, samples, policies=list(scorers.values()), metric="task")
    names = ["in-sample (first profile, first set)", *(name for name, _, _ in variants), *compare]
    width = max(len(n) for n in names)
    print(f"{len(objective.states)} calibration samples, {args.folds} folds; mean task loss over tasks (lower is better)")
    print("budget " + " ".join(f"{n:>{width}}" for n in names))
    for budget in budgets:
        def for_sample(sample, budget=budget):
            return [whole.plan_for(budget),
                    *(fold_files[fold_of[sample.id]].plan_for(budget) for _, fold_of, fold_files in variants),
                    *(f.plan_for(budget) for _, f in uniform)]

        values = objective.measure_each(for_sample, len(names))
        print(f"{budget:>6g} " + " ".join(f"{v['task']:>{width}.3f}" for v in values), flush=True)


if __name__ == "__main__":
    main()
