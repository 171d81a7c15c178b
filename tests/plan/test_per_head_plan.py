"""Plan schema 2: a layer may give each KV head its own policy and budget; totals count KV entries; every 1.x plan
stays valid with the same meaning; a per-head plan needs version 2 and the model's number of KV heads."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from polykv_search.plan import PLAN_SCHEMA, HeadPlan, LayerPlan, Plan, PlanFile, SearchInfo, uniform_plan
from polykv_search.plan import validate_plan_json as problems_of
from tests.plan.factories import gemma_like, llama_like

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plan-format.md"
SEARCH = SearchInfo(solver="dp", status="optimal", objective=1.5, bound=1.5, gap=0.0)


def per_head_plan(info, budget=64):
    """Head h of every compressible layer keeps budget/2 or 3*budget/2 tokens (their mean: `budget`)."""
    heads = info.num_kv_heads
    layers = []
    for i in info.compressible_layers:
        sizes = [budget // 2 if (i + h) % 2 else budget + budget // 2 for h in range(heads)]
        if heads % 2:  # an odd head count: the last head takes what keeps the layer's total
            sizes[-1] = budget * heads - sum(sizes[:-1])
        layers.append(LayerPlan(index=i, policy=None, heads=tuple(
            HeadPlan.of("snapkv" if h % 2 else "h2o_recent", size) for h, size in enumerate(sizes))))
    return Plan.build(info, average_budget=budget, layers=layers, search=SEARCH)


@pytest.mark.parametrize("info", [llama_like(), gemma_like()], ids=["llama30", "gemma18"])
def test_a_per_head_plan_round_trips_as_version_2_counted_in_kv_entries(info):
    plan = per_head_plan(info)
    assert plan.per_head and plan.constraint.unit == "tokens per KV head"
    kv_slots = len(info.compressible_layers) * info.num_kv_heads
    assert plan.constraint.total == plan.constraint.total_realised == 64 * kv_slots
    plan_file = PlanFile.build(info, [plan, uniform_plan(info, policy="snapkv", budget=128)])
    assert plan_file.schema_version == "2.0.0"
    obj = json.loads(plan_file.to_json())
    jsonschema.Draft202012Validator(PLAN_SCHEMA).validate(obj)
    assert problems_of(obj, model=info) == []
    assert PlanFile.from_json(plan_file.to_json()) == plan_file
    assert plan_file.plans[1].constraint.unit == "tokens per layer"  # a per-layer rung keeps its meaning


def test_every_version_1_plan_is_a_valid_version_2_plan_with_the_same_meaning():
    info = llama_like()
    obj = json.loads(PlanFile.build(info, [uniform_plan(info, policy="knorm", budget=100)]).to_json())
    assert obj["schema_version"] == "1.0.0"  # written with the lowest version that holds it
    jsonschema.Draft202012Validator(PLAN_SCHEMA).validate(obj)
    assert problems_of(obj, model=info) == []
    obj["schema_version"] = "2.0.0"  # the same plan declared as 2.x means the same
    assert problems_of(obj, model=info) == []


def bad(info, edit) -> list[str]:
    obj = json.loads(PlanFile.build(info, [per_head_plan(info)]).to_json())
    edit(obj)
    return problems_of(obj, model=info)


def layer(obj, i=0):
    return obj["plans"][0]["layers"][i]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda o: o.update(schema_version="1.0.0"), "per-head entries need schema_version 2.x"),
    (lambda o: layer(o)["heads"].pop(), "lists 2 KV heads but the model has 3"),
    (lambda o: layer(o)["heads"][0].update(budget=layer(o)["heads"][0]["budget"] + 1),
     "the KV heads' budgets sum to"),
    (lambda o: o["plans"][0]["constraint"].update(unit="tokens per layer"), "counted in 'tokens per KV head'"),
    (lambda o: layer(o)["heads"][1].update(policy="nope"), "heads[1].policy 'nope' is not a registered policy"),
    (lambda o: layer(o)["heads"][1].update(params={"windw": 3}), "has no parameter 'windw'"),
    (lambda o: layer(o).update(policy="snapkv", budget=64), "layers[0].policy"),
    (lambda o: o["plans"][0]["constraint"].update(total=5), "x 30 compressible layers x 3 KV heads"),
])
def test_bad_per_head_plans_name_what_is_wrong(edit, expected):
    problems = bad(llama_like(), edit)
    assert any(expected in p for p in problems), problems
    assert all(len(p.splitlines()) == 1 for p in problems)


def test_a_plan_for_another_number_of_kv_heads_is_refused_for_that_model():
    info = llama_like()
    other = replace(info, num_kv_heads=4)
    obj = json.loads(PlanFile.build(info, [per_head_plan(info)]).to_json())
    problems = problems_of(obj, model=other)
    assert any("$.model.num_kv_heads is 3 but model smollm2-135m has 4" in p for p in problems)
    assert any("lists 3 KV heads but the model has 4" in p for p in problems)


def test_the_format_reference_examples_validate():
    """docs/plan-format.md holds one per-layer and one per-head plan file; both are valid as written."""
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", DOCS.read_text(), flags=re.S)]
    assert [e["schema_version"] for e in examples] == ["1.0.0", "2.0.0"]
    for example in examples:
        assert problems_of(example) == [], example
    assert any("heads" in entry for entry in examples[1]["plans"][0]["layers"])
