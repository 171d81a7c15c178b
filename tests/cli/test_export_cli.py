"""`polykv-search export`: writes the target's file, and refuses a plan the engine cannot run with one line, exit 2."""

import json

from polykv_search.plan import PlanFile, uniform_plan
from tests.cli.test_plan_cli import run_cli
from tests.plan.factories import llama_like


def test_export_writes_the_target_file_or_refuses_in_one_line(monkeypatch, capsys, tmp_path):
    info = llama_like(4)
    streaming = PlanFile.build(info, [uniform_plan(info, policy="streaming", budget=64)]).save(tmp_path / "s.json")
    code, out, _ = run_cli(monkeypatch, capsys, "export", streaming, "--to", "trtllm", "--out", tmp_path / "kv.json")
    assert code == 0 and "kv.json" in out
    assert json.loads((tmp_path / "kv.json").read_text())["kv_cache_config"] == {
        "max_attention_window": [64] * 4, "sink_token_length": 4}
    code, out, _ = run_cli(monkeypatch, capsys, "export", streaming, "--to", "duo-attention", "--out", tmp_path / "p")
    assert code == 0 and (tmp_path / "p" / "full_attention_heads.tsv").read_text().count("0") == 4 * info.num_kv_heads
    snapkv = PlanFile.build(info, [uniform_plan(info, policy="snapkv", budget=64)]).save(tmp_path / "k.json")
    code, _, err = run_cli(monkeypatch, capsys, "export", snapkv, "--to", "duo-attention", "--out", tmp_path / "q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "layer 0 (heads 0, 1, 2), layer 1" in err and "use snapkv, not streaming" in err
    code, _, err = run_cli(monkeypatch, capsys, "export", snapkv, "--to", "tensorrt", "--out", tmp_path / "x")
    assert code == 2 and "not an export target" in err


def test_optimize_refuses_a_target_the_cost_cannot_serve_before_reading_the_profile(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "optimize", "--target", "duo-attention", "--cost", "mass_lost",
                           "--profile", tmp_path / "absent.safetensors")
    assert code == 2 and "--target duo-attention" in err and "per KV head" in err
    assert len(err.strip().splitlines()) == 1
