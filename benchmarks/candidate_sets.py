"""Study: which candidate sets the per-head recipe's guard should choose between, decided on calibration samples only.

    python benchmarks/candidate_sets.py --max-samples 18 --out outputs/zoo36 \
        --set expected_attention_recent,h2o_recent,streaming,tova_recent,snapkv,keydiff_recent \
        --set ...                                    # one --set per candidate set, the first the plan's own

    # the guarded plan of some of those sets, from the same calibration (--policies: the union it was made with)
    python benchmarks/candidate_sets.py --max-samples 18 --out outputs/zoo36 --policies SIX,SC,ZOO \
        --set SIX --set SIX,ZOO --write outputs/zoo36/plan_six_zoo.json

Calibrates `--head-fisher` once with the union of the sets (resumable: the folder's checkpoints), optimizes each
set's ladder per KV head, and lets the cross-fitted guard measure every set's plan at every budget (each
calibration sample answered by the plan optimized without its fold), beside the uniform policies of `--compare`.
Prints, per budget, the mean task loss (1 - score, lower is better) of each set's plan and of the best uniform
policy, and which candidate the guard would keep. Nothing here reads an evaluation set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polykv_search as pk
from polykv_search.calibration.modes import calibration_for_cost
from polykv_search.calibration.profile import HEAD_FISHER
from polykv_search.data import resolve_samples
from polykv_search.optimization.guard import guard_plan
from polykv_search.optimization.policy_sets import set_names
from polykv_search.policies import PER_HEAD_POLICY_SETS

COMPARE = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/calib.jsonl")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--budget", default="64,128,256,512")
    parser.add_argument("--set", action="append", dest="sets", help="a candidate set (comma list); repeatable; "
                        "default: the recipe's own sets")
    parser.add_argument("--policies", default=None, help="the policies calibrated (comma list; default: the union "
                        "of the sets); a folder calibrated with more resumes only with its own union")
    parser.add_argument("--write", type=Path, default=None, help="write the guarded plan of these sets here "
                        "(per budget the best set's rung, or the best uniform policy where none beats it)")
    parser.add_argument("--compare", default=COMPARE)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    sets = [s.split(",") for s in args.sets] if args.sets else [list(s) for s in PER_HEAD_POLICY_SETS]
    union = list(dict.fromkeys(p for chosen in sets for p in chosen))
    if args.policies:
        listed = args.policies.split(",")
        missing = [p for p in union if p not in listed]
        if missing:
            parser.error(f"--policies leaves out {', '.join(missing)}, which a --set names")
        union = listed
    budgets = [float(b) for b in args.budget.split(",")]
    lm = pk.load_model(args.model, dtype=args.dtype)
    started = time.perf_counter()
    calibration = pk.calibrate(lm, args.data, config=calibration_for_cost(HEAD_FISHER, budgets=budgets, policies=union),
                               out_dir=args.out, max_samples=args.max_samples, resume=True)
    calibrated = time.perf_counter() - started
    config = pk.OptimizeConfig(cost=HEAD_FISHER, policies=tuple(sets[0]))
    ladder = pk.optimize(calibration.path, budgets=budgets, config=config, model=lm)
    samples, _ = resolve_samples(args.data, max_samples=args.max_samples)
    started = time.perf_counter()
    result = guard_plan(lm, ladder, samples, policies=args.compare.split(","), profile=calibration.profile,
                        config=config, policy_sets=sets[1:], cache=args.out / "guard.json")
    guarded = time.perf_counter() - started
    if args.write is not None:
        print(f"guarded plan: {result[0].save(args.write)}")
    names = ["plan"] + [name for name, _ in set_names(sets[1:])]
    print(f"calibrate {calibrated / 60:.1f} min ({len(union)} policies, {result[2]} samples), guard "
          f"{guarded / 60:.1f} min")
    for k, chosen in enumerate(sets):
        print(f"  {names[k]}: {','.join(chosen)}")
    print("| budget | " + " | ".join(names) + " | best uniform | kept |")
    print("|---|" + "---|" * len(names) + "---|---|")
    for rung in result[1]:
        uniform = {k: v for k, v in rung.measured.items() if k not in names}
        best = min(uniform, key=uniform.get)
        print(f"| {rung.budget:g} | " + " | ".join(f"{rung.measured[n]:.3f}" for n in names) +
              f" | {best} {uniform[best]:.3f} | {rung.chosen} |")


if __name__ == "__main__":
    main()
