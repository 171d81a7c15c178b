"""Exporters: one rung of a plan written as another engine's configuration, or refused in one line that names the
layers and KV heads the engine cannot express.

    from polykv_search.export import export_plan
    export_plan("outputs/smollm2-135m/plan.json", to="trtllm", out="kv_cache_config.yaml", budget=256)
    export_plan("plan.json", to="duo-attention", out="duo_pattern/", context=4096)  # config.json + tsv

Reading and writing needs neither torch nor kvpress; `polykv_search.export.duo_press` (kvpress) loads an exported
DuoAttention pattern into kvpress's own DuoAttentionPress.
"""

from polykv_search.export.duo_attention import DuoPattern, duo_attention_pattern
from polykv_search.export.entries import DUO_ATTENTION, KVPRESS, TARGETS, TRTLLM
from polykv_search.export.export import export_plan
from polykv_search.export.trtllm import TrtllmKvCacheConfig, trtllm_kv_cache_config

__all__ = ["DUO_ATTENTION", "KVPRESS", "TARGETS", "TRTLLM", "DuoPattern", "TrtllmKvCacheConfig",
           "duo_attention_pattern", "export_plan", "trtllm_kv_cache_config"]
