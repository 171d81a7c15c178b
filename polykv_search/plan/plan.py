"""The plan file, version 1: frozen dataclasses for a ladder of per-layer plans and their JSON round trip.

    plan_file = PlanFile.load("outputs/plans/uniform-snapkv.json")    # validates; PlanError lists every problem
    plan = plan_file.plan_for(512)                                    # one average budget of the ladder
    plan.policies, plan.budgets                                       # per layer; None on sliding-window layers
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polykv_search import __version__
from polykv_search.errors import PlanError
from polykv_search.io import seal, write_atomic
from polykv_search.plan.rounding import budget_total
from polykv_search.plan.seal import check_plan_checksum
from polykv_search.plan.schema import (
    LENGTH_VERSION,
    QUESTION_VERSION,
    PER_HEAD_VERSION,
    PER_LAYER_VERSION,
    UNIT_PER_HEAD,
    UNIT_PER_LAYER,
)
from polykv_search.plan.validate import InvalidPlanError, check_matches_model, validate_plan_json
from polykv_search.policies.catalog import policy_params, scorer_key

if TYPE_CHECKING:
    from polykv_search.models.info import ModelInfo

PRODUCER_NAME = "polykv-search"
SLIDING = "sliding_attention"
# A prompt this many times longer than the longest context a rung was made on is "far longer": the runtime says so.
FAR_BEYOND_CALIBRATION = 1.25
# The largest plan file read: a ladder of 16 rungs for 128 layers x 64 KV heads per head takes about 10 MiB.
MAX_PLAN_BYTES = 16 * 2**20


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
    """The budget asked (average tokens per compressible layer, kept in each KV head) and the totals it implies and
    realises: in tokens per layer, or (a plan with per-head entries) in tokens per KV head, i.e. KV entries."""

    average_budget: float
    total: int
    total_realised: int
    unit: str = UNIT_PER_LAYER


@dataclass(frozen=True)
class HeadPlan:
    """One KV head of a layer: keep `budget` context tokens ranked by `policy` built with `params` (policy and
    budget None: the head keeps its whole context)."""

    policy: str | None
    params: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None

    @classmethod
    def of(cls, policy: str, budget: int, **params: Any) -> HeadPlan:
        """A head keeping `budget` tokens of `policy` with its registered parameters (`params` override)."""
        return cls(policy=policy, params=policy_params(policy, **params), budget=int(budget))

    @classmethod
    def full(cls) -> HeadPlan:
        """A head that keeps every context token."""
        return cls(policy=None, params={}, budget=None)

    @cached_property
    def scorer(self) -> str | None:
        """The ranking this head keeps tokens by: `policy`, or `policy{params}` when they are not the registered ones."""
        return None if self.policy is None else scorer_key(self.policy, self.params)


@dataclass(frozen=True)
class LayerPlan:
    """One layer: keep `budget` context tokens ranked by `policy` (built with `params`) in every KV head.

    A sliding-window layer has neither (the architecture fixes its cache). `heads`, when given, holds one entry
    per KV head and overrides the layer's own policy and budget head by head (in memory only until the plan file
    schema has per-head entries). A layer with no policy, no heads and no sliding window keeps its whole context:
    the engine's full-cache rows; such a layer is not a valid plan-file entry.
    """

    index: int
    policy: str | None
    params: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    sliding_window: bool = False
    heads: tuple[HeadPlan, ...] | None = None

    def __post_init__(self) -> None:
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(self.heads))

    @classmethod
    def of(cls, index: int, policy: str, budget: int, **params: Any) -> LayerPlan:
        """Layer `index` keeping `budget` tokens of `policy` with its registered parameters (`params` override)."""
        return cls(index=index, policy=policy, params=policy_params(policy, **params), budget=int(budget))

    @classmethod
    def sliding(cls, index: int) -> LayerPlan:
        """A layer whose cache the architecture fixes (its window); it takes no part in the budget."""
        return cls(index=index, policy=None, params={}, budget=None, sliding_window=True)

    @classmethod
    def full(cls, index: int) -> LayerPlan:
        """A compressible layer left uncompressed (it keeps every context token)."""
        return cls(index=index, policy=None, params={}, budget=None)

    @cached_property
    def scorer(self) -> str | None:
        """The ranking the layer keeps tokens by (None when it keeps everything or is a sliding window)."""
        return None if self.policy is None else scorer_key(self.policy, self.params)

    def head_choices(self, num_kv_heads: int) -> list[tuple[str, int] | None] | None:
        """(scorer, budget) per KV head, None for a head keeping everything; None when the layer keeps everything."""
        if self.sliding_window:
            return None
        if self.heads is not None:
            if len(self.heads) != num_kv_heads:
                raise PlanError(f"layer {self.index} has {len(self.heads)} head entries but the model has "
                                f"{num_kv_heads} KV heads; give one entry per KV head")
            return [None if head.policy is None or head.budget is None else (head.scorer, int(head.budget))
                    for head in self.heads]
        if self.policy is None or self.budget is None:
            return None
        return [(self.scorer, int(self.budget))] * num_kv_heads


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
class ContextRange:
    """The prompt lengths a rung serves, in context tokens compressed at prefill (`min_tokens` to `max_tokens`, None:
    any longer prompt), and the shortest and longest calibration contexts it was made and guarded on. `strict`: a
    prompt outside [min_tokens, max_tokens] is refused instead of served by the nearest rung."""

    min_tokens: int = 0
    max_tokens: int | None = None
    calibrated: tuple[int, int] | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.calibrated is not None:
            object.__setattr__(self, "calibrated", (int(self.calibrated[0]), int(self.calibrated[1])))

    def holds(self, tokens: int) -> bool:
        return self.min_tokens <= tokens and (self.max_tokens is None or tokens <= self.max_tokens)

    def distance(self, tokens: int) -> int:
        """How many tokens `tokens` lies outside the range (0 inside)."""
        if tokens < self.min_tokens:
            return self.min_tokens - tokens
        return 0 if self.max_tokens is None or tokens <= self.max_tokens else tokens - self.max_tokens

    def far_beyond(self, tokens: int) -> bool:
        """Whether `tokens` is far longer than any context the rung was made on (FAR_BEYOND_CALIBRATION)."""
        return self.calibrated is not None and tokens > self.calibrated[1] * FAR_BEYOND_CALIBRATION

    def describe(self) -> str:
        span = f"{self.min_tokens}+" if self.max_tokens is None else f"{self.min_tokens}-{self.max_tokens}"
        made = f", made on {self.calibrated[0]}-{self.calibrated[1]}" if self.calibrated else ""
        return f"{span} tokens{made}"

    def to_dict(self) -> dict[str, Any]:
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens,
                "calibrated": None if self.calibrated is None else list(self.calibrated), "strict": self.strict}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextRange:
        made = data.get("calibrated")
        return cls(min_tokens=int(data.get("min_tokens", 0)),
                   max_tokens=None if data.get("max_tokens") is None else int(data["max_tokens"]),
                   calibrated=None if made is None else (int(made[0]), int(made[1])),
                   strict=bool(data.get("strict", False)))


@dataclass(frozen=True)
class Plan:
    """A policy and budget for every layer at one average budget (and, optionally, for one range of prompt
    lengths: `context`; None serves every length)."""

    constraint: Constraint
    layers: tuple[LayerPlan, ...]
    search: SearchInfo
    context: ContextRange | None = None

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

    @property
    def scorers(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Every ranking the plan keeps tokens by: scorer key -> (policy, params)."""
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for layer in self.layers:
            for entry in (layer.heads or ()) + ((layer,) if layer.policy is not None else ()):
                if entry.policy is not None:
                    found.setdefault(entry.scorer, (entry.policy, dict(entry.params)))
        return found

    @classmethod
    def build(cls, model: ModelInfo | PlanModel, *, layers: Iterable[LayerPlan], search: SearchInfo,
              average_budget: float | None = None) -> Plan:
        """A plan from entries for the compressible layers of `model`, in any order; sliding-window layers are
        filled in. The constraint counts the budgets; `average_budget` None takes their mean (engine plans).
        """
        model = model if isinstance(model, PlanModel) else PlanModel.from_info(model)
        given: dict[int, LayerPlan] = {}
        for layer in layers:
            if not 0 <= layer.index < model.num_layers:
                raise PlanError(f"layer index {layer.index} is outside {model.id}'s {model.num_layers} layers")
            if layer.index in given:
                raise PlanError(f"layer {layer.index} is given twice; give one entry per layer")
            given[layer.index] = layer
        entries = []
        for i, kind in enumerate(model.layer_types):
            entry = given.get(i)
            if kind == SLIDING:
                if entry is not None and not entry.sliding_window:
                    raise PlanError(f"layer {i} of {model.id} is a sliding-window layer, fixed by the architecture; "
                                    "leave it out of the plan")
                entries.append(LayerPlan.sliding(i))
            elif entry is None or entry.sliding_window:
                raise PlanError(f"layer {i} of {model.id} has no entry; give every compressible layer a policy and "
                                "a budget (LayerPlan.full keeps its whole context)")
            else:
                entries.append(entry)
        compressible = model.compressible_layers
        per_head = any(entries[i].heads is not None for i in compressible)
        slots = len(compressible) * (model.num_kv_heads if per_head else 1)  # what the budget is counted over
        realised = sum(_tokens(entries[i], model.num_kv_heads if per_head else 1) for i in compressible)
        if average_budget is None:
            average_budget = realised / max(slots, 1)
        constraint = Constraint(average_budget=average_budget, total=budget_total(average_budget, slots),
                                total_realised=realised, unit=UNIT_PER_HEAD if per_head else UNIT_PER_LAYER)
        return cls(constraint=constraint, layers=tuple(entries), search=search)

    def kept_key(self) -> str:
        """What the plan keeps, as text: every layer's (and head's) policy, parameters and budget. Two plans with
        the same key keep the same tokens of every prompt, whatever their provenance and notes say."""
        return json.dumps([_layer_dict(layer) for layer in self.layers], sort_keys=True, default=str)

    @property
    def per_head(self) -> bool:
        """Whether some layer gives its KV heads budgets of their own."""
        return any(layer.heads is not None for layer in self.layers)

    @classmethod
    def full(cls, model: ModelInfo | PlanModel) -> Plan:
        """Every layer keeps its whole context: the reference every plan is measured against."""
        model = model if isinstance(model, PlanModel) else PlanModel.from_info(model)
        return cls.build(model, layers=[LayerPlan.full(i) for i in model.compressible_layers],
                         search=SearchInfo(solver="full", status="reference"), average_budget=0.0)

    def to_dict(self) -> dict[str, Any]:
        c, s = self.constraint, self.search
        search = {"solver": s.solver, "status": s.status, "objective": s.objective, "bound": s.bound,
                  "gap": s.gap, "profile_signature": s.profile_signature, "seed": s.seed, "seconds": s.seconds}
        if s.notes is not None:
            search["notes"] = s.notes
        out = {
            "constraint": {"unit": c.unit, "average_budget": c.average_budget, "total": c.total,
                           "total_realised": c.total_realised},
            "layers": [_layer_dict(layer) for layer in self.layers],
            "search": search,
        }
        if self.context is not None:
            out["context"] = self.context.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A ladder entry as `to_dict` writes it (checked only as part of a whole file: `PlanFile.from_dict`)."""
        c, s = data["constraint"], data["search"]
        layers = tuple(LayerPlan(index=int(layer["index"]), policy=layer.get("policy"),
                                 params=dict(layer.get("params") or {}),
                                 budget=None if layer["budget"] is None else int(layer["budget"]),
                                 sliding_window=bool(layer.get("sliding_window", False)),
                                 heads=None if layer.get("heads") is None else tuple(
                                     HeadPlan(policy=h.get("policy"), params=dict(h.get("params") or {}),
                                              budget=None if h.get("budget") is None else int(h["budget"]))
                                     for h in layer["heads"]))
                       for layer in data["layers"])
        search = SearchInfo(solver=s["solver"], status=s["status"], objective=s["objective"], bound=s["bound"],
                            gap=s["gap"], profile_signature=s["profile_signature"],
                            seed=None if s["seed"] is None else int(s["seed"]), seconds=s["seconds"],
                            notes=s.get("notes"))
        constraint = Constraint(average_budget=c["average_budget"], total=int(c["total"]),
                                total_realised=int(c["total_realised"]), unit=c["unit"])
        context = None if data.get("context") is None else ContextRange.from_dict(data["context"])
        return cls(constraint=constraint, layers=layers, search=search, context=context)


@dataclass(frozen=True)
class PlanFile:
    """A model and a ladder of plans for it (one per average budget): the file `optimize` writes.
    `question_aware`: made for prompts whose question is compressed with the context (kvpress's
    `compress_questions`); False, the default: the question follows the compressed cache (query-agnostic)."""

    model: PlanModel
    plans: tuple[Plan, ...]
    producer: Producer = field(default_factory=Producer)
    schema_version: str = ""  # "": the lowest version that holds the plans (1.0.0 unless one is per head)
    question_aware: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "plans", tuple(self.plans))
        if not self.schema_version:
            version = QUESTION_VERSION if self.question_aware else \
                LENGTH_VERSION if any(plan.context is not None for plan in self.plans) else \
                PER_HEAD_VERSION if any(plan.per_head for plan in self.plans) else PER_LAYER_VERSION
            object.__setattr__(self, "schema_version", version)

    @classmethod
    def build(cls, model: ModelInfo | PlanModel, plans: Sequence[Plan], *, question_aware: bool = False) -> PlanFile:
        model = model if isinstance(model, PlanModel) else PlanModel.from_info(model)
        return cls(model=model, plans=tuple(plans), question_aware=question_aware)

    @property
    def setting(self) -> str:
        """The prompting setting the plan was made for, in words."""
        return setting_name(self.question_aware)

    @property
    def budgets(self) -> list[float]:
        """The average budgets of the ladder, in file order (each once: a budget may have a rung per length)."""
        return list(dict.fromkeys(plan.average_budget for plan in self.plans))

    @property
    def by_length(self) -> bool:
        """Whether some budget has rungs for several ranges of prompt lengths (the runtime picks by length)."""
        return len(self.plans) > len(self.budgets)

    def rungs_for(self, average_budget: float) -> list[Plan]:
        """Every rung made for `average_budget` (one per range of prompt lengths), shortest range first."""
        rungs = [plan for plan in self.plans if plan.average_budget == average_budget]
        if not rungs:
            raise PlanError(f"the plan file has no plan for average budget {average_budget}; its budgets: "
                            f"{', '.join(map(_fmt, self.budgets))}; use one of them or re-run optimize with "
                            f"--budget {_fmt(average_budget)}")
        return sorted(rungs, key=lambda p: p.context.min_tokens if p.context else 0)

    def plan_for(self, average_budget: float, context_tokens: int | None = None) -> Plan:
        """The plan made for `average_budget` tokens per layer (and, where the file has a rung per range of prompt
        lengths, for a prompt of `context_tokens`); PlanError names the budgets or lengths the file has."""
        return rung_for_length(self.rungs_for(average_budget), context_tokens)

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        m = self.model
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "producer": {"name": self.producer.name, "version": self.producer.version},
            "model": {"id": m.id, "revision": m.revision, "num_layers": m.num_layers,
                      "layer_types": list(m.layer_types), "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim},
        }
        if self.question_aware:  # absent: query-agnostic, what every file before 2.2 means
            out["question_aware"] = True
        out["plans"] = [plan.to_dict() for plan in self.plans]
        return out

    def to_json(self) -> str:
        """Indented JSON with one line per layer entry, so a plan reads (and diffs) layer by layer; sealed with the
        checksum of its content (plan/seal.py)."""
        try:
            return _dumps(seal(self.to_dict()), level=0) + "\n"
        except ValueError as exc:  # NaN or infinity: JSON has no such numbers
            raise PlanError(f"the plan holds a number JSON cannot store ({exc}); give finite objective, "
                            "bound, gap and seconds, or None") from exc

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> PlanFile:
        """Validate a parsed plan file and build it; InvalidPlanError lists every problem found."""
        problems = validate_plan_json(data)
        if problems:
            raise InvalidPlanError(source=source, problems=problems)
        m = data["model"]
        model = PlanModel(id=m["id"], revision=m["revision"], num_layers=int(m["num_layers"]),
                          layer_types=tuple(m["layer_types"]), num_kv_heads=int(m["num_kv_heads"]),
                          head_dim=int(m["head_dim"]))
        producer = Producer(name=data["producer"]["name"], version=data["producer"]["version"])
        return cls(model=model, plans=tuple(Plan.from_dict(p) for p in data["plans"]),
                   producer=producer, schema_version=data["schema_version"],
                   question_aware=bool(data.get("question_aware", False)))

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<string>", require_checksum: bool = False) -> PlanFile:
        """Parse and validate plan JSON; PlanError for text that is not JSON, a plan with problems, or a checksum
        that does not match (or, with `require_checksum`, none)."""
        data = cls._parse(text, source=source)
        plan_file = cls.from_dict(data, source=source)
        check_plan_checksum(data, source=source, required=require_checksum)
        return plan_file

    @classmethod
    def _parse(cls, text: str | bytes, *, source: str) -> Any:
        if len(text) > MAX_PLAN_BYTES:
            raise PlanError(f"plan file {source} is {len(text) / 2**20:.1f} MiB, more than the "
                            f"{MAX_PLAN_BYTES // 2**20} MiB any plan needs; it is not a plan file")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise PlanError(f"plan file {source} is not UTF-8 text (byte {exc.start}); "
                                "give a JSON plan written by polykv-search") from exc
        try:
            return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {source} is not JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                            "fix the file or write it again with polykv-search") from exc
        except _NotFinite as exc:
            raise PlanError(f"plan file {source} is not JSON ({exc} is not a JSON number); "
                            "replace it with a finite number or null") from exc
        except RecursionError as exc:
            raise PlanError(f"plan file {source} is nested too deeply to be a plan; "
                            "give a plan file written by polykv-search") from exc

    @classmethod
    def load(cls, path: str | Path, *, require_checksum: bool = True) -> PlanFile:
        """Read, validate and check a plan file: a plan without its checksum is refused unless `require_checksum`
        is False (`validate --seal` reads hand-written plans so)."""
        return cls.from_json(cls._read(path), source=str(path), require_checksum=require_checksum)

    @classmethod
    def parsed(cls, path: str | Path) -> Any:
        """The plan file's JSON as it is, unvalidated (what `validate --seal` seals)."""
        return cls._parse(cls._read(path), source=str(path))

    @staticmethod
    def _read(path: str | Path) -> bytes:
        path = Path(path)
        if path.is_dir():
            raise PlanError(f"plan file {path} is a folder; give a plan file in it (a .json written by "
                            "`polykv-search optimize`)")
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; write one with `polykv-search optimize` or "
                            "`polykv-search baseline`")
        try:
            size = path.stat().st_size
            if size > MAX_PLAN_BYTES:  # refused before reading: a huge file would take gigabytes to parse
                raise PlanError(f"plan file {path} is {size / 2**20:.1f} MiB, more than the "
                                f"{MAX_PLAN_BYTES // 2**20} MiB any plan needs; it is not a plan file")
            return path.read_bytes()
        except OSError as exc:
            raise PlanError(f"plan file {path} cannot be read ({exc.strerror}); check its permissions") from exc

    def check_model(self, model: ModelInfo) -> None:
        """Raise InvalidPlanError unless this file was made for `model` (identity, geometry, layer types)."""
        check_matches_model(self, model)

    def save(self, path: str | Path) -> Path:
        """Validate, then write atomically; an invalid plan is never written (InvalidPlanError instead)."""
        text = self.to_json()
        problems = validate_plan_json(json.loads(text))
        if problems:
            raise InvalidPlanError(source=str(path), problems=problems)
        return write_atomic(path, text)


def setting_name(question_aware: bool) -> str:
    """'question-aware' (the question compressed with the context) or 'query-agnostic' (asked after compression)."""
    return "question-aware" if question_aware else "query-agnostic"


def distinct_plans(plans: Sequence[Plan], tags: Sequence[Any] | None = None) -> tuple[list[Plan], list[int]]:
    """The distinct plans (by `Plan.kept_key`, and by `tags[i]` where given: e.g. whether a plan runs as
    TensorRT-LLM's windows) and, per plan, the index of its twin among them: identical plans are answered once."""
    distinct: list[Plan] = []
    which: list[int] = []
    seen: dict[tuple[str, Any], int] = {}
    for i, plan in enumerate(plans):
        key = (plan.kept_key(), None if tags is None else tags[i])
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(plan)
        which.append(seen[key])
    return distinct, which


def rung_for_length(rungs: Sequence[Plan], context_tokens: int | None) -> Plan:
    """The rung of `rungs` (one budget's, one per range of prompt lengths) that serves a prompt of `context_tokens`:
    the one whose range holds it, else the nearest (PlanError where that rung is strict). Without a length, a lone
    rung; PlanError when there are several to choose from."""
    if context_tokens is None:
        if len(rungs) > 1:
            raise PlanError(f"the plan has {len(rungs)} rungs at average budget {_fmt(rungs[0].average_budget)}, one "
                            f"per range of prompt lengths ({'; '.join(_range(p) for p in rungs)}); give the prompt's "
                            "context length (--context-tokens) to pick one")
        return rungs[0]
    chosen = min(rungs, key=lambda p: p.context.distance(context_tokens) if p.context else 0)
    if chosen.context is not None and chosen.context.strict and not chosen.context.holds(context_tokens):
        raise PlanError(f"a prompt of {context_tokens} context tokens is outside the lengths this plan serves at "
                        f"average budget {_fmt(chosen.average_budget)} ({'; '.join(_range(p) for p in rungs)}) and "
                        "the plan is strict about them; shorten the prompt or re-run with calibration data of "
                        "that length")
    return chosen


def _range(plan: Plan) -> str:
    return "every length" if plan.context is None else plan.context.describe()


def _tokens(layer: LayerPlan, heads: int) -> int:
    """Context tokens a compressible layer's entry keeps, counted over `heads` KV heads (1: per layer)."""
    if layer.heads is not None:
        return sum(int(head.budget or 0) for head in layer.heads)
    return int(layer.budget or 0) * heads


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    entry = {"index": layer.index, "policy": layer.policy, "params": dict(layer.params), "budget": layer.budget,
             "sliding_window": layer.sliding_window}
    if layer.heads is not None:
        entry["heads"] = [{"policy": h.policy, "params": dict(h.params), "budget": h.budget} for h in layer.heads]
    return entry


def load_plan(path: str | Path, *, model: ModelInfo | None = None) -> PlanFile:
    """Read and validate a plan file; with `model` (a ModelInfo), also check it was made for that model.

    Needs neither torch nor kvpress: another engine's tooling can validate plans with only `jsonschema`.
    InvalidPlanError lists every problem found.
    """
    plan_file = PlanFile.load(path)
    if model is not None:
        plan_file.check_model(model)
    return plan_file


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


def plan_json_text(obj: dict[str, Any]) -> str:
    """A parsed plan file as polykv-search writes it: indented, one line per layer entry."""
    return _dumps(obj, level=0) + "\n"


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
