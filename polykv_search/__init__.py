"""polykv-search: choose a KV-cache eviction policy and token budget for every layer of a causal LM.

    import polykv_search as pk
    result = pk.run("smollm2-135m", budgets=[128, 256])   # calibrate -> optimize -> evaluate
    result.report.recovery_of("plan")

The stages (`calibrate`, `optimize`, `evaluate`, `run`, `choose`) and the types they return are importable from
here. They are loaded on first use: `polykv_search.plan` (read and validate plan files) needs neither torch nor
kvpress, and importing this package must not pull them in for it.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())  # a library logs; the application decides what shows

# public name -> the module that defines it (imported lazily by __getattr__, see the docstring)
_EXPORTS = {
    "calibrate": "polykv_search.api", "optimize": "polykv_search.api", "evaluate": "polykv_search.api",
    "run": "polykv_search.api", "choose": "polykv_search.api",
    "guard_plan": "polykv_search.optimization.guard", "GuardResult": "polykv_search.optimization.guard",
    "GuardRung": "polykv_search.optimization.guard",
    "check_proxy": "polykv_search.api",
    "RunResult": "polykv_search.api", "ChooseResult": "polykv_search.api",
    "CalibrationConfig": "polykv_search.calibration", "CalibrationRun": "polykv_search.calibration",
    "Profile": "polykv_search.calibration",
    "merge_profiles": "polykv_search.calibration.merge", "Shard": "polykv_search.calibration.shards",
    "OptimizeConfig": "polykv_search.optimization.run",
    "Report": "polykv_search.evaluation", "Recovery": "polykv_search.evaluation",
    "load_model": "polykv_search.models", "LoadedModel": "polykv_search.models", "ModelInfo": "polykv_search.models",
    "load_samples": "polykv_search.data", "Sample": "polykv_search.data",
    "load_plan": "polykv_search.plan", "PlanFile": "polykv_search.plan", "Plan": "polykv_search.plan",
    "LayerPlan": "polykv_search.plan", "HeadPlan": "polykv_search.plan", "uniform_plan": "polykv_search.plan",
    "PlanPress": "polykv_search.runtime", "apply_plan": "polykv_search.runtime",
    "polykv_attention": "polykv_search.runtime",
    "PolykvError": "polykv_search.errors",
    "ContextRange": "polykv_search.plan", "by_length": "polykv_search.optimization.lengths",
    "length_ranges": "polykv_search.optimization.lengths", "LengthRun": "polykv_search.optimization.lengths",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'polykv_search' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from polykv_search.api import ChooseResult, RunResult, calibrate, check_proxy, choose, evaluate, optimize, run
    from polykv_search.calibration import CalibrationConfig, CalibrationRun, Profile
    from polykv_search.calibration.merge import merge_profiles
    from polykv_search.calibration.shards import Shard
    from polykv_search.data import Sample, load_samples
    from polykv_search.errors import PolykvError
    from polykv_search.evaluation import Recovery, Report
    from polykv_search.models import LoadedModel, ModelInfo, load_model
    from polykv_search.optimization.guard import GuardResult, GuardRung, guard_plan
    from polykv_search.optimization.run import OptimizeConfig
    from polykv_search.optimization.lengths import LengthRun, by_length, length_ranges
    from polykv_search.plan import ContextRange, HeadPlan, LayerPlan, Plan, PlanFile, load_plan, uniform_plan
    from polykv_search.runtime import PlanPress, apply_plan, polykv_attention
