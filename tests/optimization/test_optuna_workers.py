"""Two worker processes share one Optuna study through a storage: both run trials, the study's trial count is shared,
and the best plan is read back from the storage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polykv_search.models.info import ModelInfo
from polykv_search.optimization.optuna_search import open_storage, search

ROOT = Path(__file__).resolve().parents[2]
N_TRIALS = 16
INFO = ModelInfo(model_id="toy", revision="test", num_layers=4, layer_types=["full_attention"] * 4, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_context=4096)

WORKER = """
import json, sys, time, types
from pathlib import Path

import polykv_search

# the optimization package's __init__ loads torch (seconds, twice on a busy machine); this search needs none of it
package = types.ModuleType("polykv_search.optimization")
package.__path__ = [str(Path(polykv_search.__file__).parent / "optimization")]
sys.modules["polykv_search.optimization"] = package
from polykv_search.models.info import ModelInfo
from polykv_search.optimization.optuna_search import search
from tests.plans import plan_of

storage, ready = sys.argv[1], Path(sys.argv[2])
me, seed, n_trials = (int(arg) for arg in sys.argv[3:6])
INFO = ModelInfo(**json.loads(sys.argv[6]))

def toy(plan):
    time.sleep(0.05)  # a trial takes a while, as a measured one does
    return sum((p != ("knorm" if layer == 1 else "snapkv")) + (3.0 if layer == 2 else 1.0) / b
               for layer, (p, b) in enumerate(zip(plan.policies, plan.budgets)))

(ready / f"worker-{me}").touch()
deadline = time.time() + 60
while len(list(ready.glob("worker-*"))) < 2 and time.time() < deadline:  # start together: both run trials
    time.sleep(0.02)
exact = plan_of(INFO, ["snapkv", "knorm", "snapkv", "snapkv"], [20, 20, 40, 20])
result = search(toy, info=INFO, average_budget=25, policies=["snapkv", "knorm", "tova"], total=100,
                seeds={"exact": exact}, n_trials=n_trials, storage=storage, study_name="shared", seed=seed)
print(json.dumps({"objective": result.objective, "trials": result.trials, "budgets": result.plan.budgets}))
"""


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_processes_share_one_study(tmp_path, kind):
    """A journal file, as processes on one machine share it, and an RDB (sqlite here; postgresql:// or mysql://
    URLs take the same path through optuna's RDBStorage)."""
    import optuna  # imported here: only this test needs it

    storage = f"journal:{tmp_path / 'study.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, storage, str(tmp_path), str(i), str(seed),
                                 str(N_TRIALS), json.dumps(INFO.to_dict())], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for i, seed in enumerate((0, 1))]  # a seed per worker: the same seed proposes the same trials
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert N_TRIALS <= len(finished) <= N_TRIALS + 1  # the total is the study's, not each worker's
    by_worker = {t.user_attrs.get("worker") for t in finished if not t.user_attrs.get("seed_name")}
    assert len(by_worker) == 2, by_worker  # both processes ran trials
    assert [t.user_attrs.get("seed_name") for t in finished].count("exact") >= 1
    best = min(t.value for t in finished)
    assert study.best_value == best == min(r["objective"] for r in results)  # the last to finish saw them all
    assert max(r["trials"] for r in results) == len(study.trials)
    assert study.best_trial.user_attrs["budgets"] in [r["budgets"] for r in results]

    # a worker that joins a study with its trials done runs none and reads back the best plan
    late = search(lambda plan: pytest.fail("the study already holds its trials"), info=INFO, average_budget=25,
                  policies=["snapkv", "knorm", "tova"], total=100, n_trials=N_TRIALS, storage=storage,
                  study_name="shared")
    assert late.trials == len(study.trials) and late.objective == best
    assert late.plan.budgets == study.best_trial.user_attrs["budgets"]
