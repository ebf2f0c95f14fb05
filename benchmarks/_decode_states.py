"""Synthetic cache states for the decode benchmarks: the skewed allocations and the pools.

- `split_exact`, `cake_layer_budgets`, `adakv_head_budgets`: Ada-KV-like (per-head) and CAKE-like
  (per-layer) splits of an equal total, seeded Dirichlet(1) draws with floors and caps.
- `fill_state(bench, job, batch, plan)`: device pools and meta ([L, B, H] streams) laid out by the
  library's own `kvjax.cache.layout_streams`, random keys/values (decode speed does not depend on
  the values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 64  # SnapKV's window: the smallest share a head or layer gets in the skewed allocations


def window() -> int:
    """The current WINDOW (a --tiny run lowers it)."""
    return WINDOW

# ---------------------------------------------------------------------------------------------
# allocations


def split_exact(total: int, probs, lo: int, hi: int) -> np.ndarray:
    """Rows of integers >= lo, <= hi, each row summing to `total`, proportional to `probs` [N, n]
    above the floor (largest remainders get the rounding; water-filling past `hi`)."""
    probs = np.atleast_2d(np.asarray(probs, np.float64))
    rows, n = probs.shape
    total = int(min(max(total, lo * n), hi * n))
    x = np.full((rows, n), lo, np.int64)
    free = np.ones((rows, n), bool)
    rest = np.full(rows, total - lo * n, np.int64)
    for _ in range(n + 1):
        if not (rest > 0).any():
            break
        p = np.where(free, probs, 0.0)
        s = p.sum(1, keepdims=True)
        p = np.where(s > 0, p / np.where(s > 0, s, 1), free / np.maximum(free.sum(1, keepdims=True), 1))
        want = p * rest[:, None]
        add = np.floor(want).astype(np.int64)
        rem = rest - add.sum(1)
        rank = np.argsort(np.argsort(-(want - add), axis=1), axis=1)
        add += (rank < rem[:, None]) & free
        x = x + add
        over = np.maximum(x - hi, 0)
        x = x - over
        free &= x < hi
        rest = over.sum(1)
    assert (x.sum(1) == total).all() and (x >= lo).all() and (x <= hi).all()
    return x


def cake_layer_budgets(budget: int, num_layers: int, max_len: int, seed: int = 1) -> tuple[int, ...]:
    """CAKE-like per-layer budgets (window included): a Dirichlet(1) split of L*B, >= window, <= max_len."""
    rng = np.random.default_rng(seed + budget)
    lo = min(window(), budget)
    return tuple(int(v) for v in split_exact(num_layers * budget, rng.dirichlet(np.ones(num_layers)), lo, max_len)[0])


def adakv_head_budgets(budget, batch, num_layers, h, max_len, seed=2):
    """Ada-KV-like per-(sequence, layer) head budgets [B, L, H]: Dirichlet(1) split of H*B."""
    rng = np.random.default_rng(seed + budget)
    lo = min(window(), budget)
    probs = rng.dirichlet(np.ones(h), size=batch * num_layers)
    return split_exact(h * budget, probs, lo, max_len).reshape(batch, num_layers, h)


# ---------------------------------------------------------------------------------------------
# settings


# ---------------------------------------------------------------------------------------------
# cache states


def stream_lengths(bench, alloc: str, budget: int, batch: int, ctx: int, keep: bool) -> np.ndarray:
    """Kept tokens per stream [L, B, H] of an allocation (`keep`: the no-eviction rows start short)."""
    cfg = bench.config
    num_layers, h = cfg.num_layers, cfg.num_kv_heads
    alloc = "uniform" if alloc in ("h2o", "tova", "roco") else alloc
    if alloc == "full":
        lengths = np.full((batch, num_layers, h), ctx, np.int64)
    elif alloc == "uniform":
        lengths = np.full((batch, num_layers, h), budget, np.int64)
    elif alloc == "adakv":
        lengths = adakv_head_budgets(budget, batch, num_layers, h, bench.min_ctx)
    elif alloc in ("cake", "cake_cascade"):
        bl = np.asarray(cake_layer_budgets(budget, num_layers, bench.min_ctx), np.int64)
        lengths = np.broadcast_to(bl[None, :, None], (batch, num_layers, h)).copy()
    else:
        raise ValueError(alloc)
    if keep:  # no eviction: start n steps short, end at the evicting rows' length
        lengths = np.maximum(lengths - bench.n_steps, 1)
    return np.ascontiguousarray(lengths.transpose(1, 0, 2))  # [L, B, H], as the cache keeps it


def fill_state(bench, job, batch: int, plan, seed: int = 0):
    """Device pools and meta for one job: (pools, meta, kv_slots_used [host int])."""
    d = bench.config.head_dim
    base = np.asarray(plan.layout.layer_base, np.int64)
    keep = job.alloc.endswith("_keep")
    lengths = stream_lengths(bench, job.alloc[:-5] if keep else job.alloc, job.spec.budget, batch, job.ctx, keep)
    from kvjax.cache import layout_streams

    start, caps = (np.asarray(a, np.int64) for a in layout_streams(plan, jnp.asarray(lengths, jnp.int32)))
    pool = plan.layout.pool_size
    assert (lengths <= caps).all() and (start + caps <= pool).all(), "allocation does not fit the plan"
    if not plan.layout.shared:
        span = np.asarray(plan.layout.layer_span, np.int64)
        assert (start + caps <= (base + span)[:, None, None]).all(), "a stream leaves its layer region"
    meta = tuple(jnp.asarray(a, jnp.int32) for a in (start, lengths, caps, lengths)) + (
        jnp.full((batch,), job.ctx, jnp.int32),)
    make_pools = _pool_maker(batch, pool, d, jnp.dtype(bench.weights.embed.dtype).name)
    pools = jax.block_until_ready(make_pools(meta[0], meta[1], jnp.int32(job.ctx), jax.random.key(seed)))
    used = int(lengths.sum())
    return pools, meta, used, int(lengths.shape[0] * lengths.shape[2] * batch)


_POOL_MAKERS = {}


def _pool_maker(batch, pool, d, dtype_name):
    """A jitted function building random K/V pools and the pos pool of one shape (cached)."""
    key_ = (batch, pool, d, dtype_name)
    if key_ in _POOL_MAKERS:
        return _POOL_MAKERS[key_]
    dt = jnp.dtype(dtype_name)

    @jax.jit
    def make_pools(start, lengths, ctx, key):
        nb = 4096
        block = jax.random.normal(key, (2, nb, d), jnp.float32).astype(dt)
        idx = (jnp.arange(pool, dtype=jnp.int32)[None, :] + 7919 * jnp.arange(batch, dtype=jnp.int32)[:, None]) % nb
        k = block[0][idx]
        v = block[1][idx]
        # pos: each stream holds the most recent `length` positions of the context; free slots -1
        st = jnp.moveaxis(start, 1, 0).reshape(batch, -1)
        ln = jnp.moveaxis(lengths, 1, 0).reshape(batch, -1)
        order = jnp.argsort(st, axis=1)
        st_s = jnp.take_along_axis(st, order, 1)
        ln_s = jnp.take_along_axis(ln, order, 1)
        slots = jnp.arange(pool, dtype=jnp.int32)
        owner = jax.vmap(lambda s: jnp.searchsorted(s, slots, side="right") - 1)(st_s)
        owner = jnp.maximum(owner, 0)
        off = slots[None, :] - jnp.take_along_axis(st_s, owner, 1)
        n = jnp.take_along_axis(ln_s, owner, 1)
        pos = jnp.where((off >= 0) & (off < n), ctx - n + off, -1).astype(jnp.int32)
        zeros = jnp.zeros((batch, pool), jnp.float32)
        return k, v, pos, zeros, zeros + 0.0

    _POOL_MAKERS[key_] = make_pools
    return make_pools
