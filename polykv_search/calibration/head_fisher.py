"""calibrate's cheap per-KV-head cost: a second-order (Fisher) estimate of head_kl, with no forward per head.

Compressing one KV head changes that head's attention output at the question and answer positions by a known
amount: the cost curves already compute it exactly from the decoding pass's attention, for every policy and
budget. What the probes add is how much that change moves the answer's output distribution. To second order, the
KL from the full cache's distribution p_t to the perturbed one, summed over the answer tokens, is
1/2 sum_t dz_t' F_t dz_t, where dz_t is the change of the logits (first order: the Jacobian times the change of the
attention output) and F_t = diag(p_t) - p_t p_t' is the softmax's Fisher matrix. Drawing a token y_t from p_t at
every answer position, the gradient g of sum_t log p_t(y_t) with respect to the attention outputs satisfies
E[(g . do)^2] = sum_t dz_t' F_t dz_t (the draws are independent and their scores have mean zero), so one
teacher-forced pass on the full cache and `draws` backward passes give an unbiased estimate of every cell
(layer, KV head, policy, budget) at once: draws x (one suffix forward + backward) per sample, where the probes cost
one suffix forward per cell (4,950 on SmolLM2 with `run`'s eleven candidate policies).

The estimate ranks the cells as the probes do, but it under-counts the few cells where compressing a head moves the
output most (on SmolLM2 the probes' KL is about 1.3x the estimate above 0.03 and 2.5x above 0.3, against 1.0 below
0.03), and those cells decide which heads a low-budget plan keeps whole. So calibrate then probes exactly the cells
whose estimate is above `probe_above` (0.003 by default), the largest first and at most `probe_share` of the
sample's cells (3.3%: 163 of SmolLM2's 4,950 with `run`'s eleven candidate policies), and keeps the estimate
elsewhere (`corrected`); the profile records which cells were measured. `benchmarks/head_fisher_check.py` measures
how well the estimate ranks and what each costs against the probes; `studies/fisher_probe_share.py` how the
threshold was chosen, and docs/results-per-head.md ("a candidate set per budget") the share.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from polykv_search.data import PromptParts
from polykv_search.models.anatomy import decoder_layers
from polykv_search.runtime.attention import constant_cache

DEFAULT_DRAWS = 16  # answer-token draws (one backward pass each) per sample
DEFAULT_PROBE_ABOVE = 0.003  # cells estimated above this mean KL per answer token are probed exactly,
DEFAULT_PROBE_SHARE = 0.033  # at most this share of a sample's cells (the largest estimates first)


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (only the attention outputs'); restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def detached_copy(cache: DynamicCache) -> DynamicCache:
    """A cache that new tokens can be appended to while `cache` keeps only what it holds now (the layers rebind their
    tensors on update, so copying the layer objects is enough; no tensor is copied)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def _plain_copy(cache: DynamicCache) -> DynamicCache:
    """A copy of `cache` whose tensors autograd may save (the prefill ran in inference mode); `cache` is untouched."""
    new = detached_copy(cache)
    for layer in new.layers:
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return new


def answer_gradients(model: torch.nn.Module, layers: Sequence[int], cache: DynamicCache, parts: PromptParts, *,
                     draws: int = DEFAULT_DRAWS, seed: int = 0) -> dict[int, torch.Tensor]:
    """Per layer in `layers`, the gradients (draws, H, S, D) of sum_t log p_t(y_t) with respect to the attention
    output (before the output projection) at the S question and answer positions, y_t drawn from the full cache's
    own distribution at each answer position (seeded by `seed`). `cache`: the full cache right after the context
    prefill (not modified)."""
    answer = list(parts.answer_ids)
    suffix = list(parts.question_ids) + answer
    if not answer or draws < 1:
        return {}
    blocks = decoder_layers(model)
    attn = {idx: blocks[idx].self_attn for idx in layers}
    num_heads = model.config.num_attention_heads
    device = next(model.parameters()).device
    n = len(parts.context_ids)
    deltas: dict[int, torch.Tensor] = {}

    def shifted(idx: int):
        def hook(module, args):
            zero = torch.zeros_like(args[0], requires_grad=True)  # d(loss)/d(zero) = d(loss)/d(attention output)
            deltas[idx] = zero
            return (args[0] + zero, *args[1:])
        return hook

    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad(), _frozen(model), constant_cache(model):
        handles = [module.o_proj.register_forward_pre_hook(shifted(idx)) for idx, module in attn.items()]
        try:
            out = model(input_ids=torch.tensor([suffix], device=device), past_key_values=_plain_copy(cache),
                        position_ids=torch.arange(n, n + len(suffix), device=device)[None],
                        logits_to_keep=len(answer) + 1)
        finally:
            for handle in handles:
                handle.remove()
        logits = out.logits[0, :-1]  # (A, V): the predictions of the answer tokens
        probs = torch.softmax(logits.float(), dim=-1).detach()
        on_cpu = probs.cpu()  # the generator draws on the CPU, whatever the device
        inputs = [deltas[idx] for idx in layers]
        grads: dict[int, list[torch.Tensor]] = {idx: [] for idx in layers}
        for k in range(draws):
            drawn = torch.multinomial(on_cpu, 1, generator=generator).to(device)  # (A, 1)
            score = -probs  # d log p(y) / d logits = onehot(y) - p
            score.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=score.dtype))
            found = torch.autograd.grad(logits, inputs, grad_outputs=score.to(logits.dtype),
                                        retain_graph=k < draws - 1)
            for idx, g in zip(layers, found):
                s = g.shape[1]
                grads[idx].append(g[0].reshape(s, num_heads, -1).transpose(0, 1).float().cpu())  # (H, S, D)
    return {idx: torch.stack(found) for idx, found in grads.items()}  # (draws, H, S, D)


def fisher_from_dot(dots: torch.Tensor, n_answer: int) -> torch.Tensor:
    """The estimated mean KL per answer token from the draws' dot products g . do (..., draws, ...) on dim 1."""
    return dots.pow(2).mean(dim=1) / (2 * max(n_answer, 1))


def cells_to_probe(estimate: torch.Tensor, above: float, share: float = 1.0) -> torch.Tensor:
    """The cells (same shape as `estimate`) whose estimate exceeds `above`, where the second order under-counts; if
    they are more than `share` of the sample's cells, the largest estimates among them (bounds the probes' cost)."""
    finite = ~torch.isnan(estimate)
    chosen = finite & (estimate > above)
    most = int(share * int(finite.sum()))
    if int(chosen.sum()) > most:
        flat = torch.where(chosen, estimate, torch.full_like(estimate, -math.inf)).flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, most).indices] = True
        chosen = keep.view_as(estimate) & chosen
    return chosen


def corrected(estimate: torch.Tensor, probed: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """The estimate with the `probed` cells replaced by their measured KL (clamped at 0: a KL, up to rounding)."""
    return torch.where(probed, measured.clamp_min(0.0), estimate)
