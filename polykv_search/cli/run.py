"""`polykv-search run`: the whole job on one model — calibrate on the calib split, optimize, evaluate on the
held-out eval split — with everything under outputs/<model>/ and the comparison table with R at the end.

    polykv-search run                                    # smollm2-135m at 128 tokens per layer, per KV head
    polykv-search run --model gemma3-270m --budget 64,128,256,512
    polykv-search run --budget 128 --cost mass_lost      # per layer, from the attention mass (the fastest)
    polykv-search run --budget 64,128,256 --target trtllm  # StreamingLLM windows per layer, guarded against one window
    polykv-search run --budget 64,128,256,512 --cost layer_kl --max-calib-samples 12 \\
        --policies streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent \\
        --grid 16,32,64,128,256,512,1024,2048           # the per-layer KL cost (slower calibration)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from polykv_search.cli import app
from polykv_search.cli.errors import err_console
from polykv_search.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_MODEL,
    CapOpt,
    ColumnMapOpt,
    DeviceOpt,
    DtypeOpt,
    FloorOpt,
    GridOpt,
    JsonOpt,
    MaxContextOpt,
    MaxPoliciesOpt,
    MetricOpt,
    ModelOpt,
    NTrialsOpt,
    OnlyOpt,
    QuestionAwareOpt,
    RevisionOpt,
    SolverOpt,
    StorageOpt,
    TieOpt,
    TrustOpt,
    WeightingOpt,
    choices,
    parse_allocators,
    parse_allowed,
    parse_budget_list,
    parse_column_map,
    parse_int_list,
    parse_str_list,
    parse_tied,
)
from polykv_search.cli.render import choice_table, plan_table, progress_bars, recovery_lines
from polykv_search.errors import ConfigError
from polykv_search.plan.names import COST_NAMES

if TYPE_CHECKING:  # the library loads torch (seconds); the command imports it when it runs
    from polykv_search.optimization.guard import GuardRung


@app.command()
def run(
    model: ModelOpt = DEFAULT_MODEL,
    budget: Annotated[str, typer.Option("--budget", "-b", help="Average tokens per layer; a comma list "
                                        "optimizes and evaluates a ladder.")] = "128",
    solver: SolverOpt = "dp",
    metric: MetricOpt = "kl",
    cost: Annotated[str, typer.Option(
        metavar=choices(COST_NAMES), help="Profile cost. head_fisher (default): calibrates with --head-fisher and "
        "plans a policy and budget per KV head; head_kl: the same from the probes of --head-kl (much slower); per "
        "layer: mass_lost, out_err, layer_kl or layer_nll (these two calibrate with --layer-kl: slower), around_kl "
        "(calibrates with --around at the --budget values: slower still).")] = "head_fisher",
    weighting: WeightingOpt = "mean",
    policies: Annotated[str | None, typer.Option(help="Policies calibrated; without --policy-set, the plan's "
                                                 "candidates, one set (default: every policy of the default sets "
                                                 "with --cost head_fisher, the twelve default ones per "
                                                 "layer).")] = None,
    policy_set: Annotated[list[str] | None, typer.Option(
        "--policy-set", help="Candidate policies of one plan, a comma list ('all': every --policies); repeatable: "
        "a plan per set, and the guard keeps per budget the one that measures best on the calibration samples, if "
        "it also beats every uniform policy there. Default with --cost head_fisher and no --policies: "
        "expected_attention_recent,h2o_recent,streaming,tova_recent,snapkv,keydiff_recent, then those six and "
        "tova,knorm,expected_attention,keydiff,h2o (with --no-guard, the first alone).")] = None,
    floor: FloorOpt = 1,
    cap: CapOpt = None,
    max_policies: MaxPoliciesOpt = None,
    tie: TieOpt = None,
    only: OnlyOpt = None,
    n_trials: NTrialsOpt = 40,
    storage: StorageOpt = None,
    target: Annotated[str, typer.Option(help="Engine the plan must fit as it is: kvpress (any plan), trtllm (a "
                                        "StreamingLLM window per layer) or duo-attention (per KV head, StreamingLLM "
                                        "at one window or full). Calibrates streaming alone; the guard holds each "
                                        "rung to the engine's own setting (uniform streaming at that budget), and "
                                        "the report gives R against it. Then `polykv-search export --to TARGET`.")
                      ] = "kvpress",
    grid: GridOpt = None,
    compare: Annotated[str | None, typer.Option(help="Uniform policies the guard and the evaluation compare the "
                                                "plan with (default: the twelve default ones).")] = None,
    allocators: Annotated[str, typer.Option(help="Known allocators the evaluation also scores: pyramidkv, cake, "
                                            "adakv, or none.")] = "pyramidkv,cake,adakv",
    max_calib_samples: Annotated[int | None, typer.Option(min=1, help="Calibrate on N samples, taken in turn from each "
                                                          "task (default: all).")] = None,
    calib: Annotated[list[Path] | None, typer.Option(help="Calibration split; repeat for splits of other prompt "
                                                     "lengths: each is calibrated, optimized and guarded on its own "
                                                     "and the plan gets a rung per split, picked by the prompt's "
                                                     "length (default: calibration_data/calib.jsonl and "
                                                     "calib_long.jsonl).")] = None,
    strict_lengths: Annotated[bool, typer.Option("--strict-lengths", help="The plan refuses prompts far longer "
                                                 "than its longest calibration split instead of serving them with "
                                                 "its last rung.")] = False,
    eval_data: Annotated[Path, typer.Option("--eval", help="Held-out split.")] = Path("calibration_data/eval.jsonl"),
    max_eval_samples: Annotated[int | None, typer.Option(min=1, help="Evaluate on N samples, taken in turn from each "
                                                         "task.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder (default: outputs/<model>)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over: discard the folder's checkpoints instead of "
                                        "resuming from them.")] = False,
    guard: Annotated[bool, typer.Option("--guard/--no-guard", help="Keep a budget's optimized plan (the best of "
                                        "the policy sets' plans) only where it scores at least as well as every "
                                        "uniform policy on the calibration samples, each answered by the plan "
                                        "optimized without its half of them (else write that policy; the first "
                                        "set's optimized ladder stays in plan_optimized.json).")] = True,
    question_aware: QuestionAwareOpt = False,
    column_map: ColumnMapOpt = None,
    max_context: MaxContextOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Calibrate, optimize and evaluate in one go; interrupted runs resume where they stopped."""
    # imported here, as in every command: the library loads torch, transformers and kvpress (about 4 s)
    import polykv_search as pk

    config = pk.OptimizeConfig(solver=solver, cost=cost, weighting=weighting, metric=metric, floor=floor, cap=cap,
                               max_policies=max_policies, tied=parse_tied(tie), allowed=parse_allowed(only),
                               n_trials=n_trials, storage=storage, target=target).validated()
    with progress_bars() as progress:
        result = pk.run(model, budgets=parse_budget_list(budget), eval_data=eval_data,
                        calib_splits=[str(path) for path in calib] if calib else None, strict_lengths=strict_lengths,
                        policies=parse_str_list(policies) if policies else None,
                        policy_sets=parse_policy_sets(policy_set, policies),
                        grid=parse_int_list(grid, option="--grid") if grid else None,
                        compare=parse_str_list(compare) if compare else None, config=config,
                        allocators=parse_allocators(allocators),
                        max_calib_samples=max_calib_samples, max_eval_samples=max_eval_samples, out_dir=out, fresh=fresh,
                        guard=guard, column_map=parse_column_map(column_map), max_context_tokens=max_context,
                        question_aware=question_aware, device=device, dtype=dtype,
                        trust_remote_code=trust_remote_code, revision=revision,
                        progress=progress)
    report = result.report
    if as_json:
        typer.echo(json.dumps({"profile": str(result.calibration.path), "plan": str(result.plan_path),
                               "report": str(report.files["json"]), "guard": [asdict(c) for c in result.guard],
                               "guard_by_length": [{"context": p.context.to_dict(),
                                                    "guard": [asdict(c) for c in p.guard]} for p in result.by_length],
                               "recovery": [r.__dict__ for r in report.recovery]}))
        return
    err_console.print(f"profile: {result.calibration.path} ({result.calibration.seconds:.0f} s)")
    for part in result.by_length:
        if not part.guard:
            continue
        lengths = f" (prompts of {part.context.describe()})" if len(result.by_length) > 1 else ""
        candidates = list(part.guard[0].measured)
        err_console.print(choice_table(candidates, part.guard, what=f"task loss (1 - score){lengths}",
                                       samples=part.guard_samples))
        typer.echo(f"guard{lengths}: " + ", ".join(f"{c.budget:g} -> {kept_name(c)}" for c in part.guard))
        leads = [f"{c.budget:g} {c.lead.value:+.3f} [{c.lead.low:+.3f}, {c.lead.high:+.3f}] over {c.lead.over}"
                 + (f" ({c.lead.alone} of {c.lead.tasks} tasks of one sample: spread unseen)" if c.lead.alone else "")
                 for c in part.guard if c.lead is not None]
        if leads:
            typer.echo(f"guard lead{lengths} (task loss, 90% paired bootstrap): " + ", ".join(leads))
    err_console.print(plan_table(result.plan_file))
    err_console.print(report.markdown(), markup=False, highlight=False)
    for line in recovery_lines(report, "plan"):
        typer.echo(line)
    typer.echo(f"report: {report.files['markdown']}")


def kept_name(rung: GuardRung) -> str:
    """What the guard kept at a budget, in words: an optimized plan ("optimized plan (11 policies)", "optimized plan
    (= streaming)" where it keeps what that policy keeps) or a policy."""
    if not rung.kept_plan:
        return rung.chosen
    from polykv_search.optimization.guard import PLAN  # imported here: the module loads torch (loaded by now)

    optimized = "optimized " if rung.chosen.startswith(PLAN) else ""  # else a fixed window shape (trtllm)
    return f"{optimized}{rung.chosen}" + (f" (= {rung.same_as})" if rung.same_as else "")


def parse_policy_sets(values: list[str] | None, policies: str | None) -> list[list[str]] | None:
    """--policy-set values as lists of names ('all': every --policies); None when none is given."""
    if not values:
        return None
    sets = []
    for value in values:
        if "all" in parse_str_list(value) and value.strip() != "all":
            raise ConfigError(f"--policy-set {value!r}: 'all' stands alone (every --policies); list the policies "
                              "instead")
        if value.strip() == "all":
            if not policies:
                raise ConfigError("--policy-set all means every --policies: give --policies too")
            value = policies
        sets.append(parse_str_list(value))
    return sets
