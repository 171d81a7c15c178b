"""Plans applied to a batch: `generate` over prompts of different lengths (left-padded, with an attention mask) gives
every row the greedy tokens it gets alone, on a tiny model of every family; each row keeps exactly its own top tokens
(a head whose budget exceeds a row's prompt keeps that prompt, never padding); the flattened ragged layout answers as
a dense masked reference, on its SDPA path and through the varlen kernels' layout."""

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from polykv_search.errors import PlanError
from polykv_search.plan import HeadPlan, LayerPlan, Plan
from polykv_search.plan.plan import ContextRange
from polykv_search.runtime import PlanPress, apply_plan, polykv_attention
from polykv_search.runtime.ragged import RaggedKV, RaggedLayer, grouped_sdpa, varlen_attention
from tests.conftest import FAMILIES, tiny_loaded
from tests.plans import TEST
from tests.test_families import mixed_plan, per_head_plan

LENGTHS = (120, 95, 140, 80)  # SnapKV needs more than its 64-token window


def prompts(lengths=LENGTHS, seed=5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 60, (n,), generator=g).tolist() for n in lengths]


def padded(rows: list[list[int]], *, side: str = "left", pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids, mask = torch.full((len(rows), width), pad), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, place], mask[i, place] = torch.tensor(row), 1
    return ids, mask


def greedy(lm, ids, mask=None, plan=None, steps=6) -> list[list[int]]:
    kwargs = dict(max_new_tokens=steps, do_sample=False, pad_token_id=2)
    if mask is not None:
        kwargs["attention_mask"] = mask
    if plan is None:
        out = lm.model.generate(ids, **kwargs)
    else:
        with apply_plan(lm.model, plan):
            out = lm.model.generate(ids, **kwargs)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return tiny_loaded(request.param, seed=2)


@pytest.mark.parametrize("kind", ["per_head", "per_layer"])
def test_a_batch_generates_what_each_prompt_generates_alone(family, kind):
    lm = family
    plan = per_head_plan(lm) if kind == "per_head" else mixed_plan(lm)
    rows = prompts()
    alone = [greedy(lm, torch.tensor([row]), plan=plan)[0] for row in rows]
    ids, mask = padded(rows)
    assert greedy(lm, ids, mask, plan=plan) == alone
    unplanned = greedy(lm, ids, mask)
    assert unplanned != alone  # the plan changes the answers: the comparison above is not of uncompressed caches


def two_head_plan(lm) -> Plan:
    """TOVA keeping 6 tokens in KV head 0 and H2O (+ recent) keeping 60 in head 1 (neither has SnapKV's 64-token
    minimum, and both rank by attention: KNorm's near-equal key norms tie within rounding)."""
    return Plan.build(lm.info, search=TEST, layers=[LayerPlan(index=i, policy=None, heads=(
        HeadPlan.of("tova", 6), HeadPlan.of("h2o_recent", 60))) for i in lm.info.compressible_layers])


def test_each_row_keeps_its_own_top_tokens_and_no_padding(tiny_llama):
    lm = tiny_llama
    plan = two_head_plan(lm)
    rows = prompts((120, 95, 140, 80, 40))  # the last row is shorter than head 1's budget
    for side in ("left", "right"):
        ids, mask = padded(rows[:4] + [rows[3]], side=side)  # equal rows make the view path; a padded one not
        press = PlanPress(plan)
        cache = DynamicCache(config=lm.model.config)
        with torch.no_grad(), polykv_attention(lm.model), press(lm.model):
            lm.model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0))  # as generate numbers padded rows
        width = ids.shape[1]
        for idx in lm.info.compressible_layers:
            layer = cache.layers[idx]
            budgets = [head.budget for head in plan.layers[idx].heads]
            assert isinstance(layer, RaggedLayer) and layer.batch_size == 5
            assert layer.lengths == [[min(b, len(row)) for b in budgets] for row in rows[:4] + [rows[3]]]
            for b, row in enumerate(rows[:4]):
                single = PlanPress(plan)
                with torch.no_grad(), polykv_attention(lm.model), single(lm.model):
                    lm.model(input_ids=torch.tensor([row]), past_key_values=DynamicCache(config=lm.model.config))
                offset = width - len(row) if side == "left" else 0
                for h, kept in enumerate(press.kept_indices[idx][b]):
                    assert set((kept - offset).tolist()) == set(single.kept_indices[idx][h].tolist()), (side, b, h)
    ids, mask = padded([rows[0], rows[-1]])  # a row shorter than the wide head's budget keeps its whole prompt
    press = PlanPress(plan)
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad(), polykv_attention(lm.model), press(lm.model):
        lm.model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    short = len(rows[-1])
    for idx in lm.info.compressible_layers:
        kept = press.kept_indices[idx][1][1]
        assert sorted(kept.tolist()) == list(range(ids.shape[1] - short, ids.shape[1]))  # all real, no padding


def test_plan_press_itself_serves_generate_on_a_batch(tiny_llama):
    lm = tiny_llama
    plan = per_head_plan(lm)
    rows = prompts()
    ids, mask = padded(rows)
    with polykv_attention(lm.model), PlanPress(plan)(lm.model):
        out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out[:, ids.shape[1]:].tolist() == [row[:4] for row in greedy(lm, ids, mask, plan=plan)]


def test_a_batch_across_two_rungs_is_refused_in_one_line(tiny_llama):
    lm = tiny_llama
    short, long = per_head_plan(lm), per_head_plan(lm)
    rungs = (replace(short, context=ContextRange(min_tokens=0, max_tokens=100, calibrated=(60, 100))),
             replace(long, context=ContextRange(min_tokens=101, max_tokens=None, calibrated=(101, 200))))
    ids, mask = padded(prompts((120, 80)))
    with pytest.raises(PlanError, match="fall in different rungs") as err:
        with polykv_attention(lm.model), PlanPress(rungs[0], rungs=rungs)(lm.model):
            lm.model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=lm.model.config))
    assert "\n" not in str(err.value)


def test_a_cache_refuses_states_of_another_model_or_batch():
    layer = RaggedLayer([[torch.randn(5, 4), torch.randn(7, 4)]], [[torch.randn(5, 4), torch.randn(7, 4)]])
    for wrong in (torch.zeros(2, 2, 1, 4), torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, 1, 8)):
        with pytest.raises(ValueError, match="serves the one model and batch") as err:
            layer.update(wrong, wrong)
        assert "\n" not in str(err.value)


def ragged_pair(lengths: list[list[int]], dim: int = 8, seed: int = 0) -> tuple[RaggedLayer, list, list]:
    g = torch.Generator().manual_seed(seed)
    keys = [[torch.randn(n, dim, generator=g) for n in row] for row in lengths]
    values = [[torch.randn(n, dim, generator=g) for n in row] for row in lengths]
    return RaggedLayer(keys, values), keys, values


def dense_reference(query, keys, values, scale):
    """Every (row, KV head) padded to the longest, the padding and the future hidden: the masked dense reference."""
    batch, num_heads, q_len, dim = query.shape
    num_kv = len(keys[0])
    group = num_heads // num_kv
    out = torch.zeros(batch, q_len, num_heads, dim)
    for b in range(batch):
        for h in range(num_kv):
            k, v = keys[b][h], values[b][h]
            longest = max(len(x) for row in keys for x in row)
            pad_k = torch.cat([k, torch.zeros(longest - len(k), dim)])
            pad_v = torch.cat([v, torch.zeros(longest - len(v), dim)])
            logits = query[b, h * group:(h + 1) * group] @ pad_k.T * scale  # (G, q, longest)
            visible = torch.arange(longest)[None, :] <= torch.arange(len(k) - q_len, len(k))[:, None]
            probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
            out[b, :, h * group:(h + 1) * group] = (probs @ pad_v).transpose(0, 1)
    return out


@pytest.mark.parametrize("lengths", [[[9, 4, 6], [9, 4, 6]], [[9, 4, 6], [3, 11, 6]]])
@pytest.mark.parametrize("q_len", [1, 3])
def test_the_flattened_layout_answers_as_the_dense_masked_reference(lengths, q_len):
    layer, keys, values = ragged_pair(lengths)
    batch, num_kv = len(lengths), len(lengths[0])
    new_k, new_v = torch.randn(batch, num_kv, q_len, 8), torch.randn(batch, num_kv, q_len, 8)
    for _ in range(40):  # grow past the first buffers, then cut back: the layout keeps gaps after each segment
        layer.update(torch.randn(batch, num_kv, 1, 8), torch.randn(batch, num_kv, 1, 8))
    layer.crop(-40)
    k_all, v_all = layer.update(new_k, new_v)
    keys = [[torch.cat([keys[b][h], new_k[b, h]]) for h in range(num_kv)] for b in range(batch)]
    values = [[torch.cat([values[b][h], new_v[b, h]]) for h in range(num_kv)] for b in range(batch)]
    query = torch.randn(batch, num_kv * 2, q_len, 8)
    expected = dense_reference(query, keys, values, 0.3)
    torch.testing.assert_close(grouped_sdpa(query, k_all, v_all, scaling=0.3), expected, atol=1e-5, rtol=1e-5)
    index = (torch.tensor(k_all.starts, dtype=torch.int32), torch.tensor(k_all.used, dtype=torch.int32))
    with_index = RaggedKV(k_all.data, k_all.starts, k_all.used, k_all.batch, k_all.length, k_all.appended, index)
    torch.testing.assert_close(varlen_attention(reference_varlen, query, with_index, v_all, 0.3), expected,
                               atol=1e-5, rtol=1e-5)


def reference_varlen(q, k, v, cu_q, starts, used, max_q, max_k, scale):
    """What a varlen kernel computes, sequence by sequence (query (T_q, G, D), one KV head, seqused_k, bottom-right
    causal): to check the layout `varlen_attention` hands it."""
    out = torch.empty_like(q)
    for i in range(len(used)):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        keys = k[int(starts[i]):int(starts[i]) + int(used[i]), 0]
        vals = v[int(starts[i]):int(starts[i]) + int(used[i]), 0]
        n, m = len(keys), rows.stop - rows.start
        logits = torch.einsum("qgd,kd->gqk", q[rows], keys) * scale
        visible = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        out[rows] = torch.einsum("gqk,kd->qgd", logits.masked_fill(~visible, float("-inf")).softmax(-1), vals)
    return out


def test_no_cpu_only_private_op_runs_without_a_device_check():
    """A private aten op that exists for CPU tensors only (`*_for_cpu`) is called only inside a branch on the
    device's type, so nothing in the package fails on a GPU for calling it."""
    import ast
    from pathlib import Path

    import polykv_search
    offenders = []
    for path in Path(polykv_search.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.endswith("_for_cpu"):
                guarded, up = False, parents.get(node)
                while up is not None and not guarded:
                    if isinstance(up, ast.If) and "device.type" in ast.unparse(up.test) \
                            and "cpu" in ast.unparse(up.test):
                        guarded = True
                    up = parents.get(up)
                if not guarded:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
