"""Study (#35): TensorRT-LLM windows per layer chosen on costs measured as the engine computes them.

`optimize --target trtllm` chooses one window per layer on StreamingLLM costs measured by eviction after a full
prefill, with 4 sinks; TensorRT-LLM applies each layer's window in the prefill itself, with no sinks
(docs/engines.md, "Fidelity"), and that is how `evaluate --target trtllm` grades the plan. This script measures the
cost the engine's computation implies: for each calibration sample, each compressible layer l and each window W of
the grid, the KL over the reference answer (and the rise of its NLL) with layer l alone attending through a window of
W tokens over the whole prompt (`PrefillEngine.window_metrics`). The exact per-layer DP then chooses one window per
layer at each budget (windows above the sinks, as `optimize --target trtllm`), and the ladder is written as a plan
file for `evaluate --target trtllm`:

    python studies/trtllm_window_profile.py --model smollm2-135m --max-samples 6 --budget 64,128,256,512 \
        --out outputs/t35/window/plan.json
    polykv-search evaluate --model smollm2-135m --plan outputs/t35/window/plan.json --target plan=trtllm ...

(`--target NAME=trtllm` names the plan by its file's stem.)

`--around` measures each budget's costs around the engine's own setting instead: every other layer attends through
the engine's window of that budget (as it would without a plan), and the probed layer through each window from
budget/4 to budget*4 (`--spread 2`), so the DP moves tokens between layers where the layers' joint computation says
it pays (the additive proxy above, each layer costed with the others full, gave uneven plans that lost together).
About 4 probes a layer and budget.

Each sample's table is kept beside the plan (`costs/<sample id>.safetensors`) and reused when the script runs again.
A probe runs the model from its layer on over the whole prompt: about half a prefill, 5 windows x 30 layers a sample
on SmolLM2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polykv_search.data import load_samples, spread_over_tasks
from polykv_search.engine import PrefillEngine
from polykv_search.models import load_model
from polykv_search.optimization.problem import Problem
from polykv_search.optimization.solve import solve
from polykv_search.plan import PlanFile, budget_total
from polykv_search.policies import policy_params

STREAMING = "streaming"
N_SINK = int(policy_params(STREAMING)["n_sink"])


def sample_costs(engine: PrefillEngine, sample, layers: list[int], grid: list[int],
                 around: int | None = None) -> dict[str, torch.Tensor]:
    """{"window_kl", "window_nll"}: (L_c, G) for one sample. `around` None: the probed layer alone windowed, 0
    where the window holds the whole prompt. `around` B: every other layer at the engine's window of B tokens, and
    the background's own measure where the probed window is B."""
    state = engine.prefill(sample)
    parts = state.parts
    length = len(parts.context_ids) + len(parts.question_ids) + len(parts.answer_ids)
    background = dict.fromkeys(layers, around) if around is not None else {}
    probes = [(layer, w) for layer in layers for w in grid if (w != around if around is not None else w < length)]
    base_probe = [(layers[0], around)] if around is not None else []
    results = engine.window_metrics(state, probes + base_probe, background=background)
    measured = dict(zip(probes, results))
    full_nll = 0.0
    if parts.answer_ids:
        answer = torch.tensor(parts.answer_ids, device=state.full_logprobs.device)
        full_nll = float(-state.full_logprobs.gather(-1, answer[:, None]).mean())
    base = results[-1] if base_probe else {"kl": 0.0, "nll": full_nll}
    kl, nll = torch.zeros(len(layers), len(grid)), torch.zeros(len(layers), len(grid))
    for i, layer in enumerate(layers):
        for g, w in enumerate(grid):
            m = measured.get((layer, w), base)
            kl[i, g], nll[i, g] = m["kl"], m["nll"] - full_nll
    return {"window_kl": kl, "window_nll": nll}


def around_grid(budget: int, spread: int) -> list[int]:
    """The windows a layer may take around the engine's window of `budget`: budget / 2^k .. budget * 2^k, k <=
    `spread`, none under the sinks' floor."""
    return sorted({w for k in range(-spread, spread + 1)
                   if (w := int(budget * 2.0 ** k)) >= N_SINK + 1})


def mean_costs(folder: Path, samples, key: str, cost: str, measure) -> tuple[torch.Tensor, int]:
    """The mean over `samples` of each sample's table (kept as `folder/<sample id><key>.safetensors`, measured by
    `measure(sample)` where missing)."""
    tables = []
    for i, sample in enumerate(samples):
        path = folder / f"{sample.id}{key}.safetensors"
        if not path.exists():
            started = time.perf_counter()
            save_file(measure(sample), str(path))
            print(f"sample {i} ({sample.task}){key}: {time.perf_counter() - started:.0f} s", flush=True)
        tables.append(load_file(str(path))[cost])
    return torch.stack(tables).mean(0), len(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calib", default="calibration_data/calib.jsonl")
    parser.add_argument("--max-samples", type=int, default=8)
    parser.add_argument("--grid", default="16,64,256,1024,2048")
    parser.add_argument("--budget", default="64,128,256,512")
    parser.add_argument("--cost", choices=("window_kl", "window_nll"), default="window_kl")
    parser.add_argument("--around", action="store_true",
                        help="measure each budget's costs with every other layer at the engine's window of that "
                             "budget, on the grid budget/2^k..budget*2^k (k <= --spread), instead of --grid")
    parser.add_argument("--spread", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lm = load_model(args.model, dtype=args.dtype)
    layers = list(lm.info.compressible_layers)
    engine = PrefillEngine(lm, scorers=[STREAMING])
    folder = args.out.parent / "costs"
    folder.mkdir(parents=True, exist_ok=True)
    samples = spread_over_tasks(load_samples(args.calib), args.max_samples)
    plans = []
    for budget in (int(b) for b in args.budget.split(",")):
        if args.around:
            grid = around_grid(budget, args.spread)
            costs, n = mean_costs(folder, samples, f"-around{budget}", args.cost,
                                  lambda sample: sample_costs(engine, sample, layers, grid, around=budget))
            how = f"with every other layer at the engine's window of {budget} tokens"
        else:
            grid = sorted(int(w) for w in args.grid.split(","))
            costs, n = mean_costs(folder, samples, "", args.cost,
                                  lambda sample: sample_costs(engine, sample, layers, grid))
            how = "with that layer alone windowed"
        problem = Problem(costs.double().numpy()[:, None, :], grid, layers, [STREAMING],
                          total=budget_total(float(budget), len(layers)), floor=N_SINK + 1)
        allocation = solve(problem, solver="dp")
        notes = (f"trtllm: one window per layer, cost {args.cost} measured {how} through the whole prompt "
                 f"(TensorRT-LLM's computation, no sinks), mean of {n} calibration samples "
                 "(studies/trtllm_window_profile.py)")
        plan = allocation.to_plan(lm.info, average_budget=float(budget), notes=notes)
        plans.append(plan)
        windows = [plan.layers[idx].budget for idx in layers]
        print(f"budget {budget}: windows {windows}", flush=True)
    PlanFile.build(lm.info, plans).save(args.out)
    print(f"plan: {args.out}")


if __name__ == "__main__":
    main()
