"""calibrate's slower mode: per-layer KL with only that layer compressed, checked against the evaluation engine
compressing the same layer, and used by the optimizer as a cost."""

import pytest
import torch

from polykv_search.calibration.profile import Profile
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.data import load_samples
from polykv_search.errors import ProfileError
from polykv_search.engine import PrefillEngine
from polykv_search.optimization import Problem, solve
from tests.conftest import sample_rows, write_jsonl
from tests.plans import plan_of

POLICIES = ("snapkv", "h2o", "streaming", "knorm")
BUDGETS = (8, 32, 1000)  # 1000 is above every context length: keeps everything


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from tests.conftest import tiny_loaded

    lm = tiny_loaded("llama")
    tmp = tmp_path_factory.mktemp("kl")
    samples = load_samples(write_jsonl(tmp / "c.jsonl", sample_rows(2, words=200)))
    config = CalibrationConfig(policies=POLICIES, budgets=BUDGETS, window=16, layer_kl=True)
    run = calibrate_model(lm, samples, config=config, out_dir=tmp / "out")
    return lm, samples, run


def test_layer_kl_is_stored_with_its_shape_and_round_trips(calibrated):
    lm, _, run = calibrated
    kl = run.profile.arrays["layer_kl"]
    assert kl.shape == (2, lm.info.num_layers, 1, len(POLICIES), len(BUDGETS))
    assert torch.isfinite(kl).all() and (kl >= -1e-5).all()
    assert (kl[..., 2] == 0).all()  # a budget above the context keeps everything
    assert (kl[..., 0] > 0).any()
    assert run.profile.header["options"]["cost_kinds"] == ["mass_lost", "out_err", "layer_kl", "layer_nll"]
    nll = run.profile.arrays["layer_nll"]
    assert nll.shape == kl.shape and torch.isfinite(nll).all() and (nll[..., 2] == 0).all()
    loaded = Profile.load(run.path)
    torch.testing.assert_close(loaded.arrays["layer_kl"], kl)
    torch.testing.assert_close(loaded.arrays["layer_nll"], nll)
    assert loaded.cost_kinds == ["mass_lost", "out_err", "layer_kl", "layer_nll"]


def test_layer_kl_and_nll_equal_the_engine_compressing_that_layer_alone(calibrated):
    lm, samples, run = calibrated
    engine = PrefillEngine(lm, scorers=POLICIES)
    kl, nll = run.profile.arrays["layer_kl"], run.profile.arrays["layer_nll"]
    for index, sample in enumerate(samples):
        state = engine.prefill(sample)
        for layer in lm.info.compressible_layers:
            for p, policy in enumerate(POLICIES):
                names, sizes = [None] * lm.info.num_layers, [None] * lm.info.num_layers
                names[layer], sizes[layer] = policy, BUDGETS[0]
                plan = plan_of(lm.info, names, sizes)
                result = engine.run(state, plan)
                assert kl[index, layer, 0, p, 0].item() == pytest.approx(result.kl, rel=1e-3, abs=1e-5)
                full, one = engine.answer_metrics_many(state, [engine.full_plan(), plan])
                assert nll[index, layer, 0, p, 0].item() == pytest.approx(one["nll"] - full["nll"], abs=1e-4)


def test_optimizer_takes_layer_kl_as_cost_and_explains_when_it_is_missing(calibrated, tiny_llama, tmp_path):
    _, _, run = calibrated
    problem = Problem.from_profile(run.profile, average_budget=16, cost="layer_kl")
    allocation = solve(problem, solver="dp")
    assert sum(allocation.budgets) == problem.total
    expected = run.profile.arrays["layer_kl"].mean(dim=(0, 2))
    torch.testing.assert_close(run.profile.layer_costs("layer_kl"), expected)
    plain = calibrate_model(tiny_llama, load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(1))),
                            config=CalibrationConfig(policies=POLICIES, budgets=BUDGETS, window=16),
                            out_dir=tmp_path / "plain").profile
    with pytest.raises(ProfileError, match="--layer-kl"):
        plain.layer_costs("layer_kl")


def test_sliding_window_layers_get_no_layer_kl(tiny_gemma, tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(1, words=200)))
    config = CalibrationConfig(policies=("snapkv", "streaming"), budgets=(8, 32), window=16, layer_kl=True)
    kl = calibrate_model(tiny_gemma, samples, config=config, out_dir=tmp_path / "g").profile.arrays["layer_kl"]
    sliding = [i for i, kind in enumerate(tiny_gemma.info.layer_types) if kind == "sliding_attention"]
    assert sliding and torch.isnan(kl[:, sliding]).all()
    assert torch.isfinite(kl[:, tiny_gemma.info.compressible_layers]).all()


def test_select_proposes_plans_from_every_cost_the_profile_holds(calibrated):
    from polykv_search.optimization.select import candidate_plans

    _, _, run = calibrated
    names = list(candidate_plans(run.profile, average=16))
    assert any(name.startswith("exact:layer_kl") for name in names)
    assert any(name.startswith("exact:mass_lost") for name in names)
