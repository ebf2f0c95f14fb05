"""Plots of what a policy kept: per-(layer, head) budgets, kept positions, accuracy against budget.

matplotlib is an optional extra (`pip install kvjax[plot]`), imported only when a function draws.
Every function draws on `ax` (a new figure when None) and returns that `matplotlib.axes.Axes`
(`ax.figure` is its Figure).

    out = kvjax.generate(params, prompt, policy=kvjax.policies.AdaKV(kvjax.policies.SnapKV(budget=128)))
    kvjax.plot.budgets_heatmap(out)                     # tokens kept per layer and KV head
    kvjax.plot.kept_positions_raster(out, layers=[0, 15, 29])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvjax.api import Generation, Prefilled
from kvjax.cache import Cache, kept_positions


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"kvjax.plot needs matplotlib, which is not installed ({e}): "
                          "pip install kvjax[plot]") from None
    return plt


def _axes(ax, figsize):
    plt = _pyplot()  # checked even with a given ax, so that the error always names the extra
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _cache_of(x) -> Cache | None:
    if isinstance(x, Cache):
        return x
    if isinstance(x, (Generation, Prefilled)):
        return x.cache
    return None


def _check_sequence(sequence, batch: int) -> int:
    if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)) or not 0 <= sequence < batch:
        raise ValueError(f"sequence={sequence!r} is not a sequence index of this batch of {batch} (0..{batch - 1})")
    return int(sequence)


def _indices(value, count: int, name: str) -> list[int]:
    """None (all), an int, or a sequence of distinct ints, each in [0, count)."""
    if value is None:
        return list(range(count))
    items = [value] if isinstance(value, (int, np.integer)) else list(value)
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < count:
            raise ValueError(f"{name}={value!r}: {i!r} is not an index in [0, {count})")
    if not items or len(set(items)) != len(items):
        raise ValueError(f"{name}={value!r} must name at least one index, each once")
    return [int(i) for i in items]


# ----------------------------------------------------------------------------------------------
# budgets


def budgets_heatmap(budgets, *, sequence: int = 0, ax=None, title: str | None = None, annotate: bool | None = None,
                    cmap: str = "viridis"):
    """Heatmap of the tokens each (layer, KV head) stream keeps (Ada-KV's and CAKE's allocations).

    budgets: `[L, H]` array-like, `[B, L, H]` (then `sequence` picks one), or a `Generation`
    (its `stats["layer_budgets"]`), a `Prefilled` or a `Cache` (its streams' budgets).
    annotate: write each value in its cell (default: when there are at most 100 cells).
    The image's array is the `[L, H]` budgets: rows are layers, columns KV heads.
    """
    if isinstance(budgets, Generation):
        arr = np.asarray(budgets.stats["layer_budgets"])
    elif _cache_of(budgets) is not None:
        arr = np.asarray(_cache_of(budgets).streams.budget).transpose(1, 0, 2)  # [B, L, H]
    else:
        try:
            arr = np.asarray(budgets, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"budgets must be a numeric [L, H] or [B, L, H] array ({e})") from None
    batched = arr.ndim == 3
    if batched:
        arr = arr[_check_sequence(sequence, arr.shape[0])]
    elif arr.ndim != 2:
        raise ValueError(f"budgets must be [L, H] or [B, L, H], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"budgets is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"budgets must be finite and non-negative, got values from {arr.min()} to {arr.max()}")
    num_layers, num_heads = arr.shape
    ax = _axes(ax, (max(4.0, 1.2 + 0.5 * num_heads), max(3.0, 1.0 + 0.25 * num_layers)))
    image = ax.imshow(arr, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="tokens kept")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    if num_heads <= 32:
        ax.set_xticks(range(num_heads))
    if num_layers <= 40:
        ax.set_yticks(range(num_layers))
    if annotate if annotate is not None else arr.size <= 100:
        middle = (arr.max() + arr.min()) / 2
        for (layer, head), value in np.ndenumerate(arr):
            ax.text(head, layer, f"{value:g}", ha="center", va="center", fontsize=7,
                    color="black" if value > middle else "white")
    if title is None:
        title = "Budget per layer and KV head" + (f" (sequence {sequence})" if batched else "")
    ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------------------------
# kept positions


def _kept_structure(kept, sequence: int) -> list[list[np.ndarray]]:
    """kept [layer][sequence][kv_head] -> int arrays; the chosen sequence's [layer][head] arrays."""
    if not isinstance(kept, Sequence) or len(kept) == 0:
        raise ValueError("kept must be kvjax.kept_positions(cache) ([layer][sequence][kv_head] -> positions), "
                         f"a Cache, a Prefilled or a Generation; got {type(kept).__name__}")
    batch = {len(per_b) for per_b in kept}
    if len(batch) != 1:
        raise ValueError(f"kept has layers with different numbers of sequences: {sorted(batch)}")
    sequence = _check_sequence(sequence, batch.pop())
    out = [list(per_b[sequence]) for per_b in kept]
    heads = {len(h) for h in out}
    if len(heads) != 1 or 0 in heads:
        raise ValueError(f"kept has layers with different (or no) numbers of KV heads: {sorted(heads)}")
    for layer, per_h in enumerate(out):
        for head, pos in enumerate(per_h):
            pos = np.asarray(pos)
            if pos.ndim != 1 or (pos.size and (not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0)):
                raise ValueError(f"kept[{layer}][{sequence}][{head}] must be a 1-D array of non-negative int "
                                 f"positions, got {pos.dtype} of shape {pos.shape}")
            per_h[head] = pos
    return out


def kept_positions_raster(kept, prompt_len: int | None = None, *, sequence: int = 0, layers=None, heads=None,
                          ax=None, title: str | None = None, marker_size: float = 4.0):
    """Raster of the kept positions: x = original position, one row per (layer, KV head).

    kept: `kvjax.kept_positions(cache)` (`[layer][sequence][kv_head]` -> sorted int positions), or a
    `Cache`, `Prefilled` or `Generation`. `prompt_len` (default: a Generation's prompt length)
    draws a dashed line where the prompt ends; tokens kept past it were generated.
    layers / heads: None (all), an index or a list of indices. Rows run top to bottom in the order
    (layers[0], heads[0]), (layers[0], heads[1]), ...; the scatter's offsets are (position, row).
    """
    if isinstance(kept, Generation) and prompt_len is None:
        prompt_len = kept.stats["prompt_lengths"][_check_sequence(sequence, len(kept.stats["prompt_lengths"]))]
    cache = _cache_of(kept)
    per_layer = _kept_structure(kept_positions(cache) if cache is not None else kept, sequence)
    if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, (int, np.integer))
                                   or prompt_len <= 0):
        raise ValueError(f"prompt_len must be a positive int, got {prompt_len!r}")
    layer_ids = _indices(layers, len(per_layer), "layers")
    head_ids = _indices(heads, len(per_layer[0]), "heads")
    rows = [(layer, head) for layer in layer_ids for head in head_ids]
    xs = [per_layer[layer][head] for layer, head in rows]
    ys = [np.full(len(x), r) for r, x in enumerate(xs)]
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    # one tab10 colour per layer, cycling
    color = np.concatenate([np.full(len(p), layer_ids.index(layer) % 10) for p, (layer, _) in zip(xs, rows)])

    ax = _axes(ax, (9.0, min(14.0, 1.5 + 0.16 * len(rows))))
    ax.scatter(x, y, c=color, cmap="tab10", vmin=0, vmax=9, s=marker_size, marker="s", linewidths=0)
    right = max(prompt_len or 0, int(x.max()) + 1 if x.size else 1)
    if prompt_len is not None:
        ax.axvline(prompt_len - 0.5, color="gray", linestyle="--", linewidth=1, label="end of prompt")
    ax.set_xlim(-0.5, right - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # row 0 at the top
    if len(head_ids) > 1:
        for i in range(1, len(layer_ids)):
            ax.axhline(i * len(head_ids) - 0.5, color="black", linewidth=0.5)
    if len(rows) <= 48:
        ax.set_yticks(range(len(rows)), [f"L{layer} H{head}" for layer, head in rows], fontsize=7)
    else:  # one label per layer, on its first head's row
        ax.set_yticks([i * len(head_ids) for i in range(len(layer_ids))], [f"L{layer}" for layer in layer_ids],
                      fontsize=7)
    ax.set_xlabel("position")
    ax.set_ylabel("layer, KV head")
    ax.set_title(title if title is not None else f"Kept positions (sequence {sequence})")
    return ax


# ----------------------------------------------------------------------------------------------
# accuracy against budget


def _number(entry: Mapping, key: str, i: int) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"results[{i}][{key!r}] must be a finite number, got {value!r}")
    return float(value)


def _curves(results) -> dict[Any, list[tuple[float, ...]]]:
    """Entries grouped by policy (first-seen order), each sorted by budget; validated."""
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence) or len(results) == 0:
        raise ValueError("results must be a non-empty list of dicts {policy, budget, accuracy[, ci_low, ci_high]}")
    curves: dict[Any, list[tuple[float, ...]]] = {}
    for i, entry in enumerate(results):
        if not isinstance(entry, Mapping):
            raise ValueError(f"results[{i}] must be a dict, got {type(entry).__name__}")
        missing = [k for k in ("policy", "budget", "accuracy") if k not in entry]
        if missing:
            raise ValueError(f"results[{i}] lacks {', '.join(map(repr, missing))} (has {sorted(entry)})")
        budget, acc = _number(entry, "budget", i), _number(entry, "accuracy", i)
        has_ci = ("ci_low" in entry, "ci_high" in entry)
        if has_ci[0] != has_ci[1]:
            raise ValueError(f"results[{i}] gives only one of 'ci_low' and 'ci_high'")
        point: tuple[float, ...] = (budget, acc)
        if all(has_ci):
            lo, hi = _number(entry, "ci_low", i), _number(entry, "ci_high", i)
            if not lo <= acc <= hi:
                raise ValueError(f"results[{i}]: the interval [{lo}, {hi}] does not contain accuracy {acc}")
            point += (lo, hi)
        policy = entry["policy"]
        points = curves.setdefault(policy, [])
        if any(p[0] == budget for p in points):
            raise ValueError(f"results[{i}]: policy {policy!r} has budget {entry['budget']!r} twice")
        if points and len(points[0]) != len(point):
            raise ValueError(f"results[{i}]: policy {policy!r} gives confidence intervals for some budgets, not all")
        points.append(point)
    return {policy: sorted(points) for policy, points in curves.items()}


def _colors(n: int) -> list:
    """n distinct colours: the default cycle up to 10 curves, tab20 above."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def accuracy_vs_budget(results, *, ax=None, title: str | None = "Accuracy against KV budget",
                       xlabel: str = "budget (tokens per KV head)", ylabel: str = "accuracy",
                       xscale: str | None = None, band_alpha: float = 0.2):
    """One curve of accuracy against budget per policy, with its confidence band when given.

    results: a list of dicts `{"policy", "budget", "accuracy"}`, optionally with both `"ci_low"` and
    `"ci_high"` (for every budget of that policy). Curves follow the policies' first appearance; each
    is sorted by budget. xscale: e.g. "log" for budgets in powers of two. Up to 16 distinct budgets
    are the x ticks.
    """
    curves = _curves(results)
    ax = _axes(ax, (6.5, 4.2))
    # more curves than the default colour cycle holds (10) would repeat colours: take tab20's
    colors = _colors(len(curves))
    for i, (policy, points) in enumerate(curves.items()):
        data = np.asarray(points)
        (line,) = ax.plot(data[:, 0], data[:, 1], marker="o", label=str(policy), color=colors[i])
        if data.shape[1] == 4:
            ax.fill_between(data[:, 0], data[:, 2], data[:, 3], color=line.get_color(), alpha=band_alpha,
                            linewidth=0)
    if xscale is not None:
        ax.set_xscale(xscale)
    budgets = sorted({p[0] for points in curves.values() for p in points})
    if len(budgets) <= 16:  # the budgets themselves as ticks, written plainly (also on a log axis)
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.set_xticks([], minor=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax
