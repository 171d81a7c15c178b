"""Print the README's result rows from evaluate reports: per budget the full cache, the best uniform policy,
PyramidKV, CAKE, Ada-KV, the plan, R with its 90% interval, and the megabytes each cache allocates.

    python benchmarks/readme_table.py "SmolLM2-135M eval" outputs/readme/smollm2/eval/report.json \\
        "SmolLM2-135M eval_alt" outputs/readme/smollm2_eval_alt/report.json

Reads only the reports (what `run` and `evaluate` wrote); prints markdown rows, nothing is chosen here.
"""

from __future__ import annotations

import json
import sys


def rows(label: str, path: str) -> list[str]:
    report = json.load(open(path))
    methods = report["methods"]
    full = methods["full"]
    out = []
    for budget in report["budgets"]:
        budget_key = int(budget) if float(budget).is_integer() else budget
        recovery = {r["method"]: r for r in report["recovery"] if r["budget"] == budget}
        plan = next((r for name, r in recovery.items() if r["family"] == "plan"), None)
        if plan is None:
            continue
        allocators = [f"{methods[f'{name}@{budget_key}']['score']:.3f}" if f"{name}@{budget_key}" in methods
                      else "–" for name in ("pyramidkv", "cake", "adakv")]
        plan_method = methods[f"{plan['method']}@{budget_key}"]
        best = methods[f"{plan['best_uniform']}@{budget_key}"]
        low, high = plan["R_90"]
        out.append(f"| {label} | {budget_key} | {full['score']:.3f} | {plan['best_uniform']} {best['score']:.3f} | "
                   f"{' | '.join(allocators)} | **{plan['score']:.3f}** | **{plan['R']:+.2f}** "
                   f"[{low:+.2f}, {high:+.2f}] | {plan_method['kv_mb']:.1f} / {best['kv_mb']:.1f} |")
    return out


def main() -> None:
    args = sys.argv[1:]
    print("| model, set | budget | full | best uniform | PyramidKV | CAKE | Ada-KV | plan | R [90%] | MB plan / uniform |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, path in zip(args[::2], args[1::2]):
        print("\n".join(rows(label, path)))


if __name__ == "__main__":
    main()
