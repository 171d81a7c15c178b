"""Shared fixtures: tiny random-weight models built from a config in code, a word-level tokenizer, sample rows."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = ("the a of to and in is that it for on with as was be by this are or from at an which not have "
         "special magic number what one two three four five six seven eight nine zero answer question "
         "context read text below value key list python function return class def import data file").split()


def make_tokenizer():
    """A word-level fast tokenizer (offsets work) with BOS; no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS + [str(d) for d in range(10)] + list(".,:;?!'\"()=-"):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


FAMILIES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma")  # every model family kvpress supports


def tiny_loaded(kind: str = "llama", *, seed: int = 0, attn: str = "sdpa"):
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    from polykv_search.models import LoadedModel, model_info

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    simple = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,  # Qwen3: q/k norms
              "phi3": Phi3Config,  # a fused qkv_proj
              "mistral": MistralConfig}  # its default sliding_window (4096) with no layer_types: all layers windowed
    if kind in simple:
        config = simple[kind](num_hidden_layers=3, **common)
    elif kind == "gemma":  # Gemma-3 text: sliding-window layers around one full layer, q/k norms, its own scaling
        config = Gemma3TextConfig(num_hidden_layers=4, sliding_window=32, query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                               "full_attention"], **common)
    else:
        raise ValueError(f"no tiny model for {kind!r}; families: {', '.join(FAMILIES)}")
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    for param in model.parameters():  # larger weights give peaked, non-uniform attention
        param.data.mul_(4.0 if param.dim() > 1 else 1.0)
    info = model_info(model, model_id=f"tiny-{kind}", revision="test", add_bos=False)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_loaded("llama")


@pytest.fixture(scope="session")
def tiny_gemma():
    return tiny_loaded("gemma")


def prose(n_words: int, *, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n_words,), generator=gen).tolist()
    words = [WORDS[i] for i in picks]
    return " ".join(w + ("." if i % 12 == 11 else "") for i, w in enumerate(words))


def sample_rows(n: int, *, words: int = 220, seed: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        number = f"{(seed * 7919 + i * 104729) % 900000 + 100000}"
        context = prose(words, seed=seed * 100 + i)
        cut = len(context) // 2
        context = context[:cut] + f" the special magic number is {number}. " + context[cut:]
        rows.append({"context": context, "input": "what is the special magic number?", "answers": [number],
                     "length": len(context.split()), "dataset": "needle_qa", "all_classes": None, "_id": f"s{i}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "calib.jsonl", sample_rows(3))


def words_only(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def kvpress_answer(pipe, state, press) -> str:
    """kvpress's own pipeline answering the engine's token ids with `press` (Pipeline.forward: the tokenized inputs
    in, the greedy answer out), the model's attention restored afterwards."""
    from polykv_search.runtime import polykv_attention

    inputs = {"context_ids": torch.tensor([state.parts.context_ids]),
              "questions_ids": [torch.tensor([state.parts.question_ids])]}
    with polykv_attention(pipe.model):
        return pipe.forward(inputs, max_new_tokens=state.parts.max_new_tokens, press=press)[0]


def interruptible() -> None:
    """preexec_fn for a child that a test interrupts: SIGINT at its default, as from a terminal (a shell's
    background jobs, such as CI runners or `nohup ... &`, start with SIGINT ignored, and Python then never raises
    KeyboardInterrupt)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sdpa_module(num_heads: int, num_kv: int) -> torch.nn.Module:
    """The attributes transformers' sdpa_attention_forward reads from an attention module (a causal layer whose
    query heads share num_kv KV heads)."""
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = num_heads // num_kv
    return module
