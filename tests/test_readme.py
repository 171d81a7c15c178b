"""The README's Python examples run as written, on a tiny model and tiny data files standing in for the real ones."""

import re
from pathlib import Path

import pytest

from tests.conftest import sample_rows, tiny_loaded, write_jsonl

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def block(containing: str) -> str:
    (found,) = [b for b in BLOCKS if containing in b]
    return found


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """The README's paths inside a temporary folder, with tiny data; the model is a tiny Llama."""
    monkeypatch.chdir(tmp_path)
    Path("calibration_data").mkdir()
    write_jsonl(Path("calibration_data/calib.jsonl"), sample_rows(2, words=150))
    write_jsonl(Path("calibration_data/calib_long.jsonl"), sample_rows(2, words=400, seed=3))  # run's second split
    write_jsonl(Path("calibration_data/eval.jsonl"), sample_rows(2, words=150, seed=7))
    return tiny_loaded("llama")


def adapted(code: str) -> str:
    return (code.replace('pk.load_model("smollm2-135m", dtype="bfloat16")', "LM")
            .replace("budgets=[128, 256]", "budgets=[16, 32]").replace("budgets=(16, 64, 256, 1024)", "budgets=(8, 16, 64)"))


def test_the_api_example_runs(stand_ins, capsys):
    namespace = {"LM": stand_ins}
    exec(adapted(block("import polykv_search as pk")), namespace)  # noqa: S102 (our own README)
    assert namespace["result"].plan_path.is_file()
    assert [r.budget for r in namespace["report"].recovery_of("mine")] == [16, 32]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("16 ")  # budget, score, best uniform, R, interval


def test_the_plan_and_apply_examples_run(stand_ins):
    import polykv_search as pk
    from polykv_search.plan import PlanFile

    lm = stand_ins
    plan_file = PlanFile.build(lm.info, [pk.uniform_plan(lm.info, policy="snapkv", budget=b) for b in (128, 256)])
    Path("outputs/smollm2-135m").mkdir(parents=True)
    plan_file.save("outputs/smollm2-135m/plan.json")
    namespace = {"model": lm.model, "inputs": {"input_ids": lm.tokenizer("the key value list", return_tensors="pt")
                                               ["input_ids"]}}
    exec(block("load_plan("), namespace)  # noqa: S102
    assert namespace["plan"].average_budget == 256
    exec(block("apply_plan(model, press)"), namespace)  # noqa: S102
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
