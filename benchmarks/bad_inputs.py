"""The bad inputs of issue 33, each run through the command line on a tiny random model: prints a table of the case,
the exit code and the one line printed (stderr's first line; for a warning, the warning).

    python benchmarks/bad_inputs.py            # a few minutes on 2 CPU cores; needs nothing downloaded

Writes only under a temporary folder. `chattr +i` (root) makes the immutable folder; without it, chmod 555 does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "400"}


def tiny_model(folder: Path) -> None:
    """A 2-layer random Llama with a word-level tokenizer, saved as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the a of to and in is that it special magic number what answer question".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words + list("0123456789.?"))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def rows(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    words = "the a of to and in is that it what".split()
    out = []
    for i in range(n):
        context = " ".join(rng.choice(words) for _ in range(200)) + f" the special magic number is {41 + i} ."
        out.append({"context": context, "input": "what is the special magic number ?", "answers": [str(41 + i)],
                    "dataset": "multifieldqa_en", "_id": f"s{i}"})
    return out


def cli(*args: str | Path, cwd: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "polykv_search", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


def first_line(stderr: str, *, starting: str = "") -> str:
    """The first line starting with `starting` (a log record is one physical line when stderr is not a terminal)."""
    for line in stderr.splitlines():
        if line.strip() and line.startswith(starting):
            return line.strip()
    return "(nothing)"


def flip_bit(path: Path, offset_from_end: int = 40) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) - offset_from_end] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(raw))


def make_immutable(folder: Path) -> str:
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return "chattr +i"
    folder.chmod(0o555)
    return "chmod 555"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="polykv-bad-inputs-"))
    repo = Path(__file__).resolve().parents[1]
    ENV["PYTHONPATH"] = f"{repo}{os.pathsep}{ENV.get('PYTHONPATH', '')}"
    tiny_model(work / "tiny")
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(2)))
    calib = ["calibrate", "-m", "tiny", "-d", "d.jsonl", "--policies", "streaming,snapkv", "--budgets", "8,16",
             "--window", "16"]
    table: list[tuple[str, int, str]] = []

    def case(name: str, *args, starting: str = "") -> None:
        code, err = cli(*args, cwd=work)
        table.append((name, code, first_line(err or "(stdout)", starting=starting)))

    code, err = cli(*calib, "-o", "o", cwd=work)
    assert code == 0, err
    cli("optimize", "--profile", "o/profile.safetensors", "--budget", "12", "-o", "plan.json", cwd=work)

    # 1. a damaged checkpoint on --resume
    flip_bit(work / "o" / "checkpoints" / "sample-00000.safetensors")
    case("1 flipped bit in checkpoints/sample-00000 + --resume", *calib, "-o", "o", "--resume")

    # 2. a profile with its checksum deleted and a value edited
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(work / "o" / "profile.safetensors"), framework="pt") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k != "polykv_sha256"}
    arrays = load_file(str(work / "o" / "profile.safetensors"))
    arrays["mass_lost"].view(-1)[0] = 0.5
    save_file(arrays, str(work / "edited.safetensors"), metadata=meta)
    case("2 profile: checksum deleted, a value edited", "optimize", "--profile", "edited.safetensors", "--budget",
         "12", "-o", "p2.json")
    flipped = work / "flipped.safetensors"
    shutil.copy(work / "o" / "profile.safetensors", flipped)
    flip_bit(flipped)
    case("2 profile: one bit flipped", "optimize", "--profile", flipped, "--budget", "12", "-o", "p2.json")

    # 3. unwritable outputs
    (work / "d_imm").mkdir()
    how = make_immutable(work / "d_imm")
    try:
        case(f"3 optimize -o d/p.json, d immutable ({how})", "optimize", "--profile", "o/profile.safetensors",
             "--budget", "12", "-o", "d_imm/p.json")
        case(f"3 export -o d/x.json, d immutable ({how})", "export", "plan.json", "-o", "d_imm/x.json")
    finally:
        subprocess.run(["chattr", "-i", str(work / "d_imm")], capture_output=True)
        (work / "d_imm").chmod(0o755)
    (work / "out").mkdir()
    case("3 export -o out/ (an existing folder)", "export", "plan.json", "-o", "out/")

    # 4. misleading messages
    case("4 --max-samples 0", *calib, "-o", "o4", "--max-samples", "0")
    case("4 --max-samples -1", *calib, "-o", "o4", "--max-samples", "-1")
    (work / "plans").mkdir()
    case("4 validate plans/ (a folder)", "validate", "plans/")
    (work / "models").mkdir()
    case("4 -m models/nope (no such local folder)", *calib[:1], "-m", "models/nope", *calib[3:], "-o", "o4")
    custom = work / "custom"
    custom.mkdir()
    config = json.loads((work / "tiny" / "config.json").read_text())
    config.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_x.py").write_text("raise SystemExit('never run')\n")
    case("4 a model with its own code", "calibrate", "-m", "custom", "-d", "d.jsonl", "-o", "o4")
    (work / "fake.parquet").write_text("not parquet\n")
    case("4 a fake .parquet", "calibrate", "-m", "tiny", "-d", "fake.parquet", "-o", "o4")

    # 5. late
    case("5 optimize --budget 128,128,256", "optimize", "--profile", "o/profile.safetensors", "--budget",
         "128,128,256", "-o", "p5.json")

    # 6. silent
    dup = rows(2)
    dup[1]["_id"] = dup[0]["_id"]
    (work / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dup))
    case("6 duplicated _id values (a warning; runs)", "calibrate", *calib[1:3], "-d", "dup.jsonl", *calib[5:],
         "-o", "o6", starting="WARNING")
    case("6 re-run without --resume on checkpoints (warning)", *calib, "-o", "o6", starting="WARNING")
    code, err = cli(*calib[:1], "-m", "models/nope", *calib[3:], "-o", "o4", cwd=work)
    table.append(("6 stderr not a terminal: its first character", code, repr(err[:1]) + " (no blank line)"
                  if err[:1] != "\n" else "'\\n' (a blank line)"))

    # plans: checksum required
    data = json.loads((work / "plan.json").read_text())
    data.pop("checksum")
    (work / "hand.json").write_text(json.dumps(data))
    case("plan without a checksum (as another tool writes it)", "validate", "hand.json")
    case("validate --seal of that plan", "validate", "--seal", "hand.json")
    sealed = subprocess.run([sys.executable, "-m", "polykv_search", "validate", "hand.json"], cwd=work, env=ENV,
                            capture_output=True, text=True)
    table.append(("validate of the sealed plan (stdout)", sealed.returncode, sealed.stdout.strip()))
    data["plans"][0]["search"]["notes"] = "edited"
    (work / "edited.json").write_text(json.dumps({**data, "checksum": json.loads((work / "hand.json").read_text())
                                                  ["checksum"]}))
    case("plan edited after sealing", "export", "edited.json", "-o", "x.json")

    width = max(len(name) for name, _, _ in table)
    print(f"| {'case'.ljust(width)} | exit | line printed |")
    print(f"|{'-' * (width + 2)}|------|--------------|")
    for name, code, line in table:
        print(f"| {name.ljust(width)} | {code:>4} | {line.replace('|', '/').replace(str(work) + '/', '')} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
