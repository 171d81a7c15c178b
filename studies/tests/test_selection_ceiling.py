"""studies/selection_ceiling.py: the best plan and best uniform policy per budget over several reports, R of
that plan, and reports of another data set refused."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "selection_ceiling.py"
spec = importlib.util.spec_from_file_location("selection_ceiling", SCRIPT)
selection_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(selection_ceiling)


def _report(methods: dict[str, tuple[str, int | None, float]], ids=("a", "b"), full=0.6) -> dict:
    table = {"full": {"family": "full", "budget": None, "score": full}}
    table.update({key: {"family": family, "budget": budget, "score": score}
                  for key, (family, budget, score) in methods.items()})
    return {"samples": len(ids), "methods": table,
            "results": [{"sample_id": i, "method": "full"} for i in ids]}


def _write(tmp_path: Path, name: str, report: dict) -> Path:
    path = tmp_path / name / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    return path


def test_best_plan_and_uniform_over_reports(tmp_path):
    one = _report({"snapkv@64": ("uniform", 64, 0.20), "plan@64": ("plan", 64, 0.25),
                   "snapkv@128": ("uniform", 128, 0.30), "plan@128": ("plan", 128, 0.28)})
    two = _report({"streaming@64": ("uniform", 64, 0.10), "other@64": ("plan", 64, 0.40),
                   "streaming@128": ("uniform", 128, 0.35), "other@128": ("plan", 128, 0.33)})
    paths = [_write(tmp_path, "one", one), _write(tmp_path, "two", two)]
    rows = selection_ceiling.ceiling(selection_ceiling.load(paths), ["one", "two"])
    assert [r["budget"] for r in rows] == [64, 128]
    assert rows[0]["plan"] == (0.40, "two:other@64") and rows[0]["uniform"] == (0.20, "snapkv@64")
    assert rows[0]["R"] == pytest.approx((0.40 - 0.20) / (0.6 - 0.20))
    assert rows[1]["uniform"] == (0.35, "streaming@128")  # the best uniform of all reports, not of the plan's
    assert rows[1]["R"] == pytest.approx((0.33 - 0.35) / (0.6 - 0.35))


def test_reports_of_another_set_are_refused(tmp_path):
    paths = [_write(tmp_path, "one", _report({}, ids=("a", "b"))), _write(tmp_path, "two", _report({}, ids=("c",)))]
    with pytest.raises(SystemExit, match="not on the samples of"):
        selection_ceiling.load(paths)
