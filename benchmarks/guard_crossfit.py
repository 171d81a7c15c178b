"""Benchmark: how much better a per-head plan looks on the calibration samples it was optimized on than on others.

    python benchmarks/guard_crossfit.py outputs/readme/smollm2/profile.safetensors --budgets 64,128,256 \
        --dtype bfloat16

Takes a profile (from `run` or `calibrate`; its samples must be the first N of --data, as `run` takes them) and, at
each budget, measures by task loss (1 - the task's score of the greedy answer; lower is better) on the calibration
samples: the plan optimized on every sample (in-sample, what an uncross-fitted guard measures), the plans optimized
without each sample's fold (out of fold, what `run`'s guard measures), and the uniform policies, all in one pass
over the same samples. Every number comes from calibration data. bfloat16 answers shift with the batch they are
decoded in (benchmarks/eval_batching.py), so differences of a few hundredths are within noise.
"""

from __future__ import annotations

import argparse

from polykv_search import api
from polykv_search.calibration import Profile
from polykv_search.engine import EndToEndObjective
from polykv_search.optimization.crossfit import DEFAULT_FOLDS, fold_plans
from polykv_search.optimization.run import OptimizeConfig, optimize_profile

COMPARE = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--cost", default="head_fisher")
    parser.add_argument("--data", default=api.CALIBRATION_DATA)
    parser.add_argument("--compare", default=COMPARE)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    budgets = [float(b) for b in args.budgets.split(",")]
    config = OptimizeConfig(cost=args.cost).validated()
    lm = api.resolve_model(profile.model.model_id, dtype=args.dtype)
    samples, _ = api.resolve_samples(args.data, max_samples=profile.num_samples)
    if [s.id for s in samples] != [s["id"] for s in profile.header["samples"]]:
        raise SystemExit(f"the profile's samples are not the first {profile.num_samples} of {args.data}")
    whole = optimize_profile(profile, budgets, config=config)
    fold_of, fold_files = fold_plans(profile, budgets, config=config, folds=args.folds)
    compare = args.compare.split(",")
    uniform = api.uniform_ladders(lm, compare, budgets)
    files = [whole, *fold_files] + [f for _, f in uniform]
    scorers = {name: scorer for f in files for rung in f.plans for name, scorer in rung.scorers.items()}
    objective = EndToEndObjective(lm, samples, policies=list(scorers.values()), metric="task")
    names = ["in-sample plan", "out-of-fold plan", *compare]
    print(f"{len(objective.states)} calibration samples, {args.folds} folds; mean task loss over tasks (lower is better)")
    print("budget " + " ".join(f"{n:>18}" for n in names))
    for budget in budgets:
        rungs = [whole.plan_for(budget)] + [f.plan_for(budget) for _, f in uniform]

        def for_sample(sample, rungs=rungs, budget=budget):
            return [rungs[0], fold_files[fold_of[sample.id]].plan_for(budget), *rungs[1:]]

        values = objective.measure_each(for_sample, len(names))
        print(f"{budget:>6g} " + " ".join(f"{v['task']:>18.3f}" for v in values))


if __name__ == "__main__":
    main()
