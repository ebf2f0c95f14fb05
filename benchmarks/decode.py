"""Full-model decode speed: Llama-3.1-8B shapes, bf16, random weights, synthetic cache states.

    python benchmarks/decode.py [--out benchmarks/results] [--only REGEX] [--deadline-s 420] [--tiny]

What is timed: one jitted program that runs N `kvjax.decode.decode_step` calls in a `lax.fori_loop`
(the next token is the argmax of the last logits; the cache pools are donated), so the Python
dispatch is paid once per N steps. Each repetition restarts from the same stream lengths; the
median over repetitions after a warm-up call, device-synchronised (`block_until_ready`), divided
by N, is the latency per step.

Cache states are synthetic: the pool is laid out as the engine lays it out (`kvjax.engine.make_plan`
for a `kvjax.policies` policy), start/length/cap/budget are filled by this script, keys/values
are random. Decode speed does not depend on the values, only on the layout and lengths.

- uniform: every stream keeps B tokens, in `SnapKV(B)`'s plan (until run 8 these rows used the Ada-KV
  plan's layout; since the kernel's split count depends on whether head budgets vary, they now use
  the uniform policy's own plan);
- adakv:   Ada-KV-like: per (sequence, layer) the layer's H*B tokens are split over the heads by a
  seeded Dirichlet(1) draw (at least the 64-token window each, at most the 8K shortest context);
- cake:    CAKE-like: per-layer budgets (seeded Dirichlet(1) split of L*B over the layers, same
  bounds), `Compose(WindowAttention, allocator_=PerLayer(budgets))` with `engine.make_plan`;
- full:    `Full()`: every context token kept;
- cake_cascade (extra): the real `CAKE` policy's cascade layout (all layers share the pool) with
  its decode-time eviction (every step), CAKE-like layer budgets.

Compressed layouts do not depend on the context length (the pool holds B tokens per stream), so
one compiled program serves 8K, 32K and 128K; only positions change.

Bytes per step = weights read (every matrix once; the embedding table is gathered) + the kept K/V
read (mean stream length over the N steps). Roofline = bytes / measured copy bandwidth (x + 1 on a
2 GiB bf16 array, read + write counted, as benchmarks/kernels_gpu.py); `% BW` = roofline / time.

`variant` (--variants): "library" is kvjax as installed; the others apply source patches at run time
(VARIANTS below; a patch whose target text is gone from the library is skipped, and the diff that
applied is stored in the JSON's meta): "proposed" = DECODE_PATCH (append in place, the kernel reads
the pool: landed in kvjax as 80d6610) + KERNEL_PATCHES (the GPU kernel no longer materialises a
[B, P] int32 zeros array for its unused `pos` operand); "unroll" = proposed + `lax.scan(unroll=True)`
over the layers; "unstacked" = proposed + a Python loop over per-layer weight pytrees (needs
`--weights unstacked`: Weights.layers as a tuple of 32 LayerWeights). `--probe` times the weight path
alone (no KV) with stacked/scanned, unrolled and unstacked weights; `--check` (with --tiny) compares
the variants' logits and caches with the library's.

Writes decode_<device>.json (every row, the environment, the patches) and decode_<device>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import difflib
import gc
import importlib
import inspect
import json
import math
import pathlib
import re
import statistics
import sys
import time
import traceback
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402  (sets XLA_PYTHON_CLIENT_MEM_FRACTION before jax initialises)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

WINDOW = 64  # SnapKV's window: the smallest share a head or layer gets in the skewed allocations
RESERVE = 2 << 30  # device bytes left free when sizing the largest batch


# ---------------------------------------------------------------------------------------------
# the proposed library change, applied to the installed sources at run time

DECODE_PATCH = (
    """        q, kn, vn = layer_qkv(lw, x, positions, config, inv_freq)  # q [B,H,G,1,D], kn [B,H,1,D]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, base, span, axis=1)
""",
    """        q, kn, vn = layer_qkv(lw, x, positions, config, inv_freq)  # q [B,H,G,1,D], kn [B,H,1,D]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, base, span, axis=1)
        if ev is None:
            # Nothing to evict: write the new token into the pool in place, with no copy of the
            # layer region out and back. The Pallas kernel reads each stream's used slots straight
            # from the pool; the XLA path reads a copy of the layer region.
            slot = start + length
            k_pool = _append(k_pool, slot, kn[:, :, 0].astype(k_pool.dtype), active)
            v_pool = _append(v_pool, slot, vn[:, :, 0].astype(v_pool.dtype), active)
            pos_pool = _append(pos_pool, slot, jnp.broadcast_to(cache.next_pos[:, None], (b, h)), active)
            s_pool = _append(s_pool, slot, jnp.zeros((b, h), s_pool.dtype), active)
            s2_pool = _append(s2_pool, slot, jnp.zeros((b, h), s2_pool.dtype), active)
            length = length + active[:, None].astype(length.dtype)
            min_pos = None
            if config.sliding_window is not None:
                min_pos = cache.next_pos - config.sliding_window + 1
            if implementation == "pallas":
                k_a, v_a, pos_a, first = k_pool, v_pool, pos_pool, start
            else:
                k_a, v_a, pos_a, first = take(k_pool), take(v_pool), take(pos_pool), start - base
            out, _ = decode_attention(q[:, :, :, 0], k_a, v_a, first, length, pos_a, min_pos,
                                      scale=config.attention_scale, implementation=implementation)
            x = mlp(lw, x + attn_output(lw, out[:, :, :, None].astype(x.dtype)), config)
            return (x, k_pool, v_pool, pos_pool, s_pool, s2_pool), length
""",
)

KERNEL_PATCHES = (
    (
        "    pos_arr = pos.astype(jnp.int32) if use_pos else jnp.zeros((b, p), jnp.int32)\n",
        "    pos_arr = pos.astype(jnp.int32) if use_pos else jnp.zeros((b, 1), jnp.int32)  # unused: no [B, P] fill\n",
    ),
    (
        "                  per_seq((p, d)), per_seq((p, d)), per_seq((p,))],\n",
        "                  per_seq((p, d)), per_seq((p, d)),\n"
        "                  per_seq((p,)) if use_pos else pl.BlockSpec((1, 1), lambda i, j, s: (i, 0))],\n",
    ),
)

UNROLL_PATCH = (
    "    (x, k, v, pos, s, s2), length = jax.lax.scan(layer_step, init, xs)\n",
    "    (x, k, v, pos, s, s2), length = jax.lax.scan(layer_step, init, xs, unroll=True)\n",
)

LOOP_PATCH = (
    "    (x, k, v, pos, s, s2), length = jax.lax.scan(layer_step, init, xs)\n",
    """    if isinstance(weights.layers, (list, tuple)):
        # per-layer weight arrays (not stacked [L, ...]): a Python loop over the layers. Scanning a
        # stacked pytree makes XLA copy every layer's weight slice before its matmuls (2x the
        # weight traffic of a decode step); separate buffers are read in place.
        carry, lengths = init, []
        for l, lw in enumerate(weights.layers):
            carry, ln = layer_step(carry, (lw,) + tuple(a[l] for a in xs[1:]))
            lengths.append(ln)
        (x, k, v, pos, s, s2), length = carry, jnp.stack(lengths)
    else:
        (x, k, v, pos, s, s2), length = jax.lax.scan(layer_step, init, xs)
""",
)

#: variant -> {source file: patches}; a patch whose old text is absent (the library changed) is skipped
VARIANTS = {
    "library": {},
    "proposed": {"kvjax/decode.py": (DECODE_PATCH,), "pallas_kernels/ragged_decode_attention.py": KERNEL_PATCHES},
    "unroll": {"kvjax/decode.py": (DECODE_PATCH, UNROLL_PATCH),
               "pallas_kernels/ragged_decode_attention.py": KERNEL_PATCHES},
    # needs --weights unstacked (Weights.layers a tuple of per-layer LayerWeights)
    "unstacked": {"kvjax/decode.py": (DECODE_PATCH, LOOP_PATCH),
                  "pallas_kernels/ragged_decode_attention.py": KERNEL_PATCHES},
}


def _modules():
    import kvjax.decode as dec
    import kvjax.pallas_kernels.ragged_decode_attention as rda

    return {"kvjax/decode.py": dec, "pallas_kernels/ragged_decode_attention.py": rda}


def _patched_source(module, patches):
    """(patched source, number of patches applied)."""
    src = inspect.getsource(module)
    applied = 0
    for old, new in patches:
        n = src.count(old)
        if n > 1:
            raise RuntimeError(f"ambiguous patch for {module.__name__}: {old[:60]!r}")
        if n == 1:
            src = src.replace(old, new)
            applied += 1
    return src, applied


def source_hashes() -> dict:
    """sha1 of the library sources the decode path runs (the working tree may change between runs)."""
    import hashlib

    import kvjax.attention as att

    mods = dict(_modules(), **{"kvjax/attention.py": att})
    return {k: hashlib.sha1(inspect.getsource(m).encode()).hexdigest()[:12] for k, m in mods.items()}


def proposed_diff(variant: str = "proposed") -> str:
    """The unified diff of a variant against the installed sources (only the patches that apply)."""
    out = []
    for path, mod in _modules().items():
        patches = VARIANTS[variant].get(path, ())
        if not patches:
            continue
        old = inspect.getsource(mod)
        new, _ = _patched_source(mod, patches)
        out += difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}", n=2)
    return "".join(out)


_PROPOSED = {}


def proposed_modules(variant: str = "proposed"):
    """(decode module, kernel module or None) of a variant, exec'd from the installed sources."""
    if variant not in _PROPOSED:
        mods = _modules()
        dec, rda = mods["kvjax/decode.py"], mods["pallas_kernels/ragged_decode_attention.py"]
        ksrc, kn = _patched_source(rda, VARIANTS[variant].get("pallas_kernels/ragged_decode_attention.py", ()))
        kmod = None
        if kn:
            kmod = types.ModuleType(f"kvjax.pallas_kernels._rda_{variant}")
            kmod.__package__ = "kvjax.pallas_kernels"
            kmod.__file__ = rda.__file__
            sys.modules[kmod.__name__] = kmod  # dataclasses / jit look their module up
            exec(compile(ksrc, rda.__file__ + f" ({variant})", "exec"), kmod.__dict__)
        dsrc, dn = _patched_source(dec, VARIANTS[variant].get("kvjax/decode.py", ()))
        dmod = dec
        if dn:
            dmod = types.ModuleType(f"kvjax._decode_{variant}")
            dmod.__package__ = "kvjax"
            dmod.__file__ = dec.__file__
            sys.modules[dmod.__name__] = dmod
            exec(compile(dsrc, dec.__file__ + f" ({variant})", "exec"), dmod.__dict__)
        _PROPOSED[variant] = (dmod, kmod, kn + dn)
    return _PROPOSED[variant]


class use_kernel_module:
    """While tracing, `kvjax.attention.decode_attention` imports the given kernel module."""

    NAME = "kvjax.pallas_kernels.ragged_decode_attention"

    def __init__(self, mod):
        self.mod = mod

    def __enter__(self):
        self.saved = sys.modules[self.NAME]
        if self.mod is not None:
            sys.modules[self.NAME] = self.mod

    def __exit__(self, *exc):
        sys.modules[self.NAME] = self.saved


def force_interpret(mod):
    """CPU check (--tiny): run the GPU kernel layout in interpret mode."""
    if getattr(mod, "_bench_interpret", False):
        return
    orig = mod.ragged_decode_attention_pallas

    def wrapped(*a, **k):
        k.update(interpret=True, backend="gpu")
        return orig(*a, **k)

    mod.ragged_decode_attention_pallas = wrapped
    mod._bench_interpret = True


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
    lo = min(WINDOW, budget)
    return tuple(int(v) for v in split_exact(num_layers * budget, rng.dirichlet(np.ones(num_layers)), lo, max_len)[0])


def adakv_head_budgets(budget, batch, num_layers, h, max_len, seed=2):
    """Ada-KV-like per-(sequence, layer) head budgets [B, L, H]: Dirichlet(1) split of H*B."""
    rng = np.random.default_rng(seed + budget)
    lo = min(WINDOW, budget)
    probs = rng.dirichlet(np.ones(h), size=batch * num_layers)
    return split_exact(h * budget, probs, lo, max_len).reshape(batch, num_layers, h)


# ---------------------------------------------------------------------------------------------
# settings


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compiled program: a layout at a batch, an implementation and a code variant."""

    layout: str  # "uni", "ada", "cake", "full", "cake_cascade"
    budget: int  # tokens per head (full: the context length)
    batch: int | str  # int or "max"
    impl: str
    variant: str  # "library" or "proposed"

    @property
    def name(self):
        return f"{self.layout}/B{self.budget}/b{self.batch}/{self.impl}/{self.variant}"


@dataclasses.dataclass
class Job:
    """One measured row: a Spec, the allocation filled into it, and the context length."""

    spec: Spec
    alloc: str  # "uniform", "adakv", "cake", "full", "cake_cascade"
    ctx: int

    @property
    def name(self):
        s = self.spec
        return f"{self.alloc}/ctx{self.ctx}/B{s.budget}/b{s.batch}/{s.impl}/{s.variant}"


class Bench:
    def __init__(self, config, weights, n_steps, reps, min_ctx, tiny):
        self.config, self.weights = config, weights
        self.n_steps, self.reps, self.min_ctx, self.tiny = n_steps, reps, min_ctx, tiny
        self.compiled = {}  # Spec (with a resolved batch) -> (compiled, compile_s, memory)
        self.max_batch = {}  # (layout, budget, impl, variant) -> int
        self.weight_bytes = _shapes.weight_bytes(weights)
        self.weight_read = _shapes.weight_read_bytes(weights)
        stats = jax.devices()[0].memory_stats() or {}
        self.limit = stats.get("bytes_limit")
        self.peak_flops = None

    # -- policy and plan per layout
    def policy_plan(self, layout: str, budget: int, ctx: int):
        from kvjax import cascade, engine
        from kvjax import policies as P
        from kvjax.policies import scorers

        cfg, n = self.config, self.n_steps
        if layout == "uni":
            pol = P.SnapKV(budget=budget, window=WINDOW)
            return pol, engine.make_plan(pol, cfg, ctx, n)
        if layout == "ada":
            pol = P.AdaKV(P.SnapKV(budget=budget, window=WINDOW))
            return pol, engine.make_plan(pol, cfg, ctx, n)
        if layout == "cake":
            bl = cake_layer_budgets(budget, cfg.num_layers, self.min_ctx)
            pol = P.Compose(scorers.WindowAttention(WINDOW), budget=min(budget, max(bl)),
                            allocator_=P.PerLayer(bl), window=WINDOW)
            return pol, engine.make_plan(pol, cfg, ctx, n)
        if layout == "full":
            pol = P.Full()
            return pol, engine.make_plan(pol, cfg, ctx, n)
        if layout == "cake_cascade":
            pol = P.CAKE(budget=budget, window=min(32, WINDOW))
            return pol, cascade.make_plan(pol, cfg, ctx, n)
        raise ValueError(layout)

    def plan_ctx(self, spec: Spec) -> int:
        return spec.budget if spec.layout == "full" else self.min_ctx

    # -- the jitted program
    def runner(self, spec: Spec):
        from kvjax.cache import Cache

        pol, plan = self.policy_plan(spec.layout, spec.budget, self.plan_ctx(spec))
        if spec.variant != "library":
            dmod, kmod, _ = proposed_modules(spec.variant)
            step_fn = dmod.decode_step
        else:
            step_fn, kmod = importlib.import_module("kvjax.decode").decode_step, None
        cfg, n = self.config, self.n_steps

        def run(weights, pools, meta, tok):
            k, v, pos, s, s2 = pools
            start, length, cap, budget, next_pos = meta
            cache = Cache(k=k, v=v, pos=pos, score=s, score2=s2, start=start, length=length, cap=cap,
                          budget=budget, next_pos=next_pos, layout=plan.layout)

            def body(i, carry):
                cache, tok = carry
                cache, logits = step_fn(weights, cache, tok, pol, None, config=cfg, plan=plan,
                                        implementation=spec.impl)
                return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

            cache, tok = jax.lax.fori_loop(0, n, body, (cache, tok))
            return (cache.k, cache.v, cache.pos, cache.score, cache.score2), tok

        from kvjax.decode import gemm_compiler_options  # as kvjax.generate compiles its decode loop

        options = gemm_compiler_options(spec.batch) if isinstance(spec.batch, int) else {}
        return jax.jit(run, donate_argnums=(1,), compiler_options=options or None), kmod, pol, plan

    def abstract_args(self, spec: Spec, batch: int, plan):
        cfg = self.config
        p, d = plan.layout.pool_size, cfg.head_dim
        dt = self.weights.embed.dtype
        sds = jax.ShapeDtypeStruct
        pools = (sds((batch, p, d), dt), sds((batch, p, d), dt), sds((batch, p), jnp.int32),
                 sds((batch, p), jnp.float32), sds((batch, p), jnp.float32))
        m = sds((batch, cfg.num_layers, cfg.num_kv_heads), jnp.int32)
        meta = (m, m, m, m, sds((batch,), jnp.int32))
        return pools, meta, sds((batch,), jnp.int32)

    def pool_bytes_per_seq(self, plan) -> int:
        p, d = plan.layout.pool_size, self.config.head_dim
        return p * (2 * d * self.weights.embed.dtype.itemsize + 12)

    def lower(self, spec: Spec):
        """Lower one spec (main thread: tracing swaps a module). Returns a compile thunk."""
        jitted, kmod, pol, plan = self.runner(spec)
        pools, meta, tok = self.abstract_args(spec, spec.batch, plan)
        with use_kernel_module(kmod):
            lowered = jitted.lower(self.weights, pools, meta, tok)
        return lowered

    def guess_max_batch(self, spec: Spec) -> int:
        """Largest batch whose pools fit beside the weights (before checking the compiled program)."""
        if self.tiny:
            return 8
        _, plan = self.policy_plan(spec.layout, spec.budget, self.plan_ctx(spec))
        free = self.limit - self.weight_bytes - RESERVE
        per = self.pool_bytes_per_seq(plan) * 1.06 + (2 << 20)  # ~6% for per-layer temporaries, logits
        b = int(free // per)
        return max(1, b - b % 8 if b >= 16 else b)

    @staticmethod
    def needed_bytes(compiled) -> int | None:
        try:
            ma = compiled.memory_analysis()
            return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                       + ma.temp_size_in_bytes)
        except Exception:  # noqa: BLE001
            return None


# ---------------------------------------------------------------------------------------------
# cache states


def fill_state(bench: Bench, job: Job, batch: int, plan, seed: int = 0):
    """Device pools and meta for one job: (pools, meta, kv_slots_used [host int])."""
    cfg = bench.config
    num_layers, h, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    hr = plan.headroom
    base = np.asarray(plan.layout.layer_base, np.int64)
    layout = job.spec.layout
    budget = job.spec.budget
    if job.alloc == "full":
        lengths = np.full((batch, num_layers, h), job.ctx, np.int64)
    elif job.alloc == "uniform":
        lengths = np.full((batch, num_layers, h), budget, np.int64)
    elif job.alloc == "adakv":
        lengths = adakv_head_budgets(budget, batch, num_layers, h, bench.min_ctx)
    elif job.alloc in ("cake", "cake_cascade"):
        bl = np.asarray(cake_layer_budgets(budget, num_layers, bench.min_ctx), np.int64)
        lengths = np.broadcast_to(bl[None, :, None], (batch, num_layers, h)).copy()
    else:
        raise ValueError(job.alloc)
    if layout == "ada":
        caps = lengths + hr
        start = base[None, :, None] + np.cumsum(caps, axis=2) - caps
    elif layout in ("uni", "cake", "full"):
        bound = np.asarray(plan.stream_bound, np.int64)
        caps = np.broadcast_to((bound + hr)[None, :, None], lengths.shape).copy()
        start = base[None, :, None] + np.arange(h)[None, None, :] * caps
    elif layout == "cake_cascade":  # streams back to back in (layer, head) order, each + headroom
        caps = lengths + hr
        flat = caps.reshape(batch, -1)
        start = (np.cumsum(flat, axis=1) - flat).reshape(lengths.shape)
    else:
        raise ValueError(layout)
    pool = plan.layout.pool_size
    assert (lengths <= caps).all() and (start + caps <= pool).all(), "allocation does not fit the plan"
    if layout in ("uni", "ada", "cake", "full"):
        span = np.asarray(plan.layout.layer_span, np.int64)
        assert (start + caps <= (base + span)[None, :, None]).all(), "a stream leaves its layer region"
    meta = tuple(jnp.asarray(a, jnp.int32) for a in (start, lengths, caps, lengths)) + (
        jnp.full((batch,), job.ctx, jnp.int32),)
    make_pools = _pool_maker(batch, pool, d, jnp.dtype(bench.weights.embed.dtype).name)
    pools = jax.block_until_ready(make_pools(meta[0], meta[1], jnp.int32(job.ctx), jax.random.key(seed)))
    used = int(lengths.sum())
    return pools, meta, used, int(lengths.shape[1] * lengths.shape[2] * batch)


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
        st = start.reshape(batch, -1)
        ln = lengths.reshape(batch, -1)
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


# ---------------------------------------------------------------------------------------------
# measuring


def time_job(bench: Bench, job: Job, compiled, batch: int, plan, bw):
    """Fill the state, run the compiled N-step program (warm-up + reps), return the row."""
    pools, meta, used, n_streams = fill_state(bench, job, batch, plan)
    tok = jnp.zeros((batch,), jnp.int32)
    n = bench.n_steps
    t_fill = time.perf_counter()
    pools, tok = compiled(bench.weights, pools, meta, tok)  # warm-up
    first_tokens = np.asarray(tok)[:8].tolist()  # from the fresh state: compare library vs proposed
    ts = []
    for _ in range(bench.reps):
        t0 = time.perf_counter()
        pools, tok = compiled(bench.weights, pools, meta, tok)
        jax.block_until_ready(tok)
        ts.append(time.perf_counter() - t0)
    finite = bool(jnp.all((tok >= 0) & (tok < bench.config.vocab_size)))
    del pools
    step_s = statistics.median(ts) / n
    d = bench.config.head_dim
    itemsize = bench.weights.embed.dtype.itemsize
    kv_read = 2 * d * itemsize * (used + n_streams * (n + 1) / 2)  # mean over the N steps
    total = bench.weight_read + kv_read
    row = dict(name=job.name, alloc=job.alloc, ctx=job.ctx, budget=None if job.alloc == "full" else job.spec.budget,
               batch=batch, batch_requested=job.spec.batch, impl=job.spec.impl, variant=job.spec.variant,
               layout=job.spec.layout, ms_per_step=step_s * 1e3, tokens_per_s=batch / step_s,
               step_ms_all=[t / n * 1e3 for t in ts], weight_bytes_read=bench.weight_read, kv_bytes_read=kv_read,
               bytes_per_step=total, kept_tokens=used, pool_slots_per_seq=plan.layout.pool_size,
               cache_bytes=batch * bench.pool_bytes_per_seq(plan), tokens_valid=finite, first_tokens=first_tokens,
               time_s=round(time.perf_counter() - t_fill, 2))
    g = bench.config.group_size
    flops = 2 * batch * bench.weight_read / itemsize + 4 * d * g * (used + n_streams * (n + 1) / 2)
    row["flops_per_step"] = flops
    if bw:
        row["roofline_ms"] = total / bw * 1e3
        row["bw_fraction"] = (total / bw) / step_s
    if bench.peak_flops:
        row["compute_ms"] = flops / bench.peak_flops * 1e3
    return row


def compile_all(bench: Bench, specs, workers: int, log):
    """Lower in this thread, compile in a pool. Returns {spec: (compiled | exception, seconds)}."""
    out = {}
    lowered = []
    for s in specs:
        t0 = time.perf_counter()
        try:
            lowered.append((s, bench.lower(s), time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            out[s] = (e, time.perf_counter() - t0, traceback.format_exc()[-3000:])
    def comp(item):
        s, low, tl = item
        t0 = time.perf_counter()
        try:
            return s, low.compile(), tl + time.perf_counter() - t0, None
        except Exception as e:  # noqa: BLE001
            return s, e, tl + time.perf_counter() - t0, traceback.format_exc()[-3000:]
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for s, c, dt, tb in ex.map(comp, lowered):
            out[s] = (c, dt, tb)
            log(f"compiled {s.name} in {dt:.1f}s" + (f" FAILED {type(c).__name__}: {str(c)[:200]}" if tb else ""))
    return out


def check_proposed(config, weights, log, steps: int = 4) -> list[dict]:
    """The proposed decode gives the library's logits and cache: real prefills (SnapKV, Ada-KV,
    PerLayer, Full, H2O) of two prompts of different lengths, `steps` greedy decode steps each."""
    from kvjax import engine
    from kvjax import policies as P
    from kvjax.decode import decode_step
    from kvjax.policies import scorers

    dmod, kmod, _ = proposed_modules()
    rng = np.random.default_rng(0)
    t = 96
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, t)), jnp.int32)
    lengths = jnp.asarray([t, 71], jnp.int32)
    pols = {
        "snapkv": P.SnapKV(budget=32, window=8),
        "adakv": P.AdaKV(P.SnapKV(budget=32, window=8)),
        "perlayer": P.Compose(scorers.WindowAttention(8), budget=32, window=8,
                              allocator_=P.PerLayer(tuple(16 + 16 * (l % 3) for l in range(config.num_layers)))),
        "full": P.Full(),
        "h2o (evicts: unchanged path)": P.H2O(budget=32, recent=8),
    }
    out = []
    for name, pol in pols.items():
        plan = engine.make_plan(pol, config, t, steps)
        cache, logits = jax.jit(lambda w, tk, ln: engine.prefill(w, tk, ln, pol, jax.random.key(0), config=config,
                                                                   plan=plan))(weights, tokens, lengths)
        for impl in ("xla", "pallas"):
            res = {}
            du, ku, _ = proposed_modules("unstacked")
            w_un = dataclasses.replace(weights, layers=tuple(
                jax.tree_util.tree_map(lambda a, i=i: a[i], weights.layers) for i in range(config.num_layers)))
            for variant, fn, km, w in (("library", decode_step, None, weights), ("proposed", dmod.decode_step, kmod, weights),
                                       ("unstacked", du.decode_step, ku, w_un)):
                c, tok, lg = cache, jnp.argmax(logits, -1).astype(jnp.int32), []
                with use_kernel_module(km):
                    step = jax.jit(lambda w, c, tk: fn(w, c, tk, pol, None, config=config, plan=plan,
                                                       implementation=impl))
                    for _ in range(steps):
                        c, l = step(w, c, tok)
                        lg.append(l)
                        tok = jnp.argmax(l, -1).astype(jnp.int32)
                res[variant] = (c, jnp.stack(lg))
            (c0, l0), (c1, l1), (c2, l2) = res["library"], res["proposed"], res["unstacked"]
            row = dict(policy=name, impl=impl, max_abs_logit_diff=float(jnp.max(jnp.abs(l0 - l1))),
                       unstacked_max_abs_logit_diff=float(jnp.max(jnp.abs(l0 - l2))),
                       unstacked_cache_equal={f: bool(jnp.array_equal(getattr(c0, f), getattr(c2, f)))
                                              for f in ("k", "v", "pos", "length")},
                       max_abs_logit=float(jnp.max(jnp.abs(l0))),
                       cache_equal={f: bool(jnp.array_equal(getattr(c0, f), getattr(c1, f)))
                                    for f in ("k", "v", "pos", "score", "length", "next_pos")})
            out.append(row)
            log(json.dumps(row))
    return out


def probe_weight_path(config, weights, batches, n_steps, reps, bw, log, workers=8, out_dir=None, tag="") -> list[dict]:
    """Time the decode step's weight path alone (no KV cache: the query stands in for the attention
    output) three ways, to see what the layer `lax.scan` costs: "scan" (as kvjax.decode: the stacked
    [L, ...] weights are scanned), "scan_unroll" (the same scan, unroll=True) and "unstacked"
    (a Python loop over 32 separate per-layer weight pytrees: no slicing of a stacked array)."""
    from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq

    inv = rope_inv_freq(config)
    num_layers = config.num_layers

    def layer(x, lw, pos):
        q, k, v = layer_qkv(lw, x, pos, config, inv)
        x = x + attn_output(lw, q.astype(x.dtype)) + (jnp.mean(k) + jnp.mean(v)).astype(x.dtype) * 1e-3
        return mlp(lw, x, config)

    def program(kind):
        def run(weights, layer_list, tok):
            def body(i, tok):
                b = tok.shape[0]
                x = embed(weights, tok[:, None])
                pos = jnp.full((b, 1), 1000, jnp.int32) + i
                if kind == "unstacked":
                    for lw in layer_list:
                        x = layer(x, lw, pos)
                else:
                    x, _ = jax.lax.scan(lambda x, lw: (layer(x, lw, pos), None), x, weights.layers,
                                        unroll=kind == "scan_unroll")
                return jnp.argmax(final_logits(weights, x, config)[:, 0], -1).astype(jnp.int32)

            return jax.lax.fori_loop(0, n_steps, body, tok)

        return jax.jit(run)

    layer_list = [jax.tree_util.tree_map(lambda a, i=i: a[i], weights.layers) for i in range(num_layers)]
    jax.block_until_ready(layer_list)
    kinds = ("scan", "scan_unroll", "unstacked")
    lowered = []
    for kind in kinds:
        for b in batches:
            tok = jax.ShapeDtypeStruct((b,), jnp.int32)
            lowered.append((kind, b, program(kind).lower(weights, layer_list, tok)))
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        comp = list(ex.map(lambda it: (it[0], it[1], _timed_compile(it[2])), lowered))
    read = _shapes.weight_read_bytes(weights)
    rows = []
    for kind, b, (c, dt) in comp:
        if isinstance(c, Exception):
            rows.append(dict(probe=kind, batch=b, error=f"{type(c).__name__}: {str(c)[:400]}"))
            continue
        tok = jnp.zeros((b,), jnp.int32)
        tok = jax.block_until_ready(c(weights, layer_list, tok))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            tok = jax.block_until_ready(c(weights, layer_list, tok))
            ts.append(time.perf_counter() - t0)
        step = statistics.median(ts) / n_steps
        row = dict(probe=kind, batch=b, ms_per_step=step * 1e3, weight_bytes_read=read, compile_s=round(dt, 1),
                   bw_fraction=None if not bw else (read / bw) / step)
        try:
            txt = c.as_text()
            if b == 32 and out_dir is not None:
                import gzip

                (out_dir / f"decode_probe_hlo_{kind}_b{b}{tag}.txt.gz").write_bytes(gzip.compress(txt.encode()))
            row["hlo_copy_like_fusions"] = len(re.findall(r"fusion\.?[0-9]* = .*kind=kLoop.*dynamic-slice", txt))
            row["hlo_dynamic_slice_mentions"] = txt.count("dynamic-slice")
            row["hlo_custom_call_gemms"] = txt.count("__cublas$gemm") + txt.count("__cublas$lt$matmul")
            row["hlo_triton_gemms"] = txt.count("__triton_gemm")
        except Exception:  # noqa: BLE001
            pass
        rows.append(row)
        log(json.dumps(row))
    return rows


def _timed_compile(lowered):
    t0 = time.perf_counter()
    try:
        return lowered.compile(), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        return e, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the matrix


def build_tiers(args, contexts, budgets, batches):
    """Ordered tiers of jobs (most important first). Batches are ints or 'max'."""
    c32 = contexts[1] if len(contexts) > 1 else contexts[0]
    pv = tuple(args.variants)
    bmid = budgets[1] if len(budgets) > 1 else budgets[0]
    tiers = []

    def comp(budget, bs, impls, variants, ctxs=(c32,)):
        jobs = []
        for variant in variants:
            for impl in impls:
                for b in bs:
                    for layout, allocs in (("uni", ("uniform",)), ("ada", ("adakv",)), ("cake", ("cake",))):
                        spec = Spec(layout, budget, b, impl, variant)
                        for a in allocs:
                            for c in ctxs:
                                jobs.append(Job(spec, a, c))
        return jobs

    def full(ctx, bs, impls, variants):
        return [Job(Spec("full", ctx, b, impl, variant), "full", ctx) for variant in variants for impl in impls
                for b in bs]

    big = [b for b in batches if b == "max" or b >= 32]
    small = [b for b in batches if b != "max" and b < 32]
    # 1: the headline (32K, B=1024): every allocation, both implementations, library and proposed
    t1 = comp(bmid, big, ("pallas",), pv)
    t1 += full(c32, ["max"], ("pallas",), pv)
    t1 += comp(bmid, big, ("xla",), ("library",))
    tiers.append(("headline: 32K, B=%d, batch >= 32; full 32K at its largest batch" % bmid, t1))
    # 2: the other budgets at batch >= 32 (pallas both variants, xla library)
    t2 = []
    for bud in budgets:
        if bud != bmid:
            t2 += comp(bud, big, ("pallas",), pv)
    for bud in budgets:
        if bud != bmid:
            t2 += comp(bud, big, ("xla",), ("library",))
    tiers.append(("other budgets, batch >= 32", t2))
    # 3: the same compiled programs at the other contexts (compressed layouts do not depend on it)
    t3 = []
    for variant in pv:
        for b in big:
            for c in contexts:
                if c != c32:
                    t3.append(Job(Spec("uni", bmid, b, "pallas", variant), "uniform", c))
    tiers.append(("compressed at the other contexts (the same programs)", t3))
    # 4: small batches, the full cache at 32K
    t4 = comp(bmid, small, ("pallas",), pv) + comp(bmid, small, ("xla",), ("library",))
    t4 += full(c32, small, ("pallas",), pv) + full(c32, small + ["max"], ("xla",), ("library",))
    tiers.append(("32K, B=%d at batch 1 and 8; full 32K at batch 1 and 8" % bmid, t4))
    # 5: the full cache at the other contexts; small batches at the other budgets
    t5 = []
    for c in contexts:
        if c != c32:
            fb = [b for b in batches if b != "max" and b * c <= 32 * contexts[0]] + ["max"]
            t5 += full(c, fb, ("pallas",), pv)
    for bud in budgets:
        if bud != bmid:
            t5 += comp(bud, small, ("pallas",), pv) + comp(bud, small, ("xla",), ("library",))
    tiers.append(("full cache at the other contexts; small batches at the other budgets", t5))
    # 6: the real CAKE policy (cascade layout, decode-time eviction every step: the XLA path)
    t6 = [Job(Spec("cake_cascade", bmid, 8 if 8 in batches else batches[0], "xla", "library"), "cake_cascade", c32)]
    tiers.append(("real CAKE (cascade layout, decode eviction)", t6))
    if args.only:
        rx = re.compile(args.only)
        tiers = [(t, [j for j in jobs if rx.search(j.name)]) for t, jobs in tiers]
    return [(t, j) for t, j in tiers if j]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default=None, help="regex over row names alloc/ctxN/BN/bN/impl/variant")
    ap.add_argument("--tiny", action="store_true", help="miniature model and cache on CPU (checks the script)")
    ap.add_argument("--deadline-s", type=float, default=float("inf"), help="stop starting new work after this")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per timed call (default 16)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls after the warm-up (default 4)")
    ap.add_argument("--workers", type=int, default=8, help="parallel compiles")
    ap.add_argument("--dump-hlo", default=None, help="regex: write the optimized HLO of matching programs")
    ap.add_argument("--check", action="store_true", help="only check the proposed decode against the library")
    ap.add_argument("--variants", default="library,proposed", help="code variants: library, proposed, unroll")
    ap.add_argument("--probe", action="store_true", help="only time the weight path (no KV) of the layer scan")
    ap.add_argument("--tag", default="", help="suffix of the output file names (e.g. _dsf)")
    ap.add_argument("--weights", default="stacked", choices=("stacked", "unstacked"),
                    help="unstacked: Weights.layers as a tuple of per-layer LayerWeights (variant 'unstacked')")
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v == "library" or proposed_modules(v)[2] > 0]
    t_start = time.perf_counter()
    left = lambda: args.deadline_s - (time.perf_counter() - t_start)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "tiny_" + _shapes.device_slug() if args.tiny else _shapes.device_slug()
    jsonl = out_dir / f"decode_{slug}{args.tag}.jsonl"
    jsonl.write_text("")

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if args.tiny:
        cfg = _shapes.tiny_config()
        contexts, budgets, batches = (128, 256, 512), (16, 32, 64), (1, 2, 4, "max")
        n_steps, reps = args.steps or 2, args.reps or 1
        import kvjax.pallas_kernels.ragged_decode_attention as rda

        force_interpret(rda)
        for v in args.variants:
            if v != "library" and proposed_modules(v)[1] is not None:
                force_interpret(proposed_modules(v)[1])
    else:
        cfg = _shapes.llama31_8b_config()
        contexts, budgets, batches = (8192, 32768, 131072), (256, 1024, 4096), (1, 8, 32, "max")
        n_steps, reps = args.steps or 16, args.reps or 4
    meta = _shapes.device_meta()
    log(f"device {meta['device']} jax {meta['jax']}")
    bw = rbw = mm = None
    if args.tiny:
        globals()["WINDOW"] = 8
    else:
        bw = _shapes.copy_bandwidth()
        rbw = _shapes.read_bandwidth()
        mm = _shapes.matmul_flops()
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s, read bandwidth {rbw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    t0 = time.perf_counter()
    weights = _shapes.random_weights(cfg, jnp.bfloat16 if not args.tiny else jnp.float32,
                                     unstacked=args.weights == "unstacked")
    log(f"weights {_shapes.weight_bytes(weights) / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s")
    if args.check:
        checks = check_proposed(cfg, weights, log)
        (out_dir / f"decode_{slug}_check{args.tag}.json").write_text(json.dumps(dict(meta=meta, checks=checks), indent=1))
        return 0 if all(c["max_abs_logit_diff"] < 1e-3 * max(1.0, c["max_abs_logit"]) for c in checks) else 1
    if args.probe:
        import os

        meta.update(xla_flags=os.environ.get("XLA_FLAGS"))
        prows = probe_weight_path(cfg, weights, (1, 2) if args.tiny else (1, 32, 256), n_steps, reps, bw, log,
                                  args.workers, out_dir, args.tag)
        (out_dir / f"decode_{slug}_probe{args.tag}.json").write_text(json.dumps(dict(meta=meta, rows=prows), indent=1))
        return 0
    bench = Bench(cfg, weights, n_steps, reps, min(contexts), args.tiny)
    bench.peak_flops = mm
    rows, skipped = [], []
    meta.update(model="Llama-3.1-8B shapes (random weights)" if not args.tiny else "tiny", dtype=str(weights.embed.dtype),
                copy_bandwidth_GBps=None if bw is None else bw / 1e9, read_bandwidth_GBps=None if rbw is None else rbw / 1e9,
                matmul_TFLOPs=None if mm is None else mm / 1e12,
                steps_per_call=n_steps, reps=reps, weight_bytes=bench.weight_bytes, weight_read_bytes=bench.weight_read,
                contexts=contexts, budgets=budgets, values_note="random keys/values: decode speed does not depend on them",
                variants=args.variants, source_sha1=source_hashes(), weights_layout=args.weights,
                diffs={v: proposed_diff(v) for v in args.variants if v != "library"},
                patches_applied={v: proposed_modules(v)[2] for v in args.variants if v != "library"})

    def write():
        payload = dict(meta=meta, rows=rows, skipped=skipped)
        (out_dir / f"decode_{slug}{args.tag}.json").write_text(json.dumps(payload, indent=1, default=str))
        (out_dir / f"decode_{slug}{args.tag}.md").write_text(markdown(meta, rows, skipped))

    tiers = build_tiers(args, contexts, budgets, batches)
    for title, jobs in tiers:
        if left() < 30:
            skipped += [j.name for j in jobs]
            log(f"deadline: skip tier '{title}' ({len(jobs)} rows)")
            continue
        log(f"tier: {title}: {len(jobs)} rows")
        # resolve 'max' batches: guess, compile, check the compiled memory, shrink if needed
        specs = []
        for j in jobs:
            s = j.spec
            if s.batch == "max":
                key = (s.layout if s.layout not in ("cake", "uni") else "ada", s.budget, s.impl, s.variant)
                if key not in bench.max_batch:
                    bench.max_batch[key] = bench.guess_max_batch(s)
                s = dataclasses.replace(s, batch=bench.max_batch[key])
            j.resolved = s
            if s not in bench.compiled and s not in specs:
                specs.append(s)
        res = compile_all(bench, specs, args.workers, log)
        for s, (c, dt, tb) in res.items():
            if tb is None and not args.tiny and bench.limit:
                need = bench.needed_bytes(c)
                if need is not None and need > bench.limit - RESERVE // 2 and s.batch > 1:
                    # too big: shrink proportionally to the excess and compile once more
                    _, plan = bench.policy_plan(s.layout, s.budget, bench.plan_ctx(s))
                    per = need / s.batch
                    nb = max(1, int((bench.limit - RESERVE - bench.weight_bytes) // per))
                    nb = nb - nb % 8 if nb >= 16 else nb
                    log(f"{s.name}: needs {need / 2**30:.1f} GiB > limit; retry at batch {nb}")
                    s2 = dataclasses.replace(s, batch=nb)
                    r2 = compile_all(bench, [s2], 1, log)[s2]
                    bench.compiled[s] = ("moved", s2)
                    bench.compiled[s2] = r2 + (bench.needed_bytes(r2[0]) if r2[2] is None else None,)
                    continue
            bench.compiled[s] = (c, dt, tb, bench.needed_bytes(c) if tb is None else None)
        for j in jobs:
            if left() < 10:
                skipped.append(j.name)
                continue
            s = j.resolved
            entry = bench.compiled.get(s)
            if entry and entry[0] == "moved":
                s = entry[1]
                entry = bench.compiled.get(s)
            c, dt, tb, need = entry
            if tb is not None:
                row = dict(name=j.name, error=f"compile: {type(c).__name__}: {str(c)[:500]}", trace=tb)
            else:
                _, plan = bench.policy_plan(s.layout, s.budget, bench.plan_ctx(s))
                try:
                    row = time_job(bench, j, c, s.batch, plan, bw)
                    row.update(compile_s=round(dt, 1), compiled_bytes=need)
                except Exception as e:  # noqa: BLE001
                    row = dict(name=j.name, error=f"{type(e).__name__}: {str(e)[:500]}",
                               trace=traceback.format_exc()[-3000:])
                    gc.collect()
            if args.dump_hlo and re.search(args.dump_hlo, j.name) and tb is None:
                try:
                    (out_dir / f"decode_{slug}_hlo_{re.sub('[^A-Za-z0-9]+', '_', s.name)}.txt").write_text(c.as_text())
                except Exception as e:  # noqa: BLE001
                    log(f"hlo dump failed: {e}")
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            log(json.dumps({k: row.get(k) for k in ("name", "batch", "ms_per_step", "tokens_per_s", "bw_fraction",
                                                     "error")}, default=str))
        write()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    write()
    print(markdown(meta, rows, skipped))
    return 0


# ---------------------------------------------------------------------------------------------
# report


def _ctx(c):
    return f"{c // 1024}K" if c >= 1024 else str(c)


def markdown(meta, rows, skipped):
    f = _shapes.fmt
    bw = meta.get("copy_bandwidth_GBps")
    lines = [
        f"Decode on {meta['device']} ({meta['platform']}, jax {meta['jax']}), {meta['model']}, {meta['dtype']}. "
        f"Copy bandwidth {f(bw, '{:.0f}')} GB/s (x + 1, read + write), read bandwidth "
        f"{f(meta.get('read_bandwidth_GBps'), '{:.0f}')} GB/s. {meta['steps_per_call']} decode steps per jitted call "
        f"(`lax.fori_loop`, cache donated), median of {meta['reps']} calls after a warm-up. Synthetic cache states, "
        f"random keys/values ({meta['values_note']}). `budget`: tokens per KV head (window included); "
        "`GB/step`: weights read + kept K/V read; `% BW`: (GB/step / copy bandwidth) / measured time.",
        "",
        "| alloc | ctx | budget | batch | impl | variant | ms/step | tokens/s | GB/step | roofline ms | % BW | compute ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r.get("alloc", ""), r.get("budget") or 0, r.get("ctx", 0), r.get("batch", 0), r.get("impl", ""),
                     r.get("variant", ""))
    for r in sorted((r for r in rows if "error" not in r), key=key):
        lines.append(
            f"| {r['alloc']} | {_ctx(r['ctx'])} | {r['budget'] or 'all'} | {r['batch']}"
            f"{' (max)' if r['batch_requested'] == 'max' else ''} | {r['impl']} | {r['variant']} | {r['ms_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['bytes_per_step'] / 1e9:.2f} | {f(r.get('roofline_ms'), '{:.2f}')} | "
            f"{f(r.get('bw_fraction') and 100 * r['bw_fraction'], '{:.0f}%')} | {f(r.get('compute_ms'), '{:.2f}')} |")
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "Failed rows:", ""] + [f"- {r['name']}: {r['error'][:300]}" for r in errs]
    if skipped:
        lines += ["", f"Not measured (time budget): {len(skipped)} rows: " + ", ".join(skipped[:60])
                  + (" ..." if len(skipped) > 60 else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
