"""Two methods that run the same plan (a guard-written rung and the uniform policy it names) are answered once and
report the same answers, not two decodings that rounding in different batches can tell apart."""

from dataclasses import replace

import polykv_search as pk
from polykv_search.engine import PrefillEngine
from polykv_search.plan import PlanFile, uniform_plan
from tests.conftest import sample_rows, tiny_loaded, write_jsonl


def test_a_rung_equal_to_a_uniform_policy_is_answered_once_with_its_answers(tmp_path, monkeypatch):
    lm = tiny_loaded("llama")
    data = write_jsonl(tmp_path / "e.jsonl", sample_rows(2, words=160))
    snap = uniform_plan(lm.info, policy="snapkv", budget=16)
    guarded = replace(snap, search=replace(snap.search, notes="guard: this rung is that uniform policy"))
    other = uniform_plan(lm.info, policy="knorm", budget=24)
    plan_file = PlanFile.build(lm.info, [guarded, other])
    rows = []
    run_many = PrefillEngine.run_many

    def counted(self, state, plans, **kwargs):
        rows.append(len(plans))
        return run_many(self, state, plans, **kwargs)

    monkeypatch.setattr(PrefillEngine, "run_many", counted)
    report = pk.evaluate(lm, data, plans={"plan": plan_file}, policies=["snapkv", "knorm"], allocators=(),
                         out_dir=tmp_path / "ev")
    # per sample: snapkv and knorm at 16 and at 24 and the plan's two rungs, which are snapkv@16 and knorm@24
    # themselves: 4 distinct rows, then the full cache alone
    assert rows == [4, 1, 4, 1]
    by = {}
    for r in report.results:
        by.setdefault(r.method, []).append((r.answer, r.kl))
    assert by["plan@16"] == by["snapkv@16"]
    assert by["plan@24"] == by["knorm@24"]
