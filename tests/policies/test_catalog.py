"""The policy table is plain data (no torch, no kvpress) and says exactly what kvpress's presses accept."""

import dataclasses
import inspect
import typing

import kvpress
import pytest

from polykv_search.errors import ConfigError
from polykv_search.policies import POLICIES, check_policy_names, params_problems, policy_params, scorer_key
from polykv_search.policies.catalog import PRESS_PARAMETERS, RATIO_FIELD
from polykv_search.policies.presses import make_press


def kvpress_parameters(press: type) -> dict[str, tuple[object, object]]:
    """A kvpress press's own parameters: name -> (type hint, default); the ratio, private fields (CompactorPress's
    sub-presses, built in __post_init__) and a wrapper's `press` (the catalog's `inner`) left out."""
    if "__dataclass_fields__" in vars(press):  # decorated itself, not only a dataclass's subclass
        hints = typing.get_type_hints(press)
        return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(press)
                if f.init and f.name != RATIO_FIELD and not f.name.startswith("_")}
    hints = typing.get_type_hints(press.__init__)  # CriticalKVPress is a plain class
    return {p.name: (hints[p.name], p.default) for p in inspect.signature(press.__init__).parameters.values()
            if p.name not in ("self", "press", RATIO_FIELD)}


@pytest.mark.parametrize("press_name", sorted(PRESS_PARAMETERS))
def test_each_press_has_the_parameters_types_and_defaults_of_the_kvpress_dataclass(press_name):
    fields = kvpress_parameters(getattr(kvpress, press_name))
    assert set(fields) == set(PRESS_PARAMETERS[press_name])
    for name, (kinds, default) in PRESS_PARAMETERS[press_name].items():
        hint, kvpress_default = fields[name]
        assert kvpress_default == default, name
        options = typing.get_args(hint) or (hint,)
        assert set(options) == set(kinds), name


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_registered_parameters_build_the_press_and_are_all_written(name):
    params = policy_params(name)
    press = make_press(name)
    assert type(press).__name__ == POLICIES[name].press
    assert params == {key: getattr(press, key) for key in kvpress_parameters(type(press))}
    inner = POLICIES[name].inner
    if inner is not None:  # the wrapped scorer: every one of its parameters registered
        assert type(press.press).__name__ == inner
        assert POLICIES[name].inner_params == {key: getattr(press.press, key)
                                               for key in kvpress_parameters(type(press.press))}
    assert scorer_key(name, params) == name  # the registered ones name the policy alone


def test_other_parameters_are_another_ranking_and_bad_ones_are_named():
    assert scorer_key("snapkv", policy_params("snapkv", window_size=32)) == 'snapkv{"kernel_size": 5, "window_size": 32}'
    problems = params_problems("snapkv", {"window_size": "wide", "windw": 3, RATIO_FIELD: 0.5}, where="p")
    assert any("'wide' is not a valid int for SnapKVPress" in p for p in problems)
    assert any("has no parameter 'windw'" in p for p in problems)
    assert any("set from the layer budget" in p for p in problems)
    assert params_problems("random", {"seed": None}, where="p") == []  # Optional[int] takes null
    assert params_problems("expected_attention", {"epsilon": 1}, where="p") == []  # an int is a valid float
    with pytest.raises(ConfigError, match="has no parameter 'windw'"):
        policy_params("snapkv", windw=3)
    with pytest.raises(ConfigError, match="known policies"):
        check_policy_names(["snapkv", "nope"])


def test_a_literal_parameter_takes_its_values_only():
    assert params_problems("curdkv", {"leverage_type": "kv_avg"}, where="p") == []
    problems = params_problems("curdkv", {"leverage_type": "kv_sum"}, where="p")
    assert problems == ["p.leverage_type: 'kv_sum' is not accepted by CURPress; give one of 'key', 'value', 'kv_avg', "
                        "'kv_product'"]


def test_the_defaults_are_the_policies_registered_before_36():
    """Registering a kvpress scorer changes no default: calibrate, evaluate and the guard use these twelve."""
    from polykv_search.policies import DEFAULT_POLICIES

    assert len(DEFAULT_POLICIES) == 12 and set(DEFAULT_POLICIES) < set(POLICIES)
    assert not {"lagkv", "curdkv", "leverage", "noncausal_attention", "compactor", "capkv", "critical_snapkv",
                "critical_expected_attention"} & set(DEFAULT_POLICIES)
