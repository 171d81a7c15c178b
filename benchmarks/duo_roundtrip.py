"""Check on a real model: a plan exported with `export --to duo-attention`, run by kvpress's DuoAttentionPress (our
DuoAttentionPatternPress: only the pattern's source differs), keeps the tokens our runtime keeps for the same plan
and gives the same teacher-forced log-probabilities and greedy answer.

    polykv-search optimize --profile outputs/readme/smollm2/profile.safetensors --cost head_fisher \
        --target duo-attention --budget 256 --out outputs/engines/duo_plan.json
    python benchmarks/duo_roundtrip.py outputs/engines/duo_plan.json --context 2048 --samples 1

`--context` is the export's (the plan's notes say which): heads keeping at least that many tokens are DuoAttention's
full heads, so only samples whose context fits in it are compared (on longer ones our runtime's "full" heads keep
their budget while DuoAttention's keep everything).

Prints, per sample: tokens kept per KV head that differ between the two (expected 0), the largest difference of
the teacher-forced log-probabilities over the question and reference answer, and both greedy answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import DynamicCache

from polykv_search.data import build_prompt, load_samples, spread_over_tasks
from polykv_search.export import export_plan
from polykv_search.export.duo_press import DuoAttentionPatternPress
from polykv_search.models import load_model
from polykv_search.plan import PlanFile
from polykv_search.runtime import PlanPress, apply_plan, polykv_attention


def greedy(model, context: list[int], question: list[int], press, *, outer=None, steps: int = 24) -> list[int]:
    """Prefill the context under `press`, then the question and the answer a token at a time."""
    cache = DynamicCache(config=model.config)
    tokens, position = [], len(context)

    def step(token: int) -> torch.Tensor:
        nonlocal position
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[position]]))
        position += 1
        return out.logits[0, -1]

    with torch.no_grad():
        with outer if outer is not None else torch.no_grad():
            with press(model):
                model(input_ids=torch.tensor([context]), past_key_values=cache)
            for token in question[:-1]:
                step(token)
            token = question[-1]
            for _ in range(steps):
                token = int(step(token).argmax())
                tokens.append(token)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/eval.jsonl")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048, help="the export's --context (see the plan's notes)")
    parser.add_argument("--out", type=Path, default=Path("outputs/engines/duo_roundtrip.json"))
    args = parser.parse_args()
    lm = load_model(args.model, dtype="float32")
    context_limit = lm.info.max_context or 8192
    folder = export_plan(args.plan, to="duo-attention", out=args.out.parent / "duo_pattern", context=args.context)
    plan = PlanFile.load(args.plan).plans[0]
    model, rows = lm.model, []
    fitting = [s for s in load_samples(args.data)
               if len(build_prompt(s, lm.tokenizer, max_context_tokens=context_limit).context_ids) <= args.context]
    for sample in spread_over_tasks(fitting, args.samples):
        parts = build_prompt(sample, lm.tokenizer, max_context_tokens=context_limit)
        context, suffix = list(parts.context_ids), list(parts.question_ids) + list(parts.answer_ids)
        n = len(context)
        positions = torch.arange(n, n + len(suffix))[None]
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            with DuoAttentionPatternPress(pattern_dir=str(folder))(model):
                model(input_ids=torch.tensor([context]), past_key_values=cache)
            masked = [layer.self_attn.masked_key_indices for layer in model.model.layers]
            theirs = torch.log_softmax(model(input_ids=torch.tensor([suffix]), past_key_values=cache,
                                             position_ids=positions).logits.float(), -1)
            with apply_plan(model, plan) as press:
                cache = DynamicCache(config=model.config)
                model(input_ids=torch.tensor([context]), past_key_values=cache)
                ours = torch.log_softmax(model(input_ids=torch.tensor([suffix]), past_key_values=cache,
                                               position_ids=positions).logits.float(), -1)
            kept_ours = press.kept_indices
        differing = 0
        for layer, found in enumerate(masked):
            if found is None or layer not in kept_ours:
                continue
            batch, head, seq = found
            for h in range(lm.info.num_kv_heads):
                kept = set(range(n)) - set(seq[(batch == 0) & (head == h)].tolist())
                differing += len(kept ^ set(kept_ours[layer][h].tolist()))
        question = list(parts.question_ids)
        answer_theirs = greedy(model, context, question, DuoAttentionPatternPress(pattern_dir=str(folder)))
        answer_ours = greedy(model, context, question, PlanPress(plan), outer=polykv_attention(model))
        row = {"sample": sample.id, "context": n, "kept_tokens_differing": differing,
               "max_logprob_difference": float((theirs - ours).abs().max()),
               "answer_duo": lm.tokenizer.decode(answer_theirs), "answer_ours": lm.tokenizer.decode(answer_ours),
               "answers_equal": answer_theirs == answer_ours}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"plan": str(args.plan), "pattern": str(folder), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
