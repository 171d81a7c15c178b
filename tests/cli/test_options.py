"""Commands read alike: the calibration grid is --grid everywhere (calibrate keeps --budgets as a hidden alias),
`run` takes the loading options of calibrate and evaluate, rarely changed options sit in their own help panels, and
the choices of --solver, --cost, --metric and --weighting are the library's names."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from polykv_search.calibration import Profile
from polykv_search.cli import app
from polykv_search.cli.calibrate import grid_of
from polykv_search.errors import ConfigError
from polykv_search.plan.names import COST_NAMES, SOLVERS
from tests.conftest import sample_rows, write_jsonl

LOADING = ("--trust-remote-code", "--revision", "--column-map", "--max-context")


def help_of(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_calibrate_and_run_name_the_grid_alike_and_run_takes_the_loading_options():
    calibrate, run, evaluate = help_of("calibrate"), help_of("run"), help_of("evaluate")
    assert "--grid" in calibrate and "--budgets" not in calibrate  # the old name still parses, unlisted
    assert "--grid" in run
    for option in LOADING:
        assert option in run and option in calibrate and option in evaluate
    assert "Probes and signals" in calibrate and "Loading" in run
    optimize = help_of("optimize")
    assert "Optuna (--solver optuna)" in optimize and "ILP (--solver ilp)" in optimize
    assert "Plan constraints" in optimize and "Plan constraints" in run
    assert "[" + "|".join(SOLVERS) + "]" in optimize and "|".join(COST_NAMES[:2]) in optimize


def test_grid_and_its_old_name_must_agree():
    assert grid_of("8,16", None) == grid_of(None, "8,16") == grid_of("8,16", "8,16") == "8,16"
    with pytest.raises(ConfigError, match="give --grid alone"):
        grid_of("8,16", "8,32")


def test_calibrate_takes_the_grid_as_grid(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    result = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--data", str(data), "--out",
                                      str(tmp_path / "o"), "--grid", "8,16", "--window", "16", "--json"])
    assert result.exit_code == 0, result.output
    assert Profile.load(json.loads(result.stdout)["profile"]).budgets == [8, 16]


@pytest.mark.parametrize("command", [("calibrate",), ("optimize",), ("evaluate",), ("run",), ("choose",),
                                     ("check-proxy",)])
def test_device_defaults_to_best_in_every_command(command):
    shown = " ".join(help_of(*command).split())
    assert "--device" in shown and "best (cuda when a GPU is visible, else cpu" in shown
    assert "[default: best]" in shown
