"""The most that choosing among existing plans could give: per budget, the best plan of several `evaluate` reports
on one data set, picked on that data set itself.

Usage:
    python studies/selection_ceiling.py outputs/s4/eval_smol_f/report.json outputs/s6/eval_lin/report.json ...

Every report must be on the same samples (checked: the same sample ids and the same full-cache score). Per budget
it prints the best uniform policy of all the reports, the best plan of all the reports and its R. The plan is
chosen on the data it is scored on, so its R is an upper bound for any choice among these plans made elsewhere
(on calibration samples): not a result. If the bound is below a goal, better choosing cannot reach the goal;
better plans must.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    reports = [json.loads(p.read_text()) for p in paths]
    ids = [sorted({r["sample_id"] for r in rep["results"]}) for rep in reports]
    fulls = [rep["methods"]["full"]["score"] for rep in reports]
    for path, sample_ids, full in zip(paths, ids, fulls):
        if sample_ids != ids[0] or abs(full - fulls[0]) > 1e-9:
            sys.exit(f"{path} is not on the samples of {paths[0]} (other sample ids or full-cache score "
                     f"{full:.4f} vs {fulls[0]:.4f}); give reports of one data set, model and dtype")
    return reports


def ceiling(reports: list[dict], names: list[str]) -> list[dict]:
    """Per budget: best uniform policy, best plan (name, report) and R of that plan."""
    full = reports[0]["methods"]["full"]["score"]
    best_uniform: dict[int, tuple[float, str]] = {}
    best_plan: dict[int, tuple[float, str]] = {}
    for name, rep in zip(names, reports):
        for key, method in rep["methods"].items():
            budget = method["budget"]
            if method["family"] == "uniform":
                best_uniform[budget] = max(best_uniform.get(budget, (-1.0, "")), (method["score"], key))
            elif method["family"] == "plan":
                best_plan[budget] = max(best_plan.get(budget, (-1.0, "")), (method["score"], f"{name}:{key}"))
    rows = []
    for budget in sorted(best_plan):
        if budget not in best_uniform:
            continue
        uniform, plan = best_uniform[budget], best_plan[budget]
        rows.append({"budget": budget, "full": full, "uniform": uniform, "plan": plan,
                     "R": (plan[0] - uniform[0]) / (full - uniform[0])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    args = ap.parse_args()
    reports = load(args.reports)
    names = [p.parent.name for p in args.reports]
    rows = ceiling(reports, names)
    if not rows:
        sys.exit("no budget has both a plan and a uniform policy in these reports")
    print(f"{len(reports)} reports, {reports[0]['samples']} samples; the plan is picked on these samples (a bound)")
    print("| budget | full | best uniform | best plan (picked on this set) | R |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['budget']} | {row['full']:.3f} | {row['uniform'][1]} {row['uniform'][0]:.3f} | "
              f"{row['plan'][1]} {row['plan'][0]:.3f} | {row['R']:+.2f} |")
    print(f"\nmean R of the per-budget best plan: {statistics.fmean(r['R'] for r in rows):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
