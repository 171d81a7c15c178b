"""Benchmark: the shared-prefill engine against kvpress's own pipeline run once per plan, for K plans on the
same samples, measured side by side in one run; also counts prefills and checks that answers agree.

    python benchmarks/evaluate_speed.py                       # K=10 plans, 4 eval samples, SmolLM2
    python benchmarks/evaluate_speed.py --samples 8 --budget 128

Goal (issue 3): at least 5x faster than kvpress's pipeline once per plan.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/eval.jsonl")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--out", default="outputs/benchmarks/evaluate_speed.json")
    args = parser.parse_args()

    from kvpress import KVPressTextGenerationPipeline

    from polykv_search.data import load_samples
    from polykv_search.engine import PrefillEngine
    from polykv_search.models import load_model
    from polykv_search.optimization import pyramidkv_plan
    from polykv_search.plan import LayerPlan, Plan, uniform_plan
    from polykv_search.policies import DEFAULT_POLICIES
    from polykv_search.runtime import PlanPress, polykv_attention

    lm = load_model(args.model)
    info = lm.info
    samples = load_samples(args.data)[: args.samples]
    plans = [uniform_plan(info, policy=p, budget=args.budget) for p in DEFAULT_POLICIES]  # 8
    plans.append(pyramidkv_plan(info, policy="snapkv", budget=args.budget))
    snapkv = uniform_plan(info, policy="snapkv", budget=args.budget)  # then mix its policies per layer
    mixed = [LayerPlan.of(layer, DEFAULT_POLICIES[i % len(DEFAULT_POLICIES)], snapkv.layers[layer].budget)
             for i, layer in enumerate(info.compressible_layers)]
    plans.append(Plan.build(info, average_budget=args.budget, layers=mixed, search=snapkv.search))
    methods = plans

    prefills = {"kvpress": 0}

    def count(module, args_, kwargs):  # a prefill is a forward that starts from an empty cache
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:
            prefills["kvpress"] += 1

    # engine: one prefill per sample, all plans batched
    engine = PrefillEngine(lm, scorers=DEFAULT_POLICIES)
    start = time.perf_counter()
    engine_answers = {}
    for sample in samples:
        state = engine.prefill(sample)
        for number, result in enumerate(engine.run_many(state, methods, with_kl=False)):
            engine_answers[(sample.id, number)] = result.answer
    engine_seconds = time.perf_counter() - start

    # kvpress: its pipeline, once per plan and sample (same token ids; PlanPress compresses in its hooks)
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    states = [engine.prefill(s) for s in samples]  # prompts only (not timed or counted): same ids for both
    handle = lm.model.model.register_forward_pre_hook(count, with_kwargs=True)
    start = time.perf_counter()
    agree = 0
    try:
        with polykv_attention(lm.model):  # restores the model's attention afterwards
            for state in states:
                inputs = {"context_ids": torch.tensor([state.parts.context_ids]),
                          "questions_ids": [torch.tensor([state.parts.question_ids])]}
                for number, plan in enumerate(methods):
                    # Pipeline.forward: kvpress's generation from token ids (the engine's prompt, not re-tokenized)
                    answer = pipe.forward(inputs, max_new_tokens=state.parts.max_new_tokens, press=PlanPress(plan))[0]
                    agree += answer == engine_answers[(state.sample.id, number)]
    finally:
        handle.remove()
    kvpress_seconds = time.perf_counter() - start
    total = len(samples) * len(methods)
    report = {"model": args.model, "samples": len(samples), "plans": len(methods), "budget": args.budget,
              "engine_s": round(engine_seconds, 2), "kvpress_s": round(kvpress_seconds, 2),
              "speedup": round(kvpress_seconds / engine_seconds, 2), "engine_prefills": len(samples),
              "kvpress_prefills": prefills["kvpress"], "answers_agree": f"{agree}/{total}"}
    print(f"engine : {report['engine_s']} s, {report['engine_prefills']} prefills")
    print(f"kvpress: {report['kvpress_s']} s, {report['kvpress_prefills']} prefills (its pipeline, once per plan)")
    print(f"speedup: {report['speedup']}x for K={len(methods)} plans on {len(samples)} samples (goal >= 5x); "
          f"greedy answers agree on {report['answers_agree']} (batched decoding vs one by one)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
