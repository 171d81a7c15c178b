"""--device: `best` (the default everywhere) takes a visible GPU, else the CPU, says which in one line, and the
auto dtype follows the device it resolved to. No GPU here: torch.cuda is monkeypatched."""

import inspect
import logging

import pytest
import torch

import polykv_search.api as api
from polykv_search.errors import ConfigError
from polykv_search.models import DEFAULT_DEVICE, describe_device, load_model, resolve_device, resolve_dtype
from polykv_search.optimization.guard import guard_plan
from tests.conftest import tiny_loaded


@pytest.fixture
def gpu(monkeypatch):
    """torch sees one H100."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda k=0: "NVIDIA H100 80GB HBM3")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_best_takes_the_gpu_when_one_is_visible(gpu):
    assert DEFAULT_DEVICE == "best"
    assert resolve_device() == resolve_device("best") == "cuda"
    assert resolve_device("cuda") == "cuda" and resolve_device("auto") == "auto" and resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", resolve_device("best")) == torch.bfloat16
    assert describe_device("cuda") == "cuda (NVIDIA H100 80GB HBM3)"
    assert describe_device("cpu") == "cpu (a GPU is visible; asked for the CPU)"
    assert describe_device("auto") == "auto (accelerate's device map over 1 GPU: NVIDIA H100 80GB HBM3)"


def test_best_falls_back_to_the_cpu_and_cuda_refuses(no_gpu):
    assert resolve_device("best") == "cpu" and resolve_device("auto") == "cpu"
    assert resolve_dtype("auto", resolve_device("best")) == torch.float32
    assert describe_device("cpu") == "cpu (no GPU visible)"
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="'tpu' is not one of best, cpu, cuda, auto"):
        resolve_device("tpu")


def test_loading_says_which_device_and_dtype_in_one_line(no_gpu, tmp_path, caplog):
    lm = tiny_loaded("llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="polykv_search"):
        loaded = load_model(str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device: ")]
    assert lines == ["device: cpu (no GPU visible), dtype float32"]
    assert loaded.device.type == "cpu" and next(loaded.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("function", [api.calibrate, api.optimize, api.evaluate, api.run, api.choose,
                                      api.check_proxy, guard_plan, load_model])
def test_every_entry_point_defaults_to_best(function):
    assert inspect.signature(function).parameters["device"].default == "best"
