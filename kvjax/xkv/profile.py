"""XKV's offline profiling: per-layer retention curves on a few prompts, then per-layer budgets.

    prof = kvjax.profile(params, prompts, total_budget=128 * L)   # -> BudgetProfile
    prof.save(default_path("smollm2-135m", 128 * L))             # read by policies.Profiled

Budgets count tokens per KV head, window included, like every kvjax budget: `total_budget` is
their sum over layers. Every layer keeps its `window` most recent tokens regardless, so the solver
shares `total_budget - L * window` among the layers' *prefixes* (the tokens before the window),
choosing each layer's prefix size from the grid `sizes`; a layer's budget is that size + window.

Retention curve of layer l at prefix size s (mean over KV heads and prompts), metric "mass":
the observation window (last `window` queries) is split in halves. The first half ranks the prefix
tokens as SnapKV would (mean attention over those queries, pooled over neighbours, mean over the
GQA group); the second half measures: r_l(s) = mean over its queries and the group's query heads
of the attention that lands on the s best-ranked prefix tokens. It is a share of each query's whole
attention (which sums to 1 over prefix and window), so a layer that looks mostly at its window
gains little from prefix tokens and gets few. Ranking on other queries than the measured ones
is what a cache faces later (it is chosen before the queries that read it), so curves are not
always concave and the exact DP usually runs.

Metric "oracle": rank by the measured mass itself over the whole window (no pooling): the best any
ranking could retain. Sorted partial sums are concave, so greedy runs.

The model runs layer by layer with the full cache, in one jitted `lax.scan` over the stacked layers,
one prompt at a time (prompts are right-padded to one length, so it compiles once).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.xkv.budgets import BudgetProfile, config_hash, default_path, load_profile  # noqa: F401  (re-exported)
from kvjax.xkv.solver import solve
from kvjax.io.checkpoint import Params
from kvjax.errors import InputError, bad_input
from kvjax.validate import flag as validate_flag
from kvjax.eval.synthetic import sample_prompts
from kvjax.models import decoder_layer, embed, scan_layers
from kvjax.models.prompt_attention import window_attention
from kvjax.compress.prompt import prompt_attend
from kvjax.policies.base import reduce_group
from kvjax.policies.scorers import pool1d

METRICS = ("mass", "oracle")

#: prompts are padded up to a multiple of this, so lengths nearby share one compile
_PAD_MULTIPLE = 64


def retention_curves(probs, lengths, window: int, sizes: tuple[int, ...], metric: str, kernel: int, pooling: str):
    """One layer's retention at each prefix size.

    probs [B, H, G, w, T] float32 (softmax attention of the last w queries), lengths [B] ->
    [B, H, S] float32: attention share kept by the best-ranked s prefix tokens (module docstring).
    """
    t = probs.shape[-1]
    prefix = jnp.arange(t)[None, :] < (lengths - window)[:, None]  # [B, T]
    on_prefix = jnp.where(prefix[:, None, None, None, :], probs, 0.0)
    if metric == "mass":
        half = window // 2
        ranked = jnp.mean(on_prefix[:, :, :, :half], axis=3)  # [B, H, G, T]
        score = reduce_group(pool1d(ranked, kernel, pooling), "mean")
        measured = jnp.mean(on_prefix[:, :, :, half:], axis=(2, 3))  # [B, H, T]
    else:
        measured = jnp.mean(on_prefix, axis=(2, 3))
        score = measured
    score = jnp.where(prefix[:, None, :], score, -jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)  # best first; ties: the earlier position
    kept = jnp.cumsum(jnp.take_along_axis(measured, order, axis=-1), axis=-1)
    kept = jnp.concatenate([jnp.zeros_like(kept[..., :1]), kept], axis=-1)  # [B, H, T+1]: s = 0 .. T
    idx = jnp.minimum(jnp.asarray(sizes), t)
    return kept[..., idx]


@functools.partial(jax.jit, static_argnames=("config", "window", "sizes", "metric", "kernel", "pooling"))
def _curves(weights, tokens, lengths, *, config, window, sizes, metric, kernel, pooling):
    """tokens [B, T], lengths [B] -> retention [L, B, H, S] float32, layer by layer, full cache."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend = prompt_attend(lengths, config, colsum=False, colsq=False, group_reduce="mean")

    def layer_step(x, xs):
        (lw,) = xs
        x, (q, k, _, _, _) = decoder_layer(lw, x, positions, config, attend)
        probs, _ = window_attention(q, k, lengths, window, config.attention_scale)
        return x, retention_curves(probs, lengths, window, sizes, metric, kernel, pooling)

    _, curves = scan_layers(layer_step, embed(weights, tokens), (weights.layers,))
    return curves


def default_sizes(prefix_total: int, num_layers: int, longest_prefix: int) -> tuple[int, ...]:
    """Equal-step grid of prefix sizes from 0: step = the mean layer share / 8 (at least 1), up to
    8x the mean share or the longest prompt prefix, whichever is smaller (diffuse early layers of
    SmolLM2 reach 4x at 128 tokens per head). Equal steps let greedy run on concave curves."""
    mean = prefix_total / max(num_layers, 1)
    if mean < 1 or longest_prefix < 1:
        return (0,)
    step = max(1, round(mean / 8))
    top = min(8 * mean, longest_prefix)
    return tuple(range(0, int(top) + 1, step))


def _token_lists(params: Params, prompts, seed: int, n_tokens: int) -> list[list[int]]:
    """Prompts as token lists: strings are encoded; an int n draws n prompts from
    `sample_prompts` (seeded), or seeded random ids when the checkpoint has no tokenizer."""
    if isinstance(prompts, (int, np.integer)) and not isinstance(prompts, bool):
        if prompts <= 0:
            raise InputError(f"the number of prompts must be positive, got {prompts}")
        if params.tokenizer is None:
            rng = np.random.default_rng(seed)
            return [rng.integers(0, params.config.vocab_size, n_tokens).tolist() for _ in range(int(prompts))]
        prompts = sample_prompts(params.tokenizer, int(prompts), n_tokens, seed)
    if isinstance(prompts, (str, np.ndarray, jax.Array)):
        prompts = [prompts]
    seqs = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if params.tokenizer is None:
                raise InputError("this checkpoint has no tokenizer: pass token ids (or a number of prompts)")
            ids = params.tokenizer.encode(p)
        else:
            ids = [int(x) for x in np.asarray(p).reshape(-1)]
        bad = [x for x in ids if not 0 <= x < params.config.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids outside the vocabulary: {bad[:5]}")
        seqs.append(ids)
    if not seqs:
        raise InputError("no prompts to profile")
    return seqs


def model_name(params: Params) -> str:
    """The checkpoint directory's name ("smollm2-135m" for the embedded model), else "model"."""
    return pathlib.Path(params.source).name if params.source else "model"


def _check_options(params: Params, seqs, total_budget, window, metric, kernel, pooling):
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise InputError(f"window must be an int >= 2 (its halves rank and measure), got {window!r}")
    if isinstance(total_budget, bool) or not isinstance(total_budget, (int, np.integer)):
        raise InputError(f"total_budget must be an int (tokens per KV head summed over layers), got {total_budget!r}")
    if kernel < 1 or pooling not in ("avg", "max"):
        raise InputError(f"kernel must be >= 1 and pooling 'avg' or 'max', got {kernel!r}, {pooling!r}")
    num_layers = params.config.num_layers
    if total_budget < num_layers * window:
        raise InputError(
            f"total_budget ({total_budget}) is below {num_layers} layers x window ({window}) = "
            f"{num_layers * window}: every layer keeps its window"
        )
    short = [len(s) for s in seqs if len(s) < 2 * window]
    if short:
        raise InputError(f"prompts need at least 2 x window = {2 * window} tokens, got lengths {short}")
    limit = params.config.max_position_embeddings
    if max(len(s) for s in seqs) > limit:
        raise InputError(f"a prompt of {max(len(s) for s in seqs)} tokens exceeds the model's {limit} positions")


def measure_curves(params: Params, seqs: list[list[int]], window: int, sizes: tuple[int, ...], *,
                   metric: str = "mass", kernel: int = 5, pooling: str = "avg", progress: bool | None = None
                   ) -> np.ndarray:
    """Retention curves [L, S] float64: mean over prompts and KV heads (module docstring).
    progress: a progress bar over the prompts on stderr (None: only when stderr is a terminal)."""
    from tqdm import tqdm

    t = -(-max(len(s) for s in seqs) // _PAD_MULTIPLE) * _PAD_MULTIPLE
    t = min(t, params.config.max_position_embeddings)
    total = None
    for ids in tqdm(seqs, desc="profiling", unit="prompt", disable=None if progress is None else not progress):
        tokens = np.zeros((1, t), np.int32)
        tokens[0, : len(ids)] = ids
        c = _curves(params.weights, tokens, np.array([len(ids)], np.int32), config=params.config, window=window,
                    sizes=sizes, metric=metric, kernel=kernel, pooling=pooling)
        c = np.asarray(c, np.float64).mean(axis=(1, 2))  # [L, S]
        total = c if total is None else total + c
    return total / len(seqs)


def profile(params: Params, prompts, total_budget: int, *, window: int = 32, sizes=None, seed: int = 0,
            metric: str = "mass", n_tokens: int = 2048, kernel: int = 5, pooling: str = "avg",
            method: str = "auto", name: str | None = None, progress: bool | None = None) -> BudgetProfile:
    """Profile per-layer retention on `prompts` and choose per-layer budgets summing to at most
    `total_budget` (tokens per KV head over all layers, windows included).

    prompts: strings, token arrays, or an int n (n prompts of about `n_tokens` tokens from
             `kvjax.eval.synthetic.sample_prompts(tokenizer, n, n_tokens, seed)`).
    sizes:   candidate prefix sizes (tokens beyond the window), ascending; default `default_sizes`.
    seed:    seeds the sampled prompts; with the same prompts the result is identical.
    method:  the solver ("auto": greedy when exact, else DP; see `kvjax.xkv.solver`).
    progress: a bar over the prompts on stderr: True, False, or None (only when stderr is a terminal).
    """
    if isinstance(prompts, (int, np.integer)) and isinstance(window, int) and n_tokens < 2 * window:
        raise bad_input("n_tokens", n_tokens, f"at least 2 x window = {2 * window} (the window's halves rank and measure)")
    seqs = _token_lists(params, prompts, seed, n_tokens)
    _check_options(params, seqs, total_budget, window, metric, kernel, pooling)
    num_layers = params.config.num_layers
    prefix_total = int(total_budget) - num_layers * window
    if sizes is None:
        sizes = default_sizes(prefix_total, num_layers, max(len(s) for s in seqs) - window)
    sizes = tuple(int(s) for s in np.asarray(sizes).reshape(-1))
    if progress is not None:
        validate_flag("progress", progress)
    curves = measure_curves(params, seqs, window, sizes, metric=metric, kernel=kernel, pooling=pooling,
                            progress=progress)
    sol = solve(curves, np.asarray(sizes, np.int64), prefix_total, method=method)
    return BudgetProfile(
        model=name or model_name(params), total=int(total_budget), window=int(window),
        budgets=tuple(int(b) + int(window) for b in sol.budgets), sizes=sizes,
        curves=tuple(tuple(float(x) for x in row) for row in curves), solver=sol.method, metric=metric,
        seed=int(seed), num_prompts=len(seqs), prompt_lengths=tuple(len(s) for s in seqs),
        num_kv_heads=params.config.num_kv_heads, retention=float(sol.value),
        architecture=params.config.model_type, config_hash=config_hash(params.config),
    )


def uniform_retention(prof: BudgetProfile) -> float:
    """Summed retention if every layer kept the same prefix size (total/L - window), read off the
    curves by linear interpolation on the grid: the baseline the profile improves on."""
    share = prof.total / prof.num_layers - prof.window
    curves = np.asarray(prof.curves)
    return float(sum(np.interp(share, prof.sizes, row) for row in curves))


__all__ = ["BudgetProfile", "default_path", "load_profile", "measure_curves", "profile", "retention_curves",
           "sample_prompts", "uniform_retention", "model_name", "default_sizes"]
