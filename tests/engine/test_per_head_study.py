"""benchmarks/per_head_study.py on a tiny model: its probes are the engine's KL of one head compressed, its DP plan
spends exactly the budget over the KV heads, and it is a valid schema-2 plan file that PlanPress runs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.plan import PlanFile, load_plan
from polykv_search.runtime import PlanPress
from tests.conftest import sample_rows, tiny_loaded, write_jsonl

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("per_head_study", BENCHMARKS / "per_head_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

POLICIES, GRID = ["snapkv", "streaming"], [4, 16, 64]


def test_probes_plan_and_file(tmp_path):
    lm = tiny_loaded("llama")
    sample = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(1, words=200)))[0]
    engine = PrefillEngine(lm, scorers=POLICIES)
    state = engine.prefill(sample)
    heads = lm.info.num_kv_heads
    costs = study.probe_sample(engine, state, POLICIES, GRID, heads)  # (layers x heads, P, G)
    assert costs.shape == (len(lm.info.compressible_layers) * heads, len(POLICIES), len(GRID))
    one = study.per_head_plan(lm.info, {1: [study.HeadPlan.of("snapkv", 4), study.HeadPlan.full()]})
    assert costs[1 * heads + 0, 0, 0].item() == pytest.approx(engine.run(state, one).kl, rel=1e-3, abs=1e-5)
    plan, _ = study.head_plan(lm.info, costs.numpy().astype(np.float64), POLICIES, GRID, 16, heads)
    assert plan.per_head and plan.constraint.total == plan.constraint.total_realised == 16 * costs.shape[0]
    path = PlanFile.build(lm.info, [plan]).save(tmp_path / "per_head.json")
    loaded = load_plan(path, model=lm.info).plans[0]
    cache_press = PlanPress(loaded)
    with torch.no_grad(), cache_press(lm.model):
        lm.model.model(input_ids=torch.tensor([state.parts.context_ids]))
    assert set(cache_press.kept_indices) == set(lm.info.compressible_layers)
