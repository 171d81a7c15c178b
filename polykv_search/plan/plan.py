"""The plan file, version 1: frozen dataclasses for a ladder of per-layer plans and their JSON round trip.

    plan_file = PlanFile.load("outputs/plans/uniform-snapkv.json")    # validates; PlanError lists every problem
    plan = plan_file.plan_for(512)                                    # one average budget of the ladder
    plan.policies, plan.budgets                                       # per layer; None on sliding-window layers
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polykv_search import __version__
from polykv_search.errors import PlanError
from polykv_search.io import write_atomic
from polykv_search.models import ModelInfo
from polykv_search.plan.params import policy_params
from polykv_search.plan.rounding import budget_total
from polykv_search.plan.schema import SCHEMA_VERSION

PRODUCER_NAME = "polykv-search"
BUDGET_UNIT = "tokens per layer"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Producer:
    """The tool and version that wrote the file."""

    name: str = PRODUCER_NAME
    version: str = __version__


@dataclass(frozen=True)
class PlanModel:
    """The model a plan was made for: identity and the geometry a runtime must check before applying it."""

    id: str
    revision: str
    num_layers: int
    layer_types: tuple[str, ...]
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))

    @classmethod
    def from_info(cls, info: ModelInfo) -> PlanModel:
        return cls(id=info.model_id, revision=info.revision, num_layers=info.num_layers,
                   layer_types=tuple(info.layer_types), num_kv_heads=info.num_kv_heads, head_dim=info.head_dim)

    @property
    def compressible_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind != SLIDING]


@dataclass(frozen=True)
class Constraint:
    """The budget asked (average tokens per compressible layer) and the totals it implies and realises."""

    average_budget: float
    total: int
    total_realised: int
    unit: str = BUDGET_UNIT


@dataclass(frozen=True)
class LayerPlan:
    """One layer: keep `budget` context tokens ranked by `policy`; a sliding-window layer has neither."""

    index: int
    policy: str | None
    params: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    sliding_window: bool = False

    @classmethod
    def sliding(cls, index: int) -> LayerPlan:
        """A layer whose cache the architecture fixes (its window); it takes no part in the budget."""
        return cls(index=index, policy=None, params={}, budget=None, sliding_window=True)


@dataclass(frozen=True)
class SearchInfo:
    """Provenance: which solver found the plan, its status, objective, bound and gap, and from which profile."""

    solver: str
    status: str
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    profile_signature: str | None = None
    seed: int | None = None
    seconds: float | None = None
    notes: str | None = None


@dataclass(frozen=True)
class Plan:
    """A policy and budget for every layer at one average budget."""

    constraint: Constraint
    layers: tuple[LayerPlan, ...]
    search: SearchInfo

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def average_budget(self) -> float:
        return self.constraint.average_budget

    @property
    def budgets(self) -> list[int | None]:
        """Context tokens kept per layer; None on sliding-window layers."""
        return [layer.budget for layer in self.layers]

    @property
    def policies(self) -> list[str | None]:
        """Policy name per layer; None on sliding-window layers."""
        return [layer.policy for layer in self.layers]

    @classmethod
    def build(cls, model: ModelInfo | PlanModel, *, average_budget: float, policies: Sequence[str | None],
              budgets: Sequence[int | None], search: SearchInfo,
              params: Sequence[dict[str, Any]] | None = None) -> Plan:
        """A plan with its constraint filled in; sliding-window layers of `model` get no policy and no budget.

        `policies`, `budgets` and `params` have one entry per model layer (entries at sliding layers are ignored).
        """
        model = model if isinstance(model, PlanModel) else PlanModel.from_info(model)
        if not len(policies) == len(budgets) == model.num_layers or (params is not None and
                                                                     len(params) != model.num_layers):
            raise PlanError(f"Plan.build got {len(policies)} policies and {len(budgets)} budgets for "
                            f"{model.num_layers} layers of {model.id}; give one entry per layer")
        layers = []
        for i, kind in enumerate(model.layer_types):
            if kind == SLIDING:
                layers.append(LayerPlan.sliding(i))
                continue
            name = policies[i]
            layer_params = dict(params[i]) if params is not None else policy_params(name) if name else {}
            layers.append(LayerPlan(index=i, policy=name, params=layer_params, budget=budgets[i]))
        compressible = model.compressible_layers
        constraint = Constraint(average_budget=average_budget,
                                total=budget_total(average_budget, len(compressible)),
                                total_realised=sum(int(budgets[i] or 0) for i in compressible))
        return cls(constraint=constraint, layers=tuple(layers), search=search)

    def to_dict(self) -> dict[str, Any]:
        c, s = self.constraint, self.search
        search = {"solver": s.solver, "status": s.status, "objective": s.objective, "bound": s.bound,
                  "gap": s.gap, "profile_signature": s.profile_signature, "seed": s.seed, "seconds": s.seconds}
        if s.notes is not None:
            search["notes"] = s.notes
        return {
            "constraint": {"unit": c.unit, "average_budget": c.average_budget, "total": c.total,
                           "total_realised": c.total_realised},
            "layers": [{"index": layer.index, "policy": layer.policy, "params": dict(layer.params),
                        "budget": layer.budget, "sliding_window": layer.sliding_window} for layer in self.layers],
            "search": search,
        }

    @classmethod
    def _from_valid_dict(cls, data: dict[str, Any]) -> Plan:
        c, s = data["constraint"], data["search"]
        layers = tuple(LayerPlan(index=int(layer["index"]), policy=layer.get("policy"),
                                 params=dict(layer.get("params") or {}),
                                 budget=None if layer["budget"] is None else int(layer["budget"]),
                                 sliding_window=bool(layer.get("sliding_window", False)))
                       for layer in data["layers"])
        search = SearchInfo(solver=s["solver"], status=s["status"], objective=s["objective"], bound=s["bound"],
                            gap=s["gap"], profile_signature=s["profile_signature"],
                            seed=None if s["seed"] is None else int(s["seed"]), seconds=s["seconds"],
                            notes=s.get("notes"))
        constraint = Constraint(average_budget=c["average_budget"], total=int(c["total"]),
                                total_realised=int(c["total_realised"]), unit=c["unit"])
        return cls(constraint=constraint, layers=layers, search=search)


@dataclass(frozen=True)
class PlanFile:
    """A model and a ladder of plans for it (one per average budget): the file `optimize` writes."""

    model: PlanModel
    plans: tuple[Plan, ...]
    producer: Producer = field(default_factory=Producer)
    schema_version: str = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "plans", tuple(self.plans))

    @classmethod
    def build(cls, model: ModelInfo | PlanModel, plans: Sequence[Plan]) -> PlanFile:
        model = model if isinstance(model, PlanModel) else PlanModel.from_info(model)
        return cls(model=model, plans=tuple(plans))

    @property
    def budgets(self) -> list[float]:
        """The average budgets of the ladder, in file order."""
        return [plan.average_budget for plan in self.plans]

    def plan_for(self, average_budget: float) -> Plan:
        """The plan made for `average_budget` tokens per layer; PlanError names the budgets the file has."""
        for plan in self.plans:
            if plan.average_budget == average_budget:
                return plan
        raise PlanError(f"the plan file has no plan for average budget {average_budget}; its budgets: "
                        f"{', '.join(map(_fmt, self.budgets))}; use one of them or re-run optimize with "
                        f"--budget {_fmt(average_budget)}")

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "schema_version": self.schema_version,
            "producer": {"name": self.producer.name, "version": self.producer.version},
            "model": {"id": m.id, "revision": m.revision, "num_layers": m.num_layers,
                      "layer_types": list(m.layer_types), "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim},
            "plans": [plan.to_dict() for plan in self.plans],
        }

    def to_json(self) -> str:
        """Indented JSON with one line per layer entry, so a plan reads (and diffs) layer by layer."""
        try:
            return _dumps(self.to_dict(), level=0) + "\n"
        except ValueError as exc:  # NaN or infinity: JSON has no such numbers
            raise PlanError(f"the plan holds a number JSON cannot store ({exc}); give finite objective, "
                            "bound, gap and seconds, or None") from exc

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> PlanFile:
        """Validate a parsed plan file and build it; InvalidPlanError lists every problem found."""
        from polykv_search.plan.validate import InvalidPlanError, validate_plan_json

        problems = validate_plan_json(data)
        if problems:
            raise InvalidPlanError(source=source, problems=problems)
        m = data["model"]
        model = PlanModel(id=m["id"], revision=m["revision"], num_layers=int(m["num_layers"]),
                          layer_types=tuple(m["layer_types"]), num_kv_heads=int(m["num_kv_heads"]),
                          head_dim=int(m["head_dim"]))
        producer = Producer(name=data["producer"]["name"], version=data["producer"]["version"])
        return cls(model=model, plans=tuple(Plan._from_valid_dict(p) for p in data["plans"]),
                   producer=producer, schema_version=data["schema_version"])

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<string>") -> PlanFile:
        """Parse and validate plan JSON; PlanError for text that is not JSON or a plan with problems."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise PlanError(f"plan file {source} is not UTF-8 text (byte {exc.start}); "
                                "give a JSON plan written by polykv-search") from exc
        try:
            data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {source} is not JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                            "fix the file or write it again with polykv-search") from exc
        except _NotFinite as exc:
            raise PlanError(f"plan file {source} is not JSON ({exc} is not a JSON number); "
                            "replace it with a finite number or null") from exc
        except RecursionError as exc:
            raise PlanError(f"plan file {source} is nested too deeply to be a plan; "
                            "give a plan file written by polykv-search") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> PlanFile:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; write one with `polykv-search optimize` or "
                            "`polykv-search baseline`")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PlanError(f"plan file {path} cannot be read ({exc.strerror}); check its permissions") from exc
        return cls.from_json(raw, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Validate, then write atomically; an invalid plan is never written (InvalidPlanError instead)."""
        text = self.to_json()
        from polykv_search.plan.validate import InvalidPlanError, validate_plan_json

        problems = validate_plan_json(json.loads(text))
        if problems:
            raise InvalidPlanError(source=str(path), problems=problems)
        return write_atomic(path, text)


class _NotFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999 parses to infinity
        raise _NotFinite(text)
    return value


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _dumps(obj: Any, *, level: int, compact: bool = False) -> str:
    """json.dumps(indent=2), except that a layer entry (a dict in "layers") or a list of scalars stays on one line."""
    scalars_only = isinstance(obj, list) and not any(isinstance(v, (dict, list)) for v in obj)
    if compact or scalars_only or not isinstance(obj, (dict, list)) or not obj:
        return json.dumps(obj, allow_nan=False, separators=(", ", ": "))
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, list):
        items = [inner + _dumps(v, level=level + 1, compact=compact) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    items = []
    for key, value in obj.items():
        if key == "layers" and isinstance(value, list):
            body = ",\n".join(inner + "  " + _dumps(v, level=0, compact=True) for v in value)
            rendered = "[\n" + body + "\n" + inner + "]" if value else "[]"
        else:
            rendered = _dumps(value, level=level + 1)
        items.append(f"{inner}{json.dumps(key)}: {rendered}")
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
