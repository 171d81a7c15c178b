"""Load a causal LM and its tokenizer from an alias, a .gguf file, a local folder or a hub id.

A GGUF file is dequantized once by transformers and cached as safetensors under the cache root,
keyed by the file's sha256, so later loads take about a second.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers import __version__ as tf_version
from transformers.utils import logging as tf_logging

import polykv_search.hub as hub
from polykv_search.errors import ConfigError, ModelError, PolykvError
from polykv_search.io import file_sha256
from polykv_search.models.cache import cache_root
from polykv_search.models.devices import DEFAULT_DEVICE, describe_device, resolve_device
from polykv_search.models.embedded import EMBEDDED
from polykv_search.models.families import check_family
from polykv_search.models.info import ModelInfo, model_info

logger = logging.getLogger(__name__)

CONVERSION_VERSION = 2  # bump when the cached conversion changes; v2 keeps GGUF tokenizers faithful
PROBE = "The capital of France is a beautiful city. def f(x): return x + 1  # 123456"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    info: ModelInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


ModelSpec = str | Path | LoadedModel  # an alias, a .gguf file, a folder, a hub id, or a model loaded once


def resolve_model(model: ModelSpec, *, device: str = DEFAULT_DEVICE, dtype: str = "auto",
                  trust_remote_code: bool = False, revision: str | None = None) -> LoadedModel:
    """A loaded model: `model` itself, or the spec loaded with these options."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(str(model), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                      revision=revision)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    spec: str,
    *,
    device: str = DEFAULT_DEVICE,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load `spec` (alias, .gguf path, folder or hub id) for inference, in eval mode."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)  # auto follows the resolved device: bfloat16 on a GPU
    source, model_id, rev, add_bos, local_only = _resolve(spec, revision)
    model, tokenizer = _from_pretrained(source, device=device, dtype=torch_dtype, revision=revision,
                                        trust_remote_code=trust_remote_code,
                                        attn_implementation=attn_implementation, local_files_only=local_only)
    if rev == "local":
        rev = getattr(model.config, "_commit_hash", None) or "local"
    if add_bos:
        _force_bos(tokenizer)
    info = model_info(model, model_id=model_id, revision=rev, add_bos=add_bos)
    model.eval()
    first = next(model.parameters()).device
    logger.info("device: %s, dtype %s", describe_device(device), str(torch_dtype).removeprefix("torch."),
                extra={"polykv_hold": True})  # the command line says it when work starts, not before a refusal
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=first)


@dataclass(frozen=True)
class LoadedTokenizer:
    """A model's tokenizer without its weights, and the model's context length (0 when its config has none)."""

    tokenizer: Any
    model_id: str
    revision: str
    max_context: int


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, revision: str | None = None) -> LoadedTokenizer:
    """The tokenizer of `spec` (alias, .gguf path, folder or hub id) as `load_model` would give it, without loading
    the weights (a GGUF file is still converted once, into the cache `load_model` reads)."""
    source, model_id, rev, add_bos, local_only = _resolve(spec, revision)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if local_only:
        kwargs["local_files_only"] = True
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _asks_for_remote_code(exc):
            raise ModelError(remote_code_refusal(source)) from exc
        raise ModelError(f"cannot load the tokenizer of {source}: {first_line}; check the id or path") from exc
    if add_bos:
        _force_bos(tokenizer)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if rev == "local":
        rev = getattr(config, "_commit_hash", None) or "local"
    return LoadedTokenizer(tokenizer=tokenizer, model_id=model_id, revision=rev,
                           max_context=int(getattr(text_config, "max_position_embeddings", 0) or 0))


def _resolve(spec: str, revision: str | None) -> tuple[Path | str, str, str, bool, bool]:
    """(source folder or id, model id, revision, add BOS, local files only) for a model spec."""
    add_bos = False
    if spec in EMBEDDED:
        embedded = EMBEDDED[spec]
        source, file_hash = _converted_gguf(embedded.locate())
        model_id, rev, add_bos = embedded.alias, file_hash, embedded.add_bos
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {spec} does not exist; give an existing .gguf path or an alias "
                             f"({', '.join(EMBEDDED)})")
        source, file_hash = _converted_gguf(gguf)
        model_id, rev = gguf.name, file_hash
        add_bos = _gguf_needs_bos(source)
    else:
        source, model_id, rev = spec, spec, revision or "local"
        path = Path(spec).expanduser()
        if not path.is_dir() and ("/" not in spec or spec.startswith((".", "/", "~"))):
            raise ModelError(f"unknown model {spec!r}: not an embedded alias ({', '.join(EMBEDDED)}), "
                             "not a local folder, not a .gguf file, and not a hub id of the form owner/name")
        if not path.exists() and path.parent.is_dir() and path.parent != Path("."):  # models/nope: a local path
            raise ModelError(f"local model folder {spec} does not exist ({path.parent} has no {path.name!r}); give "
                             "an existing folder, a .gguf file, an embedded alias or a hub id owner/name")
    local_only = not Path(str(source)).expanduser().exists() and not hub.reachable()
    if local_only and not _in_hub_cache(str(source), revision):
        raise ModelError(f"model {spec}: no local folder of that name exists, it is not in the local Hugging Face "
                         f"cache, and the hub ({hub.endpoint()}) cannot be reached; download it where there is "
                         "network, or give a local folder, a .gguf file or an embedded alias")
    return source, model_id, rev, add_bos, local_only


def _asks_for_remote_code(exc: BaseException) -> bool:
    """Whether transformers refused `exc`'s model because it ships its own code (trust_remote_code not set)."""
    text = str(exc)
    return "trust_remote_code" in text or "contains custom code" in text


def remote_code_refusal(source: str | Path) -> str:
    return (f"model {source} ships its own Python code (auto_map in its config.json), which runs only with "
            "--trust-remote-code; read that code first (it runs on this machine), then pass --trust-remote-code")


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether the hub model `repo_id` has its config in the local Hugging Face cache."""
    # imported here: huggingface_hub comes with transformers; only a hub id needs it
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id=repo_id, filename="config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def _from_pretrained(source: str | Path, *, device: str, dtype: torch.dtype, revision: str | None,
                     trust_remote_code: bool, attn_implementation: str,
                     local_files_only: bool = False) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if local_files_only:  # the hub cannot be reached: the cached copy, without a minute of retries
        kwargs["local_files_only"] = True
    try:
        with quiet_transformers():
            check_family(AutoConfig.from_pretrained(source, **kwargs).model_type, source=str(source))  # before weights
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=attn_implementation,
                device_map="auto" if device == "auto" else None, **kwargs)
    except PolykvError:
        raise
    except pickle.UnpicklingError as exc:  # torch's weights-only loader refused a pickle that runs code
        raise ModelError(f"cannot load model {source}: its weights are a pickle that torch refuses to load safely "
                         "(it would run code); use the model's safetensors weights, or convert them where you "
                         "trust the file") from exc
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _asks_for_remote_code(exc):
            raise ModelError(remote_code_refusal(source)) from exc
        raise ModelError(f"cannot load model {source}: {first_line}; check the id or path "
                         "(no hub access: use a local folder, a .gguf file or an embedded alias)") from exc
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for a broken model folder)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"cannot load model {source}: {type(exc).__name__}: {first_line[:200]}; check that the "
                         "folder holds a complete Hugging Face model") from exc
    if device != "auto":
        model.to(device)
    return model, tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers draws a progress bar on stderr while it loads weights: a library prints nothing, so it is off
    for the call and put back as the caller had it."""
    enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tf_logging.enable_progress_bar()


def _converted_gguf(gguf: Path) -> tuple[Path, str]:
    """Return a safetensors folder for `gguf`, converting it once; keyed by the file's sha256."""
    digest = file_sha256(gguf)
    target = cache_root() / "converted" / f"{gguf.stem}-{digest[:16]}-v{CONVERSION_VERSION}"
    if (target / "config.json").exists():
        return target, digest
    logger.debug("converting %s to safetensors once (about a minute)", gguf.name)
    started = time.perf_counter()
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUF architectures
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"transformers {tf_version} cannot read GGUF {gguf}: {reason}; "
                         "convert it with llama.cpp to a supported architecture or pass a safetensors folder") from exc
    # A GGUF-loaded model refuses save_pretrained until its quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent if target.parent.exists()
                                else _mkdir(target.parent)))
    try:
        model.save_pretrained(tmp)
        _save_tokenizer(tokenizer, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        config["_polykv_gguf"] = {"file": gguf.name, "sha256": digest}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if (target / "config.json").exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s once in %.0f s; cached as safetensors in %s", gguf.name,
                time.perf_counter() - started, target)
    return target, digest


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save the tokenizer so it reloads identically. Some GGUF tokenizers (Gemma-3 in transformers 5.2) come
    back character-level after save_pretrained; then the exact backend (tokenizer.json) is kept instead."""
    tokenizer.save_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded(PROBE)["input_ids"] == tokenizer(PROBE)["input_ids"]:
        return
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            config[key] = str(value)
    config_path.write_text(json.dumps(config, indent=2))
    reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded(PROBE)["input_ids"] != tokenizer(PROBE)["input_ids"]:
        raise ModelError("the GGUF tokenizer does not survive saving; report this model")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_needs_bos(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type", "").startswith("gemma")


def _force_bos(tokenizer: Any) -> None:
    """Make the tokenizer prepend BOS (Gemma's GGUF tokenizer forgets it, and the model then babbles)."""
    if tokenizer.bos_token_id is None:
        return
    tokenizer.add_bos_token = True
    probe = tokenizer("probe")["input_ids"]
    if not probe or probe[0] != tokenizer.bos_token_id:
        # Fall back to wrapping the tokenizer call; kept minimal and explicit.
        raise ModelError("could not make this tokenizer add BOS; report this model so we can handle it")
