"""Issue 33: the bad inputs that crashed, misled or passed silently, each refused or said in one line (exit 2 for
usage and input errors) before any work."""

from __future__ import annotations

import json
import logging
import sys
import tempfile

import pytest

from polykv_search.checkpoints import prepare_checkpoints
from polykv_search.cli import main
from polykv_search.data import load_samples
from polykv_search.errors import OutputError
from polykv_search.io import write_atomic
from polykv_search.plan import PlanFile, uniform_plan
from tests.cli.test_robustness import one_line_error, run_cli, sample_rows
from tests.conftest import write_jsonl
from tests.plan.factories import llama_like


@pytest.fixture
def plan_path(tmp_path):
    info = llama_like()
    return PlanFile.build(info, [uniform_plan(info, policy="snapkv", budget=64)]).save(tmp_path / "plan.json")


@pytest.fixture
def immutable(tmp_path, monkeypatch):
    """A folder no file can be created in, as `chattr +i` makes it (root's writes pass a chmod)."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(folder):
            raise PermissionError(1, "Operation not permitted")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder


def test_optimize_into_an_immutable_folder_is_refused_before_any_work(monkeypatch, capsys, tmp_path, immutable):
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", tmp_path / "none.safetensors", "--budget",
                             "12", "--out", immutable / "p.json")  # refused before the (missing) profile is read
    one_line_error(code, lines, f"--out {immutable / 'p.json'}: cannot write in {immutable}",
                   "Operation not permitted")


def test_export_into_an_immutable_folder_or_onto_a_folder(monkeypatch, capsys, plan_path, tmp_path, immutable):
    code, _, lines = run_cli(monkeypatch, capsys, "export", plan_path, "--out", immutable / "x.json")
    one_line_error(code, lines, "cannot write in")
    code, _, lines = run_cli(monkeypatch, capsys, "export", plan_path, "--out", tmp_path)
    one_line_error(code, lines, f"--out {tmp_path} is a folder; give a file name")
    code, _, lines = run_cli(monkeypatch, capsys, "export", plan_path, "--to", "trtllm", "--out", tmp_path)
    one_line_error(code, lines, "is a folder; give a file name", "kv_cache_config.yaml")


def test_a_write_that_fails_late_is_one_line_not_an_internal_error(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="taken is a folder; give a writable file path"):
        write_atomic(tmp_path / "taken", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temp file left


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_samples_below_one_is_an_invalid_value(monkeypatch, capsys, tmp_path, value):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", "nobody/model", "--data", data,
                             "--max-samples", value, "--out", tmp_path / "o")
    one_line_error(code, lines, "Invalid value for '--max-samples'")
    assert "empty" not in lines[0]


def test_the_api_refuses_max_samples_below_one(tmp_path):
    from polykv_search.api import resolve_samples
    from polykv_search.errors import ConfigError

    with pytest.raises(ConfigError, match="max_samples 0 must be at least 1"):
        resolve_samples(write_jsonl(tmp_path / "d.jsonl", sample_rows(1)), max_samples=0)


def test_validate_a_folder_says_it_is_a_folder(monkeypatch, capsys, tmp_path):
    code, _, lines = run_cli(monkeypatch, capsys, "validate", tmp_path)
    one_line_error(code, lines, "is a folder; give a plan file in it")


def test_a_relative_model_path_that_does_not_exist_is_not_a_hub_id(monkeypatch, capsys, tmp_path):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", "models/nope", "--data", data)
    one_line_error(code, lines, "local model folder models/nope does not exist")


def test_a_model_with_its_own_code_names_the_option(monkeypatch, capsys, tiny_dir, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                 "AutoModelForCausalLM": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text("raise SystemExit('this code must never run')\n")
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", folder, "--data", data, "--out",
                             tmp_path / "o")
    one_line_error(code, lines, "ships its own Python code", "--trust-remote-code")


def test_a_fake_parquet_file_is_one_line_without_a_column_hint(monkeypatch, capsys, tmp_path):
    fake = tmp_path / "rows.parquet"
    fake.write_text("not parquet at all\n")
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", "nobody/model", "--data", fake, "--out",
                             tmp_path / "o")
    one_line_error(code, lines, "is not a Parquet file")
    assert "column types" not in lines[0]


def test_duplicate_budgets_are_refused_before_solving(monkeypatch, capsys, tmp_path):
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", tmp_path / "none.safetensors",
                             "--budget", "128,128,256", "--out", tmp_path / "p.json")
    one_line_error(code, lines, "gives 128 more than once")


def test_duplicated_ids_are_warned_about(tmp_path, caplog):
    rows = sample_rows(3)
    rows[2]["_id"] = rows[0]["_id"]
    with caplog.at_level(logging.WARNING, logger="polykv_search"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", rows))
    [record] = [r for r in caplog.records if "share an _id" in r.getMessage()]
    assert "2 rows share an _id" in record.getMessage() and "'s0'" in record.getMessage()


def test_starting_over_on_old_checkpoints_says_so(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    prepare_checkpoints(ckpt, {"a": 1}, resume=False)
    (ckpt / "sample-00000.safetensors").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="polykv_search"):
        prepare_checkpoints(ckpt, {"a": 1}, resume=False)
    assert any("starting over: the 1 checkpoint of an earlier run" in r.getMessage() and "--resume" in r.getMessage()
               for r in caplog.records)
    assert not (ckpt / "sample-00000.safetensors").exists()


def test_a_refusal_inside_the_progress_bars_starts_stderr_with_the_error(monkeypatch, capsys, tmp_path):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", "models/nope", "--data", str(data)])
    with pytest.raises(SystemExit):
        main()
    err = capsys.readouterr().err
    assert err.startswith("error: local model folder"), repr(err[:80])


def test_a_long_warning_stays_on_one_line_when_stderr_is_not_a_terminal(capsys):
    """A batch job's log: each record one physical line, however long (rich would wrap it at 132 columns)."""
    from polykv_search.cli.errors import setup_logging

    setup_logging()
    logging.getLogger("polykv_search.test").warning("x" * 300 + " end")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("WARNING") and err.rstrip().endswith("end")
