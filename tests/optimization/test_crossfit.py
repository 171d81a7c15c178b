"""Cross-fitting: folds spread each task, and each fold's plan is the one optimized on the other folds only."""

from __future__ import annotations

import pytest
import torch

from polykv_search.calibration.profile import HEAD_FISHER
from polykv_search.errors import ConfigError, ProfileError
from polykv_search.optimization.crossfit import fold_plans, task_folds
from polykv_search.optimization.run import OptimizeConfig, optimize_profile
from tests.plan.factories import llama_like, make_profile


def test_folds_deal_each_task_in_turn_and_leave_no_fold_empty():
    assert task_folds(["a", "a", "a", "b", "b", "c"], 2) == [0, 1, 0, 1, 0, 1]
    assert task_folds(["a", "b", "c"], 2) == [0, 1, 0]  # one sample a task: still two non-empty folds
    assert task_folds(["a", "b", "a", "b"], 2) == [0, 0, 1, 1]  # grouped by task whatever the file order
    assert task_folds(["x"] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]


def test_subset_keeps_each_array_and_sample_record_of_the_chosen_samples():
    profile = make_profile(llama_like(4), entropy=[0.1] * 4, variance=[0.2] * 4, samples=5)
    part = profile.subset([3, 1])
    assert part.num_samples == 2 and [s["id"] for s in part.header["samples"]] == ["s3", "s1"]
    assert torch.equal(part.arrays["mass_lost"], profile.arrays["mass_lost"][[3, 1]])
    assert part.header["model"] == profile.header["model"]
    with pytest.raises(ProfileError, match="not a non-empty subset"):
        profile.subset([5])


def head_profile(samples: int):
    """A per-head profile where sample i's costs sit on KV head (i % 3) of layer 0: each fold's plan protects the
    heads its own samples need."""
    info = llama_like(2)
    profile = make_profile(info, entropy=[0.1] * 2, variance=[0.2] * 2, samples=samples,
                           policies=("snapkv", "streaming"), budgets=(16, 64, 256))
    costs = torch.zeros(samples, 2, 3, 2, 3)
    for i in range(samples):
        costs[i, 0, i % 3, :, 0] = 1.0 + i  # only the lowest budget of that head costs anything
    profile.arrays[HEAD_FISHER] = costs
    for i, record in enumerate(profile.header["samples"]):
        record["task"] = "t"
    return profile


def test_each_fold_plan_is_the_plan_optimized_without_that_fold():
    profile = head_profile(4)  # folds: samples 0, 2 -> fold 0; samples 1, 3 -> fold 1
    config = OptimizeConfig(cost=HEAD_FISHER)
    fold_of, files = fold_plans(profile, [32], config=config)
    assert fold_of == {"s0": 0, "s1": 1, "s2": 0, "s3": 1}
    for k, trained_on in ((0, [1, 3]), (1, [0, 2])):
        alone = optimize_profile(profile.subset(trained_on), [32], config=config)
        assert files[k].plans[0].layers == alone.plans[0].layers
    # 32 a head is two heads at 64 and four at 16: each fold's plan protects the heads its training samples need
    assert [h.budget for h in files[0].plans[0].layers[0].heads] == [64, 64, 16]  # samples 1, 3: heads 1, 0
    assert [h.budget for h in files[1].plans[0].layers[0].heads] == [64, 16, 64]  # samples 0, 2: heads 0, 2


def test_cross_fitting_refuses_what_it_cannot_split():
    profile = head_profile(4)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        fold_plans(profile, [32], config=OptimizeConfig(cost=HEAD_FISHER), folds=1)
    with pytest.raises(ConfigError, match="cannot be split into 5 folds"):
        fold_plans(profile, [32], config=OptimizeConfig(cost=HEAD_FISHER), folds=5)
    with pytest.raises(ConfigError, match="cross-fit plans solved from the profile"):
        fold_plans(profile, [32], config=OptimizeConfig(solver="select", cost="mass_lost"))
    del profile.header["samples"][0]["id"]
    with pytest.raises(ConfigError, match="does not name each of its samples"):
        fold_plans(profile, [32], config=OptimizeConfig(cost=HEAD_FISHER))


def test_fold_solves_log_one_line_not_one_per_budget_and_fold(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="polykv_search")
    fold_plans(head_profile(4), [16, 32], config=OptimizeConfig(cost=HEAD_FISHER))
    messages = [r.getMessage() for r in caplog.records]
    assert not any("optimal objective" in m for m in messages), messages
    assert messages == ["guard: 2 fold plans optimized, each without its fold's calibration samples"]
    assert logging.getLogger("polykv_search.optimization").level == logging.NOTSET  # restored
