"""Print the README's results table from evaluate reports: FullKV, best uniform policy, PyramidKV, CAKE, Ada-KV and
each plan with R, per budget, and the megabytes each plan's cache allocates beside the best uniform policy's, one
table per report; a plan made for an engine (`--target`) also gets R_engine, against that engine's own setting.

    python benchmarks/results_table.py outputs/smollm2-135m/eval/report.json outputs/smollm2-135m/eval_alt/report.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    report = json.load(open(path))
    rows: dict[float, dict[str, dict]] = defaultdict(dict)
    for r in report["recovery"]:
        rows[r["budget"]][r["method"]] = r
    plans = sorted({m for by in rows.values() for m, r in by.items() if r["family"] == "plan"})
    engines = sorted({m for by in rows.values() for m, r in by.items() if r.get("target")})
    head = ["budget", "full", "best uniform", "PyramidKV", "CAKE", "Ada-KV", *plans, *(f"R {p}" for p in plans),
            "R PyramidKV", "R CAKE", "R Ada-KV", *(f"MB {p} / uniform" for p in plans),
            *(f"{p}: engine setting, R_engine" for p in engines)]
    lines = [f"{path} ({report.get('samples', '?')} samples)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    mean_r: dict[str, list[float]] = defaultdict(list)
    for budget in sorted(rows):
        by = rows[budget]
        any_row = next(iter(by.values()))

        def score(name: str) -> str:
            return f"{by[name]['score']:.3f}" if name in by else "-"

        def rec(name: str) -> str:
            if name not in by or by[name]["R"] is None:
                return "-"
            mean_r[name].append(by[name]["R"])
            low_high = by[name].get("R_90")
            return f"{by[name]['R']:+.2f}" + (f" [{low_high[0]:+.2f}, {low_high[1]:+.2f}]" if low_high else "")

        def megabytes(name: str) -> str:
            method = report["methods"].get(f"{name}@{budget:g}")
            uniform = report["methods"].get(f"{any_row['best_uniform']}@{budget:g}")
            return f"{method['kv_mb']:.1f} / {uniform['kv_mb']:.1f}" if method and uniform else "-"

        def against_engine(name: str) -> str:
            row = by.get(name)
            if not row or row.get("R_engine") is None:
                return "-"
            mean_r[f"{name} (R_engine)"].append(row["R_engine"])
            low_high = row.get("R_engine_90")
            return (f"{row['engine_setting']} {row['engine_score']:.3f}, {row['R_engine']:+.2f}"
                    + (f" [{low_high[0]:+.2f}, {low_high[1]:+.2f}]" if low_high else ""))

        cells = [f"{budget:g}", f"{any_row['full_score']:.3f}",
                 f"{any_row['best_uniform']} {any_row['best_uniform_score']:.3f}", score("pyramidkv"), score("cake"),
                 score("adakv"), *(score(p) for p in plans), *(rec(p) for p in plans), rec("pyramidkv"), rec("cake"),
                 rec("adakv"), *(megabytes(p) for p in plans), *(against_engine(p) for p in engines)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("mean R: " + ", ".join(f"{name} {sum(v) / len(v):+.2f}" for name, v in mean_r.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(path) for path in sys.argv[1:]))
