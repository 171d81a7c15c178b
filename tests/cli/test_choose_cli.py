"""The choose command on a tiny model: two ladders measured on calibration samples, the best rung per budget."""

import json
import sys

from polykv_search.cli import main
from polykv_search.plan import PlanFile
from tests.conftest import sample_rows, tiny_loaded, write_jsonl
from tests.optimization.test_choose import ladder


def test_choose_command_measures_on_calibration_samples(monkeypatch, capsys, tiny_dir, tmp_path):
    from polykv_search.models import model_info

    info = model_info(tiny_loaded("llama").model, model_id=str(tiny_dir), revision="local", add_bos=False)
    paths = []
    for name, policy in (("snap", "snapkv"), ("stream", "streaming")):
        paths.append(tmp_path / f"{name}.json")
        ladder(info, policy, [8, 16]).save(paths[-1])
    data = write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=200))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "choose", "--model", str(tiny_dir), "--plan", str(paths[0]),
                                      "--plan", str(paths[1]), "--data", str(data), "--out",
                                      str(tmp_path / "best.json"), "--json"])
    main()
    out = json.loads(capsys.readouterr().out)
    chosen = PlanFile.load(out["plan"])
    assert chosen.budgets == [8, 16]
    for choice, plan in zip(out["choices"], chosen.plans):
        assert choice["chosen"] == min(choice["measured"], key=choice["measured"].get)
        policy = {"snap": "snapkv", "stream": "streaming"}[choice["chosen"]]
        assert set(plan.policies) - {None} == {policy}


def snapkv_ladder_and_data(tiny_dir, tmp_path, *, name, samples, words):
    """A SnapKV ladder at 8 and 16 tokens for the tiny model saved as `name`.json, and a calibration file."""
    from polykv_search.models import model_info

    info = model_info(tiny_loaded("llama").model, model_id=str(tiny_dir), revision="local", add_bos=False)
    path = tmp_path / f"{name}.json"
    ladder(info, "snapkv", [8, 16]).save(path)
    return path, write_jsonl(tmp_path / "c.jsonl", sample_rows(samples, words=words))


def test_choose_with_uniform_candidates_by_task_score(monkeypatch, capsys, tiny_dir, tmp_path):
    path, data = snapkv_ladder_and_data(tiny_dir, tmp_path, name="snap", samples=2, words=200)
    monkeypatch.setattr(sys, "argv", ["polykv-search", "choose", "--model", str(tiny_dir), "--plan", str(path),
                                      "--uniform", "streaming,knorm", "--metric", "task", "--data", str(data),
                                      "--out", str(tmp_path / "best.json"), "--json"])
    main()
    out = json.loads(capsys.readouterr().out)
    chosen = PlanFile.load(out["plan"])
    assert chosen.budgets == [8, 16]
    for choice, plan in zip(out["choices"], chosen.plans):
        assert set(choice["measured"]) == {"snap", "streaming", "knorm"}
        assert all(0.0 <= v <= 1.0 for v in choice["measured"].values())  # 1 - a task score
        assert choice["measured"][choice["chosen"]] == min(choice["measured"].values())
        policy = {"snap": "snapkv"}.get(choice["chosen"], choice["chosen"])
        assert set(plan.policies) - {None} == {policy}
        assert "by mean task then lost" in plan.search.notes


def test_choose_rejects_an_unknown_uniform_policy_before_loading(monkeypatch, capsys, tmp_path):
    from tests.cli.test_plan_cli import run_cli

    path = tmp_path / "snap.json"
    ladder(tiny_loaded("llama").info, "snapkv", [8]).save(path)
    code, _, err = run_cli(monkeypatch, capsys, "choose", "--model", str(tmp_path / "no-model"), "--plan", path,
                           "--uniform", "snapkv,nope", "--out", tmp_path / "o.json")
    assert code == 2 and "unknown policy 'nope'" in err and not (tmp_path / "o.json").exists()


def test_choose_prints_one_row_per_candidate_and_the_choices(monkeypatch, capsys, tiny_dir, tmp_path):
    path, data = snapkv_ladder_and_data(tiny_dir, tmp_path, name="a_rather_long_plan_file_name[v2]", samples=1,
                                        words=150)
    monkeypatch.setattr(sys, "argv", ["polykv-search", "choose", "--model", str(tiny_dir), "--plan", str(path),
                                      "--uniform", "streaming", "--data", str(data), "--out",
                                      str(tmp_path / "best.json")])
    main()
    out, err = capsys.readouterr()
    assert "a_rather_long_plan_file_name[v2]" in err and "streaming" in err  # names are never cut nor read as markup
    chosen = PlanFile.load(tmp_path / "best.json")
    policies = [next(p for p in plan.policies if p) for plan in chosen.plans]
    names = ["a_rather_long_plan_file_name[v2]" if p == "snapkv" else p for p in policies]
    assert f"chosen: 8 -> {names[0]}, 16 -> {names[1]}" in out


def test_choose_needs_two_candidates_before_loading(monkeypatch, capsys, tmp_path):
    from tests.cli.test_plan_cli import run_cli

    path = tmp_path / "snap.json"
    ladder(tiny_loaded("llama").info, "snapkv", [8]).save(path)
    code, _, err = run_cli(monkeypatch, capsys, "choose", "--model", str(tmp_path / "no-model"), "--plan", path,
                           "--out", tmp_path / "o.json")
    assert code == 2 and "at least two candidates" in err and "--uniform" in err
