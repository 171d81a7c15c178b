"""A policy's press parameters as written in a plan: the full JSON set, and the check that a press accepts them."""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any

from polykv_search.policies import POLICIES, check_policy_names, make_press

RATIO_FIELD = "compression_ratio"  # set from each layer's budget at run time, never stored in a plan


def policy_params(name: str, **overrides: Any) -> dict[str, Any]:
    """Every keyword of the policy's kvpress press with the registered values (and `overrides`), ratio excluded.

    Writing the full set, not only the registry's overrides, keeps a plan's meaning fixed if defaults change.
    """
    check_policy_names([name])
    press = make_press(name, **overrides)
    return {f.name: getattr(press, f.name) for f in dataclasses.fields(press) if f.name != RATIO_FIELD}


def params_problems(name: str, params: dict[str, Any], *, where: str) -> list[str]:
    """Problems with `params` for registered policy `name` (unknown keys, wrong types, rejected values)."""
    spec = POLICIES[name]
    fields = _press_fields(spec.press)
    problems = []
    for key, value in params.items():
        if key == RATIO_FIELD:
            problems.append(f"{where}.{key}: {RATIO_FIELD} is set from the layer budget at run time; remove it")
        elif key not in fields:
            accepted = ", ".join(sorted(fields)) or "none"
            problems.append(f"{where}: {spec.press.__name__} (policy {name!r}) has no parameter {key!r}; "
                            f"its parameters: {accepted}")
        elif not _accepts(fields[key], value):
            problems.append(f"{where}.{key}: {value!r} is not a valid {_kind_name(fields[key])} for "
                            f"{spec.press.__name__}; give a {_kind_name(fields[key])}")
    if not problems:
        try:
            spec.press(**{RATIO_FIELD: 0.0}, **params)
        except Exception as exc:  # noqa: BLE001 (a press may reject values in __post_init__ with any type)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            problems.append(f"{where}: {spec.press.__name__} rejects {params!r} ({reason}); fix the values")
    return problems


@cache
def _press_fields(press: type) -> dict[str, tuple[type, ...] | None]:
    """Each init field of a press -> the scalar types it accepts (None: unknown, accept any scalar)."""
    hints = _hints(press)
    out = {}
    for field in dataclasses.fields(press):
        if not field.init or field.name == RATIO_FIELD:
            continue
        out[field.name] = _scalar_types(hints.get(field.name, field.type), field.default)
    return out


def _hints(press: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(press)
    except Exception:  # noqa: BLE001 (unresolvable forward references: use the default values' types)
        return {}


def _scalar_types(hint: Any, default: Any) -> tuple[type, ...] | None:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = tuple(t for t in options if t in (bool, int, float, str, type(None)))
    if kinds and len(kinds) == len(options):
        return kinds
    if default is not dataclasses.MISSING and type(default) in (bool, int, float, str):
        return (type(default),)
    return None


def _accepts(kinds: tuple[type, ...] | None, value: Any) -> bool:
    if kinds is None:
        return True
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return any(isinstance(value, kind) for kind in kinds if kind is not bool)


def _kind_name(kinds: tuple[type, ...] | None) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds or ())
