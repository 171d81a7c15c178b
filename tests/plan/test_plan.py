"""The plan file: JSON round trip, schema conformance, every bad plan reported at once, and a loader fuzz."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polykv_search.errors import PlanError
from polykv_search.plan import (
    PLAN_SCHEMA,
    InvalidPlanError,
    Plan,
    PlanFile,
    SearchInfo,
    check_matches_model,
    uniform_plan,
    validate_plan_json,
)
from polykv_search.optimization import pyramidkv_plan
from polykv_search.policies import POLICIES, policy_params
from tests.plan.factories import gemma_like, llama_like
from tests.plans import plan_of

VALIDATOR = jsonschema.Draft202012Validator(PLAN_SCHEMA)


def mixed_plan(info, *, budget=128):
    """Several policies, non-uniform budgets, full provenance: exercises every field."""
    names = list(POLICIES)
    n = len(info.compressible_layers)
    total_budgets = [budget + (1 if i % 2 else -1) * (i % 5) for i in range(n)]
    total_budgets[-1] += budget * n - sum(total_budgets)
    budgets, policies, k = [], [], 0
    for kind in info.layer_types:
        if kind == "sliding_attention":
            budgets.append(None), policies.append(None)
        else:
            budgets.append(total_budgets[k]), policies.append(names[k % len(names)])
            k += 1
    search = SearchInfo(solver="dp", status="optimal", objective=0.125, bound=0.12, gap=0.04,
                        profile_signature="c" * 64, seed=7, seconds=0.25, notes="exact DP over 8 policies")
    return plan_of(info, policies, budgets, average=budget, search=search)


@pytest.fixture
def llama():
    return llama_like()


@pytest.fixture
def gemma():
    return gemma_like()


@pytest.fixture
def ladder(llama):
    return PlanFile.build(llama, [uniform_plan(llama, policy="snapkv", budget=256),
                                  pyramidkv_plan(llama, budget=512), mixed_plan(llama, budget=1024)])


def good_dict(info):
    return json.loads(PlanFile.build(info, [mixed_plan(info)]).to_json())


def problems_of(obj, **kwargs):
    found = validate_plan_json(obj, **kwargs)
    assert all(len(p.splitlines()) == 1 for p in found)
    return found


# -- round trip and schema ---------------------------------------------------------------------------
def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(PLAN_SCHEMA)
    assert PLAN_SCHEMA["$schema"].endswith("2020-12/schema")


@pytest.mark.parametrize("info", [llama_like(), gemma_like()], ids=["llama30", "gemma18"])
def test_single_plan_round_trips_and_conforms(info):
    plan_file = PlanFile.build(info, [mixed_plan(info)])
    text = plan_file.to_json()
    assert PlanFile.from_json(text) == plan_file
    VALIDATOR.validate(json.loads(text))
    assert validate_plan_json(json.loads(text), model=info) == []
    assert plan_file.schema_version == "1.0.0"  # per layer: readable by version-1 readers too


def test_ladder_round_trips_and_picks_a_plan_by_budget(ladder, tmp_path):
    path = ladder.save(tmp_path / "sub" / "ladder.json")
    loaded = PlanFile.load(path)
    assert loaded == ladder
    assert loaded.budgets == [256, 512, 1024]
    assert loaded.plan_for(512).search.solver == "pyramidkv"
    assert loaded.plan_for(1024.0) == ladder.plans[2]
    VALIDATOR.validate(json.loads(path.read_text()))


def test_plan_views_on_a_sliding_window_model(gemma):
    plan = uniform_plan(gemma, policy="tova", budget=100)
    assert plan.budgets == ([None] * 5 + [100]) * 3
    assert plan.policies == ([None] * 5 + ["tova"]) * 3
    assert [layer.sliding_window for layer in plan.layers] == [t == "sliding_attention" for t in gemma.layer_types]
    assert plan.constraint.total == plan.constraint.total_realised == 300


def test_each_layer_entry_is_one_line(ladder):
    text = ladder.to_json()
    layer_lines = [line for line in text.splitlines() if line.strip().startswith('{"index"')]
    assert len(layer_lines) == 30 * 3


def test_layer_params_are_the_full_press_parameters(llama):
    plan = uniform_plan(llama, policy="expected_attention", budget=64)
    assert plan.layers[0].params == policy_params("expected_attention")
    assert "compression_ratio" not in plan.layers[0].params and "use_covariance" in plan.layers[0].params


def test_plan_for_an_absent_budget_names_the_available_ones(ladder):
    with pytest.raises(PlanError, match=r"no plan for average budget 300; its budgets: 256, 512, 1024"):
        ladder.plan_for(300)


# -- bad plans: each problem named ---------------------------------------------------------------------
def mutate(info, change):
    obj = good_dict(info)
    change(obj)
    return obj


def test_wrong_sum_is_reported(llama):
    def change(obj):
        obj["plans"][0]["layers"][3]["budget"] += 10
    found = problems_of(mutate(llama, change))
    assert any("$.plans[0].constraint.total_realised is 3840 but the compressible layers' budgets sum to 3850"
               in p for p in found), found


def test_wrong_total_is_reported(llama):
    def change(obj):
        obj["plans"][0]["constraint"]["total"] = 4000
    found = problems_of(mutate(llama, change))
    assert any("total is 4000 but average_budget 128 x 30 compressible layers = 3840" in p for p in found), found
    assert any("total_realised 3840 differs from total 4000" in p for p in found), found


def test_fractional_average_rounds_half_up():
    info = llama_like(3)
    plan = uniform_plan(info, policy="snapkv", budget=100.5)
    assert plan.constraint.total == 302  # 301.5 rounds up
    assert sorted(plan.budgets) == [100, 101, 101]
    assert validate_plan_json(PlanFile.build(info, [plan]).to_dict()) == []


def test_wrong_layer_count_is_reported(llama):
    def change(obj):
        obj["plans"][0]["layers"].pop()
    found = problems_of(mutate(llama, change))
    assert any("$.plans[0].layers has 29 layers but model smollm2-135m has 30" in p for p in found), found


def test_layer_index_out_of_order_is_reported(llama):
    def change(obj):
        layers = obj["plans"][0]["layers"]
        layers[1]["index"], layers[2]["index"] = 2, 1
    found = problems_of(mutate(llama, change))
    assert "$.plans[0].layers[1].index is 2, expected 1; list the layers in order 0..L-1" in found


def test_unknown_policy_lists_the_known_ones(llama):
    def change(obj):
        obj["plans"][0]["layers"][4]["policy"] = "snapkvv"
    found = problems_of(mutate(llama, change))
    assert any("$.plans[0].layers[4].policy 'snapkvv' is not a registered policy; known policies: snapkv, streaming"
               in p for p in found), found


def test_a_refused_kvpress_press_in_a_plan_says_why(llama):
    def change(obj):
        obj["plans"][0]["layers"][4]["policy"] = "qfilter"
    found = problems_of(mutate(llama, change))
    assert any(p.startswith("$.plans[0].layers[4].policy 'qfilter' is not available: QFilterPress loads Q-filters")
               and "from the Hugging Face hub" in p for p in found), found


@pytest.mark.parametrize(("params", "expected"), [
    ({"window_size": 64, "kernel_size": 5, "windw": 3}, "SnapKVPress (policy 'snapkv') has no parameter 'windw'"),
    ({"window_size": "64"}, "params.window_size: '64' is not a valid int for SnapKVPress"),
    ({"window_size": 64.5}, "params.window_size: 64.5 is not a valid int"),
    ({"window_size": True}, "params.window_size: True is not a valid int"),
    ({"compression_ratio": 0.5}, "compression_ratio is set from the layer budget at run time; remove it"),
    ({"window_size": [64]}, "params.window_size: [64] is not of type"),
])
def test_bad_params_are_reported(llama, params, expected):
    def change(obj):
        obj["plans"][0]["layers"][0]["policy"] = "snapkv"
        obj["plans"][0]["layers"][0]["params"] = params
    found = problems_of(mutate(llama, change))
    assert any(expected in p for p in found), found


def test_optional_int_param_accepts_null(llama):
    def change(obj):
        obj["plans"][0]["layers"][0]["policy"] = "random"
        obj["plans"][0]["layers"][0]["params"] = {"seed": None}
    assert problems_of(mutate(llama, change)) == []


@pytest.mark.parametrize(("path", "expected"), [
    (("plans", 0, "search"), "$.plans[0]: 'search' is a required property"),
    (("plans", 0, "layers", 2, "budget"), "$.plans[0].layers[2]: 'budget' is a required property"),
    (("plans", 0, "layers", 2, "params"), "$.plans[0].layers[2]: 'params' is a required property"),
    (("model", "head_dim"), "$.model: 'head_dim' is a required property"),
    (("schema_version",), "$: 'schema_version' is a required property"),
    (("plans", 0, "constraint", "total_realised"), "$.plans[0].constraint: 'total_realised' is a required property"),
])
def test_missing_fields_are_reported_with_their_path(llama, path, expected):
    def change(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    assert expected in problems_of(mutate(llama, change))


def test_budget_below_one_and_unexpected_keys_are_reported(llama):
    def change(obj):
        obj["plans"][0]["layers"][0]["budget"] = 0
        obj["plans"][0]["layers"][1]["budgt"] = 3
    found = problems_of(mutate(llama, change))
    assert "$.plans[0].layers[0].budget: 0 is less than the minimum of 1" in found
    assert any(p.startswith("$.plans[0].layers[1]: Additional properties are not allowed ('budgt'") for p in found)


def test_sliding_window_layers_must_be_marked_where_the_model_has_them(gemma):
    def change(obj):
        layers = obj["plans"][0]["layers"]
        layers[0].update(policy="snapkv", params={}, budget=10, sliding_window=False)  # model: sliding
        layers[5].update(policy=None, params={}, budget=None, sliding_window=True)  # model: full
    found = problems_of(mutate(gemma, change))
    assert any(p.startswith("$.plans[0].layers[0] has a budget but model layer 0 is sliding_attention") for p in found)
    assert any(p.startswith("$.plans[0].layers[5] is marked sliding_window but model layer 5 is full_attention")
               for p in found)


def test_sliding_layer_with_a_budget_breaks_the_schema(gemma):
    def change(obj):
        obj["plans"][0]["layers"][0]["budget"] = 64
    found = problems_of(mutate(gemma, change))
    assert "$.plans[0].layers[0].budget: 64 is not of type 'null'" in found


def test_duplicate_budgets_in_a_ladder_are_reported(llama):
    plan = uniform_plan(llama, policy="snapkv", budget=64)
    obj = PlanFile.build(llama, [plan, plan]).to_dict()
    assert any("average_budget 64 repeats $.plans[0]" in p for p in problems_of(obj))


def test_newer_major_version_is_refused_with_one_problem(llama):
    obj = good_dict(llama)
    obj["schema_version"] = "3.0.0"
    assert problems_of(obj) == [("$.schema_version: 3.0.0 is not readable by this polykv-search, which reads 1.x.y "
                                 "and 2.x.y; upgrade polykv-search or write the plan with a matching version")]


def test_plan_for_another_model_says_to_re_run_optimize(llama, gemma):
    plan_file = PlanFile.build(llama, [uniform_plan(llama, policy="snapkv", budget=64)])
    found = problems_of(plan_file.to_dict(), model=gemma)
    for key in ("id", "revision", "num_layers", "num_kv_heads", "head_dim", "layer_types"):
        assert any(p.startswith(f"$.model.{key} is ") and "made for another model; re-run `polykv-search optimize` "
                   "with a profile of this model" in p for p in found), key
    assert any("$.plans[0].layers has 30 layers but model gemma3-270m has 18" in p for p in found)
    with pytest.raises(PlanError, match="made for another model"):
        check_matches_model(plan_file, gemma)
    check_matches_model(plan_file, llama)  # the right model passes


def test_same_geometry_other_revision_is_a_mismatch(llama):
    plan_file = PlanFile.build(llama, [uniform_plan(llama, policy="snapkv", budget=64)])
    other = llama_like(revision="f" * 64)
    with pytest.raises(InvalidPlanError) as info:
        check_matches_model(plan_file, other)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"$.model.revision is '{'a' * 64}'")


def test_every_problem_is_reported_at_once_on_one_line(llama, tmp_path):
    def change(obj):
        obj["plans"][0]["layers"][3]["budget"] += 1
        obj["plans"][0]["layers"][4]["policy"] = "nope"
        obj["plans"][0]["layers"][5]["params"] = {"bogus": 1}
        obj["plans"][0]["layers"].pop()
        del obj["plans"][0]["search"]["seed"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mutate(llama, change)))
    with pytest.raises(InvalidPlanError) as info:
        PlanFile.load(path)
    message, problems = str(info.value), info.value.problems
    assert "\n" not in message
    assert message.startswith(f"plan file {path} has {len(problems)} problems: ")
    assert len(problems) >= 5
    for fragment in ("'seed' is a required property", "layers has 29 layers", "'nope' is not a registered policy",
                     "no parameter 'bogus'", "compressible layers' budgets sum to"):
        assert fragment in message, fragment
    assert message.count("; ") >= len(problems) - 1


def test_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"schema_version": "1.0.0",\n  "plans": [}\n')
    with pytest.raises(PlanError, match=rf"plan file {path} is not JSON \(line 2 column 13: "):
        PlanFile.load(path)


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}'])
def test_non_finite_numbers_are_not_json(text):
    with pytest.raises(PlanError, match="is not JSON"):
        PlanFile.from_json(text)


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(PlanError, match="does not exist; write one with `polykv-search optimize`"):
        PlanFile.load(tmp_path / "absent.json")
    with pytest.raises(InvalidPlanError, match=r"has 1 problem: \$: a plan file is a JSON object"):
        PlanFile.from_json("[1, 2]")


def test_save_refuses_an_invalid_plan_and_writes_nothing(llama, tmp_path):
    plan = uniform_plan(llama, policy="snapkv", budget=64)
    layers = list(plan.layers)
    layers[0] = type(layers[0])(index=0, policy="snapkv", params=layers[0].params, budget=65)
    broken = PlanFile.build(llama, [Plan(constraint=plan.constraint, layers=layers, search=plan.search)])
    with pytest.raises(InvalidPlanError, match="budgets sum to 1921"):
        broken.save(tmp_path / "broken.json")
    assert list(tmp_path.iterdir()) == []


def test_nan_objective_cannot_be_serialised(llama):
    plan = uniform_plan(llama, policy="snapkv", budget=64)
    bad = Plan(constraint=plan.constraint, layers=plan.layers,
               search=SearchInfo(solver="dp", status="optimal", objective=float("nan")))
    with pytest.raises(PlanError, match="number JSON cannot store"):
        PlanFile.build(llama, [bad]).to_json()


# -- fuzz: the loader loads or raises PlanError, never anything else -------------------------------
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=12)
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
FIELD_NAMES = st.sampled_from(["schema_version", "producer", "model", "plans", "constraint", "layers", "search",
                               "index", "policy", "params", "budget", "sliding_window", "total", "total_realised",
                               "average_budget", "unit", "id", "layer_types", "num_layers", "solver", "seed"])
PYTHON_ODDITIES = st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, 1e308, -0.0, "", "\n"])


def _loads_or_plan_error(obj):
    try:
        loaded = PlanFile.from_dict(obj)
    except PlanError:
        return
    assert PlanFile.from_json(loaded.to_json()) == loaded


def _containers(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _containers(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _containers(value, path + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=JSONISH)
def test_fuzz_arbitrary_json(obj):
    _loads_or_plan_error(obj)
    try:
        PlanFile.from_json(json.dumps(obj))
    except PlanError:
        pass


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60) | st.binary(max_size=40))
def test_fuzz_arbitrary_text(text):
    try:
        PlanFile.from_json(text)
    except PlanError:
        pass


BASE_PLANS = [good_dict(llama_like(6)), good_dict(gemma_like())]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), base=st.sampled_from(range(len(BASE_PLANS))),
       steps=st.integers(1, 3))
def test_fuzz_mutated_valid_plans(data, base, steps):
    obj = copy.deepcopy(BASE_PLANS[base])
    for _ in range(steps):
        spots = list(_containers(obj))
        path, target = data.draw(st.sampled_from(spots))
        action = data.draw(st.sampled_from(["replace", "delete", "add", "oddity"]))
        value = data.draw(JSONISH if action != "oddity" else PYTHON_ODDITIES)
        if not path:
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if action in ("replace", "oddity"):
            parent[last] = value
        elif action == "delete":
            del parent[last]
        elif isinstance(target, dict):
            target[data.draw(FIELD_NAMES)] = value
        elif isinstance(target, list):
            target.append(value)
    found = validate_plan_json(obj, model=llama_like(6))
    assert all(isinstance(p, str) and len(p.splitlines()) == 1 for p in found)
    _loads_or_plan_error(obj)
