"""The quality benchmark's shared prefill: one forward pass per batch, every one-shot policy's
compression after each layer (mirrors kvjax.engine.prefill and kvjax.cascade.prefill; checked
against them before every run by benchmarks/quality.py)."""

from __future__ import annotations

import functools
import gc
import pathlib
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvjax  # noqa: E402
from kvjax import api, cascade, engine  # noqa: E402
from kvjax import policies as P  # noqa: E402
from kvjax.cache import Cache, kept_positions  # noqa: E402
from kvjax.decode import decode_step  # noqa: E402
from kvjax.models.prompt_attention import causal_attention  # noqa: E402
from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq  # noqa: E402
from kvjax.pallas_kernels import budget_scatter as bs  # noqa: E402
from kvjax.pallas_kernels import masked_topk as mt  # noqa: E402
from kvjax.policies.base import PrefillStats  # noqa: E402
from kvjax.sampling import Sampler  # noqa: E402

# ------------------------------------------------------------------------------------------------
# the shared prefill: one forward, every policy's compression (mirrors engine.prefill / cascade.prefill)


def shareable(pol) -> str | None:
    """None if the shared prefill can run this policy, else why not."""
    if getattr(pol, "chunked_prefill", False):
        return "chunked prefill: the prompt's hidden states depend on the compressed cache"
    if pol.cascades:
        return None if isinstance(pol, getattr(P, "CAKE", ())) else "a cascading policy other than CAKE"
    if getattr(pol.scorer, "needs_colsq", False):
        return "its scorer needs squared column sums"
    return None


def _zeros_engine_pools(b, plan, d, dtype):
    p = plan.layout.pool_size
    return (jnp.zeros((b, p, d), dtype), jnp.zeros((b, p, d), dtype), jnp.full((b, p), -1, jnp.int32),
            jnp.zeros((b, p), jnp.float32), jnp.zeros((b, p), jnp.float32))


def _engine_layer(pol, plan, state, pxs, *, k, v, lengths, win, colsum, layer, rng, positions, implementation):
    """One layer of engine.prefill's compression for one policy (after the shared forward)."""
    b, h, t = k.shape[:3]
    k_pool, v_pool, pos_pool, s_pool, s2_pool = state
    base, span, layer_budget, bound = pxs
    span_max = plan.max_span
    scorer = pol.scorer
    win_attn = row_valid = None
    if scorer.window and not pol.keeps_everything:
        win_attn, row_valid = win[scorer.window]
    stats = PrefillStats(k, v, lengths, win_attn, row_valid, colsum if scorer.needs_colsum else None, None, layer,
                         rng)
    keep, budgets = engine._select(pol, stats, layer_budget, implementation)
    if pol.decode_eviction is not None:
        run1, run2 = scorer.prefill_running(stats)
    else:
        run1 = run2 = jnp.zeros((b, h, t), jnp.float32)
    if plan.adaptive_heads:
        caps = budgets + plan.headroom
    else:
        caps = jnp.broadcast_to(bound + plan.headroom, (b, h)).astype(jnp.int32)
    rel_start = jnp.cumsum(caps, axis=1) - caps
    src_head, src_tok, written = bs.pack_plan(keep, rel_start, span_max)
    in_span = jnp.arange(span_max)[None, :] < span

    def pack(pool, src, empty):
        region = jax.lax.dynamic_slice_in_dim(pool, base, span_max, axis=1)
        if src.ndim == 4:
            gathered = bs.budget_scatter(region, src, src_head, src_tok, written, implementation=implementation)
            cleared = jnp.where(in_span[..., None], jnp.asarray(empty, pool.dtype), region)
            new = jnp.where(written[..., None], gathered, cleared)
        else:
            gathered = src[jnp.arange(b)[:, None], src_head, src_tok]
            cleared = jnp.where(in_span, jnp.asarray(empty, pool.dtype), region)
            new = jnp.where(written, gathered.astype(pool.dtype), cleared)
        return jax.lax.dynamic_update_slice_in_dim(pool, new, base, axis=1)

    tok_pos = jnp.broadcast_to(positions[:, None, :], (b, h, t))
    state = (pack(k_pool, k.astype(k_pool.dtype), 0), pack(v_pool, v.astype(v_pool.dtype), 0),
             pack(pos_pool, tok_pos, -1), pack(s_pool, run1, 0), pack(s2_pool, run2, 0))
    return state, (base + rel_start, keep.sum(-1).astype(jnp.int32), caps, budgets)


def _cake_layer(pol, plan, const, state, *, k, v, lengths, win, layer, rng, positions, num_layers, implementation):
    """One layer of cascade.prefill's CAKE cascade for one policy (after the shared forward)."""
    from kvjax.policies.cake import layer_preference, split_budgets

    b, h, t = k.shape[:3]
    k_pool, v_pool, pos_pool, s_pool, start, length, prefs = state
    run_size, total, cap, window_kept = const
    w, headroom = pol.window, plan.headroom
    layer_ids = jnp.arange(num_layers)
    win_attn, row_valid = win[w]
    stats = PrefillStats(k, v, lengths, win_attn, row_valid, None, None, layer, rng)
    prefs = prefs.at[:, layer].set(layer_preference(stats, w, pol.tau1, pol.tau2))
    seen = jnp.broadcast_to(layer_ids <= layer, (b, num_layers))
    budgets = split_budgets(prefs, seen, total, cap)
    if not pol.cascade:
        budgets = jnp.where(layer == num_layers - 1, budgets, cap[:, None])
    keep_count = jnp.where(seen, budgets + window_kept[:, None], 0)
    earlier = layer_ids < layer
    (k_pool, v_pool, pos_pool, s_pool), start, length = cascade.shrink_and_compact(
        ((k_pool, 0), (v_pool, 0), (pos_pool, -1), (s_pool, 0)), s_pool, start, length,
        jnp.broadcast_to(keep_count[:, :, None], length.shape), earlier, headroom, t,
    )
    scores = pol.scorer.prefill_scores(stats).astype(jnp.float32)
    forced = stats.positions[None, :] >= (lengths - w)[:, None]
    scores = jnp.where(forced[:, None, :], jnp.inf, scores)
    valid = jnp.broadcast_to(stats.valid[:, None, :], (b, h, t))
    kept = jnp.broadcast_to(keep_count[:, layer][:, None], (b, h))
    keep = mt.masked_topk(scores.reshape(b * h, t), kept.reshape(-1), valid.reshape(b * h, t),
                          implementation=implementation).reshape(b, h, t)
    free = jnp.sum(jnp.where(earlier[None, :, None], length + headroom, 0), axis=(1, 2))
    caps = keep.sum(-1).astype(jnp.int32) + headroom
    rel_start = free[:, None] + jnp.cumsum(caps, axis=1) - caps
    src_head, src_tok, written = bs.pack_plan(keep, rel_start, run_size)

    def pack(pool, src):
        if src.ndim == 4:
            return bs.budget_scatter(pool, src.astype(pool.dtype), src_head, src_tok, written,
                                     implementation=implementation)
        gathered = src[jnp.arange(b)[:, None], src_head, src_tok]
        return jnp.where(written, gathered.astype(pool.dtype), pool)

    tok_pos = jnp.broadcast_to(positions[:, None, :], (b, h, t))
    k_pool, v_pool = pack(k_pool, k), pack(v_pool, v)
    pos_pool, s_pool = pack(pos_pool, tok_pos), pack(s_pool, scores)
    start = start.at[:, layer].set(rel_start)
    length = length.at[:, layer].set(keep.sum(-1).astype(jnp.int32))
    return (k_pool, v_pool, pos_pool, s_pool, start, length, prefs), length.sum(axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("config", "plans", "implementation"))
def shared_prefill(weights, tokens, lengths, policies, rng, *, config, plans, implementation="xla"):
    """Prefill once; return (logits [B, V], one Cache per policy), each cache as kvjax.prefill builds it."""
    b, t = tokens.shape
    num_layers, h, d = config.num_layers, config.num_kv_heads, config.head_dim
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = rope_inv_freq(config)
    dtype = weights.embed.dtype
    need_colsum = any(p.scorer.needs_colsum for p in policies if not p.cascades and not p.keeps_everything)
    windows = set()
    for p in policies:
        if p.keeps_everything:
            continue
        w = p.window if p.cascades else p.scorer.window
        if w:
            windows.add(int(w))
    inits, xss, consts = [], [], []
    for p, plan in zip(policies, plans):
        if p.cascades:
            pool_size = plan.layout.pool_size
            run_size = pool_size if p.cascade else max(pool_size, h * num_layers * (t + plan.headroom))
            per_head = engine.resolve_budget(p, lengths)
            consts.append((run_size, num_layers * jnp.maximum(per_head - p.window, 0),
                           jnp.maximum(lengths - p.window, 0),
                           jnp.minimum(lengths, p.window)))
            inits.append((jnp.zeros((b, run_size, d), dtype), jnp.zeros((b, run_size, d), dtype),
                          jnp.full((b, run_size), -1, jnp.int32), jnp.zeros((b, run_size), jnp.float32),
                          jnp.zeros((b, num_layers, h), jnp.int32), jnp.zeros((b, num_layers, h), jnp.int32),
                          jnp.zeros((b, num_layers), jnp.float32)))
            xss.append(())
        else:
            per_head = engine.resolve_budget(p, lengths)
            layer_budgets = p.allocator.layer_budgets(per_head, num_layers, lengths)
            layer_budgets = jnp.minimum(layer_budgets, jnp.asarray(plan.stream_bound)[None, :])
            consts.append(None)
            inits.append(_zeros_engine_pools(b, plan, d, dtype))
            xss.append((jnp.asarray(plan.layout.layer_base, jnp.int32), jnp.asarray(plan.layout.layer_span, jnp.int32),
                        layer_budgets.T, jnp.asarray(plan.stream_bound, jnp.int32)))

    def layer_step(carry, xs):
        x, states = carry
        lw, layer, pxs = xs
        q, k, v = layer_qkv(lw, x, positions, config, inv_freq)
        if need_colsum:
            attn, colsum = causal_attention(q, k, v, lengths, scale=config.attention_scale,
                                            sliding_window=config.sliding_window, column_sums=True)
        else:
            attn = causal_attention(q, k, v, lengths, scale=config.attention_scale,
                                    sliding_window=config.sliding_window)
            colsum = None
        x = mlp(lw, x + attn_output(lw, attn), config)
        win = {w: engine.window_attention(q, k, lengths, w, config.attention_scale) for w in sorted(windows)}
        new_states, ys = [], []
        for p, plan, const, state, px in zip(policies, plans, consts, states, pxs):
            if p.cascades:
                s, y = _cake_layer(p, plan, const, state, k=k, v=v, lengths=lengths, win=win, layer=layer, rng=rng,
                                   positions=positions, num_layers=num_layers, implementation=implementation)
            else:
                s, y = _engine_layer(p, plan, state, px, k=k, v=v, lengths=lengths, win=win, colsum=colsum,
                                     layer=layer, rng=rng, positions=positions, implementation=implementation)
            new_states.append(s)
            ys.append(y)
        return (x, tuple(new_states)), tuple(ys)

    xs = (weights.layers, jnp.arange(num_layers), tuple(xss))
    (x, states), ys = jax.lax.scan(layer_step, (embed(weights, tokens), tuple(inits)), xs)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    logits = final_logits(weights, last, config)[:, 0]
    caches = []
    for p, plan, state, y in zip(policies, plans, states, ys):
        if p.cascades:
            k_pool, v_pool, pos_pool, s_pool, start, length, _ = state
            trim = lambda a, n=plan.layout.pool_size: a[:, :n]  # noqa: E731
            caches.append(Cache(
                k=trim(k_pool), v=trim(v_pool), pos=trim(pos_pool), score=trim(s_pool),
                score2=jnp.zeros((b, plan.layout.pool_size), jnp.float32), start=start, length=length,
                cap=length + plan.headroom, budget=length, next_pos=lengths.astype(jnp.int32), layout=plan.layout))
        else:
            k_pool, v_pool, pos_pool, s_pool, s2_pool = state
            start, length, cap, budget = y
            caches.append(Cache(
                k=k_pool, v=v_pool, pos=pos_pool, score=s_pool, score2=s2_pool, start=start.transpose(1, 0, 2),
                length=length.transpose(1, 0, 2), cap=cap.transpose(1, 0, 2), budget=budget.transpose(1, 0, 2),
                next_pos=lengths.astype(jnp.int32), layout=plan.layout))
    return logits, tuple(caches)


@functools.partial(jax.jit, static_argnames=("config", "plan", "implementation"))
def feed_question(weights, cache, logits, q_tokens, q_lengths, policy, *, config, plan, implementation="xla"):
    """Append the question tokens through the compressed cache (api._prefill's query-agnostic part)."""

    def feed(carry, i):
        cache, logits = carry
        active = i < q_lengths
        cache, new_logits = decode_step(weights, cache, q_tokens[:, i], policy, active, config=config, plan=plan,
                                        implementation=implementation)
        return (cache, jnp.where(active[:, None], new_logits, logits)), None

    (cache, logits), _ = jax.lax.scan(feed, (cache, logits), jnp.arange(q_tokens.shape[1]))
    return cache, logits


def make_plan(pol, config, bucket: int, headroom: int):
    """The plan kvjax.prefill would build (the shared path runs engine and cascade policies only)."""
    return (cascade.make_plan if pol.cascades else engine.make_plan)(pol, config, bucket, headroom)


class SharedRunner:
    """Runs a batch of samples through shared_prefill for a list of policies (one mode)."""

    def __init__(self, params, max_new_tokens: int, seed: int = 0):
        self.params = params
        self.max_new = max_new_tokens
        self.seed = seed
        self.sampler = Sampler(0.0, None, None)
        self.stop_ids = jnp.asarray(api._stop_ids(params, None), jnp.int32)
        self._compiled: dict[Any, Any] = {}
        self.compile_s: list[float] = []

    def encode(self, samples, mode):
        tok = self.params.tokenizer
        if mode == "aware":
            seqs = [tok.encode(s.prompt) for s in samples]
            q_seqs = []
        else:
            seqs = [tok.encode(s.context) for s in samples]
            q_seqs = [tok.encode(s.question, add_special_tokens=False) for s in samples]
        limit = self.params.config.max_position_embeddings
        bucket = api.length_bucket(max(map(len, seqs)), limit)
        q_bucket = api.new_tokens_bucket(max(map(len, q_seqs))) if q_seqs else 0
        pad = tok.pad_token_id
        tokens, lengths = api._pad(seqs, bucket, pad)
        if q_seqs:
            q_tokens, q_lengths = api._pad(q_seqs, q_bucket, pad)
        else:
            q_tokens, q_lengths = None, None
        return tokens, lengths, q_tokens, q_lengths, bucket, q_bucket

    def prefill(self, samples, mode, pols):
        """-> (logits, caches, plans, q_tokens, q_lengths, timing dict)."""
        cfg = self.params.config
        tokens, lengths, q_tokens, q_lengths, bucket, q_bucket = self.encode(samples, mode)
        headroom = api.new_tokens_bucket(self.max_new) + q_bucket
        plans = tuple(make_plan(p, cfg, bucket, headroom) for p in pols)
        key = (tokens.shape, plans, jax.tree_util.tree_structure(tuple(pols)))
        t0 = time.perf_counter()
        rng = jax.random.key(self.seed)
        if key not in self._compiled:
            self._compiled[key] = shared_prefill.lower(self.params.weights, tokens, lengths, tuple(pols), rng,
                                                       config=cfg, plans=plans).compile()
            self.compile_s.append(time.perf_counter() - t0)
        compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        logits, caches = self._compiled[key](self.params.weights, tokens, lengths, tuple(pols), rng)
        jax.block_until_ready(logits)
        return logits, caches, plans, q_tokens, q_lengths, dict(compile_s=compile_s, prefill_s=time.perf_counter() - t1)

    def finish(self, pol, plan, cache, logits, q_tokens, q_lengths, keep_cache=False):
        """Question feed (agnostic) and greedy decode for one policy: (texts, cache after prefill+question;
        with keep_cache=False its arrays may have been donated to the decode loop: shapes only)."""
        cfg = self.params.config
        if q_tokens is not None:
            cache, logits = feed_question(self.params.weights, cache, logits, q_tokens, q_lengths, pol, config=cfg,
                                          plan=plan)
        prefilled = cache
        capacity = api.new_tokens_bucket(self.max_new)
        # _decode_loop donates its cache argument: give it a copy when `prefilled` must stay readable
        cache_in = jax.tree_util.tree_map(jnp.copy, cache) if keep_cache else cache
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, out, n_gen = api._decode_loop(
                self.params.weights, cache_in, logits, pol, jax.random.key(self.seed + 1), jnp.int32(self.max_new),
                self.stop_ids, config=cfg, plan=plan, sampler=self.sampler, capacity=capacity, implementation="xla")
        out, n_gen = np.asarray(out), np.asarray(n_gen)
        texts = [self.params.tokenizer.decode(out[i, : n_gen[i]].tolist()) for i in range(out.shape[0])]
        return texts, prefilled


def generate_cell(params, samples, mode, pol, max_new_tokens, seed=0):
    """The reference path: kvjax.generate for one cell. Returns (texts, stats)."""
    if mode == "aware":
        out = kvjax.generate(params, [s.prompt for s in samples], pol, max_new_tokens=max_new_tokens, seed=seed)
    else:
        out = kvjax.generate(params, context=[s.context for s in samples], question=[s.question for s in samples],
                             policy=pol, max_new_tokens=max_new_tokens, seed=seed)
    return out.text, out.stats


def memory_maps() -> int:
    """Memory mappings of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


#: XLA:CPU maps a few hundred regions per loaded executable (over a thousand for the shared
#: prefill). The kernel refuses more than vm.max_map_count (65530 by default): LLVM then fails with
#: "Cannot allocate memory" and the process segfaults (the first default run died so at 4K tokens).
#: Above this count the compiled executables are dropped; the persistent compilation cache reloads
#: the ones needed again.
MAX_MAPS = 40000


def release_executables(runner, log, limit: int = MAX_MAPS) -> bool:
    """Drop every compiled executable when this process holds more than `limit` memory maps."""
    n = memory_maps()
    if n <= limit:
        return False
    runner._compiled.clear()
    jax.clear_caches()
    gc.collect()
    log(f"  dropped compiled executables: {n} memory maps -> {memory_maps()}")
    return True


def compare_kept(cache_a: Cache, cache_b: Cache) -> float:
    """Fraction of (layer, sequence, head) streams whose kept position sets are equal."""
    ka, kb = kept_positions(cache_a), kept_positions(cache_b)
    same = total = 0
    for la, lb in zip(ka, kb):
        for ba, bb in zip(la, lb):
            for ha, hb in zip(ba, bb):
                total += 1
                same += int(ha.shape == hb.shape and np.array_equal(ha, hb))
    return same / max(total, 1)
