"""The guard's lead interval: a paired bootstrap within tasks of one candidate's per-sample loss against another's."""

import pytest

from polykv_search.optimization.lead import paired_lead

TASKS = {"a1": "a", "a2": "a", "a3": "a", "b1": "b"}


def test_a_constant_lead_has_no_spread_and_tasks_weigh_the_same():
    kept = {"a1": 0.2, "a2": 0.2, "a3": 0.2, "b1": 0.5}
    other = {"a1": 0.3, "a2": 0.3, "a3": 0.3, "b1": 0.9}  # task a leads by 0.1 (3 samples), task b by 0.4 (1)
    lead = paired_lead(kept, other, TASKS, over="streaming")
    assert lead.value == pytest.approx(0.25)  # the mean over tasks, not over samples (0.175)
    assert lead.low == pytest.approx(0.25) and lead.high == pytest.approx(0.25)
    assert lead.samples == 4 and lead.over == "streaming"
    assert "lead over streaming +0.250 [90%: +0.250, +0.250]" in lead.describe()
    assert (lead.tasks, lead.alone) == (2, 1)  # task b's one sample is redrawn as itself: its spread is unseen
    assert lead.describe().endswith("; 1 of its 2 tasks with one sample, whose spread the interval cannot see")


def test_a_lead_carried_by_one_sample_has_an_interval_reaching_below_zero():
    tasks = {f"s{i}": "t" for i in range(8)}
    kept = {f"s{i}": 0.5 for i in range(8)} | {"s0": 0.0}  # one sample answered, the others tied
    other = {f"s{i}": 0.5 for i in range(8)} | {"s1": 0.6}  # and one slightly worse
    lead = paired_lead(kept, other, tasks, over="snapkv")
    assert lead.value == pytest.approx((0.5 + 0.1) / 8)
    assert lead.low <= 0.0 < lead.value < lead.high
    assert paired_lead(kept, other, tasks, over="snapkv") == lead  # seeded: the same interval every time
    assert lead.alone == 0 and "one sample" not in lead.describe()


def test_only_samples_both_were_measured_on_count():
    lead = paired_lead({"a1": 0.1, "a2": 0.1}, {"a1": 0.3}, TASKS, over="x")
    assert lead.samples == 1 and lead.value == pytest.approx(0.2)
    assert paired_lead({"a1": 0.1}, {"b1": 0.3}, TASKS, over="x") is None
