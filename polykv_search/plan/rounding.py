"""Integer budgets from real-valued shares: proportional, within floors and caps, summing exactly to a total."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from polykv_search.errors import ConfigError


def budget_total(average_budget: float, num_layers: int) -> int:
    """The plan total for an average budget: average x layers, exact, halves rounded up."""
    exact = Fraction(average_budget) * num_layers  # Fraction(float) is exact: no float error, no overflow
    return math.floor(exact + Fraction(1, 2))


def exact_integer_budgets(weights: Sequence[float], total: int, *, floor: int = 1,
                          cap: int | Sequence[int] | None = None) -> list[int]:
    """Split `total` into integers proportional to `weights`, each in [floor, cap], summing exactly to `total`.

    Real shares are clamped water-filling (x_i = clamp(t * w_i, floor, cap_i), t solved so they sum to
    `total`); they are then rounded by largest remainder, so every integer is within 1 of its share.
    All-zero weights split evenly. Raises ConfigError when no split fits the floors and caps.
    """
    n = len(weights)
    caps = _caps(cap, n)
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ConfigError(f"budget weights must be finite and >= 0, got {list(weights)[:8]}; "
                          "check the signals or preferences they come from")
    if isinstance(total, bool) or not isinstance(total, int):
        raise ConfigError(f"budget total {total!r} is not an integer; round it before splitting")
    if n == 0:
        if total != 0:
            raise ConfigError(f"budget total {total} cannot be split over zero layers; the model has no "
                              "compressible layer, so the total must be 0")
        return []
    if any(c < floor for c in caps):
        raise ConfigError(f"a budget cap ({min(caps)}) is below the floor {floor}; raise the cap")
    if total < n * floor:
        raise ConfigError(f"budget total {total} cannot give {n} layers at least {floor} token(s) each; "
                          f"raise the budget to at least {n * floor} in total ({floor} per layer)")
    if total > sum(caps):
        raise ConfigError(f"budget total {total} exceeds what {n} layers can hold under the cap "
                          f"(sum of caps {sum(caps)}); lower the budget or raise the cap")
    shares = _water_fill(w, total, floor=floor, caps=caps)
    return _largest_remainder(shares, w, total, floor=floor, caps=caps)


def _caps(cap: int | Sequence[int] | None, n: int) -> list[int]:
    if cap is None:
        return [2**62] * n
    if isinstance(cap, int):
        return [cap] * n
    caps = [int(c) for c in cap]
    if len(caps) != n:
        raise ConfigError(f"{len(caps)} caps given for {n} weights; give one cap per weight or a single int")
    return caps


def _water_fill(w: list[float], total: int, *, floor: int, caps: list[int]) -> list[float]:
    """Real shares clamp(t * w_i, floor, cap_i) summing to `total`; zero-weight items share what is left.

    f(t) = sum_i clamp(t * w_i, floor, cap_i) is piecewise linear and non-decreasing in t, with breakpoints
    at floor / w_i and cap_i / w_i: find the segment where it reaches `total`, then solve that segment exactly.
    """
    top = max(w)
    if top == 0:
        w = [1.0] * len(w)
        top = 1.0
    w = [x / top for x in w]  # in [0, 1]: no overflow below
    weighted = [i for i, x in enumerate(w) if x > 0 and math.isfinite(caps[i] / x)]
    rest = [i for i in range(len(w)) if i not in set(weighted)]
    reach = sum(caps[i] for i in weighted) + floor * len(rest)
    if reach < total:  # every weighted item is capped: the zero-weight items split what is left evenly
        shares = [float(caps[i]) for i in range(len(w))]
        spare = _water_fill([1.0] * len(rest), total - sum(caps[i] for i in weighted), floor=floor,
                            caps=[caps[i] for i in rest])
        for i, share in zip(rest, spare):
            shares[i] = share
        return shares

    def filled(t: float) -> list[float]:
        return [min(float(caps[i]), max(float(floor), t * w[i])) if i in weighted_set else float(floor)
                for i in range(len(w))]

    weighted_set = set(weighted)
    points = sorted({p for i in weighted for p in (floor / w[i], caps[i] / w[i])})
    low = 0.0
    for point in points:
        if sum(filled(point)) >= total:
            break
        low = point
    else:
        return filled(points[-1])
    # On (low, point) the free items are linear in t: solve sum = total for t on that segment.
    middle = filled((low + point) / 2)
    free = [i for i in weighted if floor < middle[i] < caps[i]]
    fixed = sum(middle[i] for i in range(len(w)) if i not in set(free))
    if not free:
        return filled(point)
    t = (total - fixed) / sum(w[i] for i in free)
    return filled(min(max(t, low), point))


def _largest_remainder(shares: list[float], w: list[float], total: int, *, floor: int,
                       caps: list[int]) -> list[int]:
    out = [min(c, max(floor, math.floor(x))) for x, c in zip(shares, caps)]
    left = total - sum(out)
    # Biggest fractional parts gain first; ties go to the larger weight, then the lower index, so the order
    # of the weights is kept and a decreasing share stays decreasing.
    while left > 0:
        order = sorted((i for i in range(len(out)) if out[i] < caps[i]), key=lambda i: (out[i] - shares[i], -w[i], i))
        for i in order[:left]:
            out[i] += 1
        left = total - sum(out)
    while left < 0:
        order = sorted((i for i in range(len(out)) if out[i] > floor), key=lambda i: (shares[i] - out[i], w[i], -i))
        for i in order[:-left]:
            out[i] -= 1
        left = total - sum(out)
    return out
