"""export --to trtllm: TensorRT-LLM's kv_cache_config block (JSON or YAML) with one StreamingLLM window per layer,
which is what our runtime keeps for the same plan; per-head, non-streaming and mixed-sink plans are refused."""

import json

import pytest
import torch
import yaml
from transformers import DynamicCache

from polykv_search.errors import ExportError, PlanError
from polykv_search.export import export_plan, trtllm_kv_cache_config
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile
from polykv_search.runtime import apply_plan
from tests.conftest import tiny_loaded
from tests.plan.factories import gemma_like
from tests.plans import TEST, plan_of

WINDOWS = [24, 40, 16]
T = 80
IDS = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


def test_the_file_is_the_kv_cache_config_block_and_yaml_reads_the_same(lm, tmp_path):
    plan_file = PlanFile.build(lm.info, [plan_of(lm.info, ["streaming"] * 3, WINDOWS)])
    path = export_plan(plan_file.save(tmp_path / "plan.json"), to="trtllm", out=tmp_path / "kv.json")
    expected = {"kv_cache_config": {"max_attention_window": WINDOWS, "sink_token_length": 4}}
    assert json.loads(path.read_text()) == expected
    text = export_plan(plan_file, to="trtllm", out=tmp_path / "kv.yaml").read_text()
    assert yaml.safe_load(text) == expected
    assert "# KvCacheConfig(max_attention_window=[24, 40, 16], sink_token_length=4)" in text
    config = trtllm_kv_cache_config(plan_file.plans[0], model=plan_file.model)
    assert config.python() == "KvCacheConfig(max_attention_window=[24, 40, 16], sink_token_length=4)"


def test_our_runtime_keeps_each_layers_window_of_sinks_and_recent_tokens(lm, tmp_path):
    plan_file = PlanFile.build(lm.info, [plan_of(lm.info, ["streaming"] * 3, WINDOWS)])
    windows = json.loads(export_plan(plan_file, to="trtllm", out=tmp_path / "kv.json").read_text())
    block = windows["kv_cache_config"]
    sinks = block["sink_token_length"]
    rebuilt = plan_of(lm.info, ["streaming"] * 3, block["max_attention_window"])  # the plan the file describes
    assert rebuilt.layers == plan_file.plans[0].layers
    with torch.no_grad(), apply_plan(lm.model, rebuilt) as press:
        lm.model(input_ids=IDS, past_key_values=DynamicCache(config=lm.model.config))
    for layer, window in enumerate(block["max_attention_window"]):
        kept = press.kept_indices[layer]  # (1, H_kv, window)
        expected = list(range(sinks)) + list(range(T - (window - sinks), T))
        for h in range(lm.info.num_kv_heads):
            assert sorted(kept[0, h].tolist()) == expected, (layer, h)


def test_full_and_sliding_layers_take_the_windows_given(tmp_path):
    info = gemma_like()
    layers = [LayerPlan.of(i, "streaming", 64 if n % 2 else 100_000) for n, i in enumerate(info.compressible_layers)]
    plan = Plan.build(info, layers=layers, search=TEST)
    model = PlanFile.build(info, [plan]).model
    with pytest.raises(ExportError, match="pass --sliding-window N"):
        trtllm_kv_cache_config(plan, model=model)
    config = trtllm_kv_cache_config(plan, model=model, context=32768, sliding_window=512)
    expected = [512 if kind == "sliding_attention" else None for kind in info.layer_types]
    for n, i in enumerate(info.compressible_layers):
        expected[i] = 64 if n % 2 else 32768
    assert list(config.max_attention_window) == expected and config.sink_token_length == 4


def test_plans_tensorrt_llm_cannot_run_are_refused_naming_the_layers(lm, tmp_path):
    info = lm.info
    plan = Plan.build(info, search=TEST, layers=[
        LayerPlan(index=0, policy=None, heads=(HeadPlan.of("streaming", 20), HeadPlan.of("streaming", 30))),
        LayerPlan.of(1, "snapkv", 20), LayerPlan.of(2, "streaming", 20, n_sink=8)])
    model = PlanFile.build(info, [plan]).model
    with pytest.raises(ExportError) as caught:
        trtllm_kv_cache_config(plan, model=model)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the plan at average budget")
    assert "layer 0 give their KV heads different entries" in message
    assert "layer 1 use snapkv, not streaming" in message
    assert "--to kvpress" in message
    two = PlanFile.build(info, [plan_of(info, ["streaming"] * 3, [b] * 3, average=b) for b in (16, 32)])
    with pytest.raises(PlanError, match="pick it with --budget"):
        export_plan(two, to="trtllm", out=tmp_path / "kv.json")
    assert json.loads(export_plan(two, to="trtllm", out=tmp_path / "kv.json", budget=32).read_text())[
        "kv_cache_config"]["max_attention_window"] == [32] * 3
    copied = export_plan(two.save(tmp_path / "two.json"), out=tmp_path / "copy.json")  # kvpress: the file as is
    assert copied.read_bytes() == (tmp_path / "two.json").read_bytes()
