"""XKV's allocation step: one cache size per layer under a total, maximising the summed retention.

    curves [L, S] float   retention of layer l when it keeps sizes[s] tokens (per KV head)
    sizes  [S] int        ascending candidate sizes, the same grid for every layer
    total  int            sum over layers of the chosen sizes may not exceed it

    maximise  sum_l curves[l, c_l]   subject to   sum_l sizes[c_l] <= total

Two exact solvers:
- greedy marginal gain, when the grid steps are all equal and every curve is concave on the grid:
  each step costs the same, the per-layer gains only shrink, so taking the largest remaining
  positive gain until the total is spent is optimal (separable concave allocation);
- dynamic programming over the (gcd-reduced) sizes otherwise, which is exact for any curve.
`method="auto"` picks greedy when it is exact and says which one ran (`Solution.method`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from functools import reduce

import numpy as np
from kvjax.errors import InputError

#: slack on the concavity test: measured curves are float32 averages
CONCAVITY_TOL = 1e-9

METHODS = ("auto", "greedy", "dp")


@dataclasses.dataclass(frozen=True)
class Solution:
    """budgets [L] int (chosen sizes), choice [L] int (indices into sizes), value (summed
    retention), method ("greedy" or "dp")."""

    budgets: np.ndarray
    choice: np.ndarray
    value: float
    method: str


def _validate(curves, sizes, total):
    """-> (curves [L, S] float64, sizes [S] int64, total int), or ValueError naming the problem."""
    curves = np.asarray(curves, np.float64)
    sizes_arr = np.asarray(sizes)
    if curves.ndim != 2 or curves.shape[0] == 0 or curves.shape[1] == 0:
        raise InputError(f"curves must have shape [L, S] with L, S >= 1, got {curves.shape}")
    if not np.all(np.isfinite(curves)):
        raise InputError("curves must be finite (no NaN or inf)")
    if sizes_arr.ndim != 1 or sizes_arr.shape[0] != curves.shape[1]:
        raise InputError(
            f"sizes must have shape [S] = [{curves.shape[1]}] (one per curve column), got {sizes_arr.shape}"
        )
    if not np.issubdtype(sizes_arr.dtype, np.integer):
        raise InputError(f"sizes must be integers, got {sizes_arr.dtype}")
    sizes_arr = sizes_arr.astype(np.int64)
    if (sizes_arr < 0).any():
        raise InputError(f"sizes must be >= 0, got {sizes_arr.tolist()}")
    if (np.diff(sizes_arr) <= 0).any():
        raise InputError(f"sizes must be strictly ascending, got {sizes_arr.tolist()}")
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)):
        raise InputError(f"total must be an int, got {total!r}")
    num_layers = curves.shape[0]
    floor = num_layers * int(sizes_arr[0])
    if total < floor:
        raise InputError(
            f"total ({total}) is below {num_layers} layers x the smallest size ({sizes_arr[0]}) = {floor}: "
            "raise the total or add a smaller size to the grid"
        )
    return curves, sizes_arr, int(total)


def greedy_is_exact(curves, sizes) -> bool:
    """True when every grid step has the same cost and every curve is concave on the grid."""
    curves, sizes = np.asarray(curves, np.float64), np.asarray(sizes, np.int64)
    steps = np.diff(sizes)
    if steps.size == 0:
        return True
    if (steps != steps[0]).any():
        return False
    gains = np.diff(curves, axis=1)
    scale = max(1.0, float(np.max(np.abs(curves))))
    return bool(np.all(np.diff(gains, axis=1) <= CONCAVITY_TOL * scale))


def _greedy(curves, sizes, total):
    """Start every layer at the smallest size; buy the largest positive next-step gain while the
    total allows. Ties go to the lower layer (heap order), so the result is deterministic."""
    num_layers, num_sizes = curves.shape
    choice = np.zeros(num_layers, np.int64)
    step = int(sizes[1] - sizes[0]) if num_sizes > 1 else 0
    spare = total - num_layers * int(sizes[0])
    heap = [(-(curves[l, 1] - curves[l, 0]), l) for l in range(num_layers)] if num_sizes > 1 else []
    heapq.heapify(heap)
    while heap and spare >= step:
        neg_gain, l = heapq.heappop(heap)
        if -neg_gain <= 0:
            break  # concave: no later step of any layer gains anything either
        choice[l] += 1
        spare -= step
        if choice[l] + 1 < num_sizes:
            c = choice[l]
            heapq.heappush(heap, (-(curves[l, c + 1] - curves[l, c]), l))
    return choice


def _dp(curves, sizes, total):
    """Exact knapsack over sizes measured above the smallest, in units of their gcd.

    best[u] = best value of the layers so far using at most u units; arg[l, u] = the choice of
    layer l on the optimal path ending at u. O(L * S * U) with U = spare units.
    """
    num_layers, num_sizes = curves.shape
    extra = sizes - sizes[0]
    unit = reduce(math.gcd, (int(e) for e in extra), 0) or 1
    cost = (extra // unit).astype(np.int64)  # [S]
    capacity = (total - num_layers * int(sizes[0])) // unit
    capacity = min(capacity, num_layers * int(cost[-1]))  # more units than every layer's max buys nothing
    best = np.zeros(capacity + 1, np.float64)
    arg = np.zeros((num_layers, capacity + 1), np.int64)
    for l in range(num_layers):
        new = np.full(capacity + 1, -np.inf)
        pick = np.zeros(capacity + 1, np.int64)
        for s in range(num_sizes):  # ascending: on ties the smaller size wins (strict >)
            c = int(cost[s])
            if c > capacity:
                break
            cand = np.full(capacity + 1, -np.inf)
            cand[c:] = best[: capacity + 1 - c] + curves[l, s]
            better = cand > new
            new = np.where(better, cand, new)
            pick = np.where(better, s, pick)
        best, arg[l] = new, pick
    choice = np.zeros(num_layers, np.int64)
    u = int(np.argmax(best))  # first maximum: the smallest total among the optimal allocations
    for l in range(num_layers - 1, -1, -1):
        choice[l] = arg[l, u]
        u -= int(cost[choice[l]])
    return choice


def solve(curves, sizes, total: int, *, method: str = "auto") -> Solution:
    """Choose one size per layer: sum of sizes <= total, summed curve value maximal.

    method "auto" runs greedy when it is exact (equal grid steps, concave curves), else DP;
    "greedy" forces greedy (ValueError when it would not be exact); "dp" forces DP.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    curves, sizes, total = _validate(curves, sizes, total)
    exact = greedy_is_exact(curves, sizes)
    if method == "greedy" and not exact:
        raise InputError("greedy is only exact for equal grid steps and concave curves: use method='dp' or 'auto'")
    used = "greedy" if method == "greedy" or (method == "auto" and exact) else "dp"
    choice = _greedy(curves, sizes, total) if used == "greedy" else _dp(curves, sizes, total)
    value = float(curves[np.arange(curves.shape[0]), choice].sum())
    return Solution(sizes[choice].astype(np.int64), choice, value, used)


def solve_layer_budgets(curves, sizes, total: int, *, method: str = "auto") -> np.ndarray:
    """[L] int: the chosen size of each layer (see `solve`, which also says which solver ran)."""
    return solve(curves, sizes, total, method=method).budgets


def brute_force_layer_budgets(curves, sizes, total: int) -> Solution:
    """Every combination (S^L of them; tests only). Ties: the first combination in
    lexicographic order of choices."""
    curves, sizes, total = _validate(curves, sizes, total)
    num_layers, num_sizes = curves.shape
    if num_sizes**num_layers > 2_000_000:
        raise InputError(f"{num_sizes}^{num_layers} combinations are too many for brute force")
    best, best_choice = -np.inf, None
    rows = np.arange(num_layers)
    for combo in itertools.product(range(num_sizes), repeat=num_layers):
        c = np.asarray(combo)
        if sizes[c].sum() > total:
            continue
        v = float(curves[rows, c].sum())
        if v > best:
            best, best_choice = v, c
    return Solution(sizes[best_choice].astype(np.int64), best_choice, best, "brute_force")
