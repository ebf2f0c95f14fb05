"""Full-model decode speed: Llama-3.1-8B shapes, bf16, random weights, synthetic cache states.

    python benchmarks/decode.py [--out benchmarks/results] [--only REGEX] [--deadline-s 420] [--tiny]

What is timed: one jitted program that runs N `kvjax.decode.decode_step` calls in a `lax.fori_loop`
(the next token is the argmax of the last logits; the cache pools are donated), so the Python
dispatch is paid once per N steps. Each repetition restarts from the same stream lengths; the
median over repetitions after a warm-up call, device-synchronised (`block_until_ready`), divided
by N, is the latency per step.

Cache states are synthetic: the pool is laid out as prefill lays it out (`kvjax.compress.make_plan`
for a `kvjax.policies` policy, streams by `kvjax.cache.layout_streams`), keys/values are random. Decode speed does not depend on the values, only on the layout and lengths.

- uniform: every stream keeps B tokens, in `SnapKV(B)`'s plan (until run 8 these rows used the Ada-KV
  plan's layout; since the kernel's split count depends on whether head budgets vary, they now use
  the uniform policy's own plan);
- adakv:   Ada-KV-like: per (sequence, layer) the layer's H*B tokens are split over the heads by a
  seeded Dirichlet(1) draw (at least the 64-token window each, at most the 8K shortest context);
- cake:    CAKE-like: per-layer budgets (seeded Dirichlet(1) split of L*B over the layers, same
  bounds), `Compose(WindowAttention, allocator_=PerLayer(budgets))`;
- full:    `Full()`: every context token kept;
- cake_cascade (extra): the real `CAKE` policy's cascade layout (all layers share the pool) with
  its decode-time eviction (every step), CAKE-like layer budgets;
- h2o, tova, roco: those policies' uniform layouts with their decode-time eviction; `<name>_keep`:
  the same plan and scorer without eviction (streams start `--steps` tokens short, so both end at
  the budget): what eviction costs per step.

Compressed layouts do not depend on the context length (the pool holds B tokens per stream), so
one compiled program serves 8K, 32K and 128K; only positions change.

Bytes per step = weights read (every matrix once; the embedding table is gathered) + the kept K/V
read (mean stream length over the N steps). Roofline = bytes / measured copy bandwidth (x + 1 on a
2 GiB bf16 array, read + write counted, as benchmarks/kernels_gpu.py); `% BW` = roofline / time.

`variant` is "library" (kvjax as installed), or "xla_evict" for the decode-time eviction tier: the
same policy with `decode_step(..., fused_eviction=False)` (eviction through kvjax/evict.py's XLA ops
instead of the fused Pallas kernel), side by side. Runs 1-4 also timed proposed changes applied
as run-time source patches; those changes have landed, the patch machinery is gone, and each of
those runs' JSON keeps the diff it applied (meta.diffs). `--weights unstacked` gives per-layer
weight buffers, as `kvjax.load` does on GPU. `--probe` times the weight path alone (no KV) with
stacked/scanned, unrolled and unstacked weights.

Writes decode_<device>.json (every row and the environment) and decode_<device>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import gc
import importlib
import inspect
import json
import pathlib
import re
import statistics
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402  (sets XLA_PYTHON_CLIENT_MEM_FRACTION before jax initialises)
import _decode_states as states  # noqa: E402
from _decode_states import fill_state  # noqa: E402
from _weight_probe import probe_weight_path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

RESERVE = 2 << 30  # device bytes left free when sizing the largest batch
EXTRA_OPTIONS: dict = {}  # XLA compiler options added to every timed program (--compiler-option)


def parse_option(text: str):
    """'key=value' -> (key, int | bool | str) for jax.jit's compiler_options."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--compiler-option: expected KEY=VALUE, got {text!r}")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    return key, int(value) if re.fullmatch(r"-?\d+", value) else value


def _modules():
    import kvjax.decode as dec
    import kvjax.pallas_kernels.ragged_decode_attention as rda

    return {"kvjax/decode.py": dec, "pallas_kernels/ragged_decode_attention.py": rda}


def source_hashes() -> dict:
    """sha1 of the library sources the decode path runs (the working tree may change between runs)."""
    import hashlib

    import kvjax.decode_attention as att

    mods = dict(_modules(), **{"kvjax/decode_attention.py": att})
    return {k: hashlib.sha1(inspect.getsource(m).encode()).hexdigest()[:12] for k, m in mods.items()}


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


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compiled program: a layout at a batch, an implementation and a code variant."""

    layout: str  # "uni", "ada", "cake", "full", "cake_cascade"
    budget: int  # tokens per head (full: the context length)
    batch: int | str  # int or "max"
    impl: str
    variant: str  # "library" or "xla_evict"

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
        from kvjax import policies as P
        from kvjax.policies import scorers
        from kvjax.compress import make_plan

        cfg, n, w = self.config, self.n_steps, states.window()
        base, keep = (layout[:-5], True) if layout.endswith("_keep") else (layout, False)
        if base == "cake":
            bl = states.cake_layer_budgets(budget, cfg.num_layers, self.min_ctx)
            pol = P.Compose(scorers.WindowAttention(w), budget=min(budget, max(bl)), allocator_=P.PerLayer(bl),
                            window=w)
        else:
            pol = {"uni": lambda: P.SnapKV(budget=budget, window=w), "full": P.Full,
                   "ada": lambda: P.AdaKV(P.SnapKV(budget=budget, window=w)),
                   "h2o": lambda: P.H2O(budget=budget, recent=min(32, w)), "tova": lambda: P.TOVA(budget=budget),
                   "roco": lambda: P.RoCo(budget=budget),
                   "cake_cascade": lambda: P.CAKE(budget=budget, window=min(32, w))}[base]()
        plan = make_plan(pol, cfg, ctx, n)
        if keep:  # the same plan and scorer without decode-time eviction (streams start n tokens short)
            pol = P.Compose(pol.scorer, budget=budget)
        return pol, plan

    def plan_ctx(self, spec: Spec) -> int:
        return spec.budget if spec.layout == "full" else self.min_ctx

    # -- the jitted program
    def runner(self, spec: Spec):
        from kvjax.cache import Cache, Pools, Streams

        pol, plan = self.policy_plan(spec.layout, spec.budget, self.plan_ctx(spec))
        if pol.decode_eviction is not None and isinstance(spec.batch, int):  # as kvjax.generate narrows it
            from kvjax.cache import layout_streams

            lengths = states.stream_lengths(self, spec.layout, spec.budget, spec.batch, self.min_ctx, False)
            plan = plan.for_decode(np.asarray(layout_streams(plan, jnp.asarray(lengths, jnp.int32))[1]))
        step_fn = importlib.import_module("kvjax.decode").decode_step
        cfg, n = self.config, self.n_steps

        # variant "xla_evict": the eviction through kvjax/evict.py's XLA ops instead of the fused kernel
        fused = dict(fused_eviction=False) if spec.variant == "xla_evict" else {}

        def run(weights, pools, meta, tok):
            *streams, next_pos = meta
            cache = Cache(Pools(*pools), Streams(*streams), next_pos, plan.layout)

            def body(i, carry):
                cache, tok = carry
                cache, logits = step_fn(weights, cache, tok, pol, None, config=cfg, plan=plan,
                                        implementation=spec.impl, **fused)
                return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

            cache, tok = jax.lax.fori_loop(0, n, body, (cache, tok))
            p = cache.pools
            return (p.k, p.v, p.pos, p.score, p.score2), tok

        from kvjax.decode import gemm_compiler_options  # as kvjax.generate compiles its decode loop

        options = gemm_compiler_options(spec.batch) if isinstance(spec.batch, int) else {}
        options = {**options, **EXTRA_OPTIONS}  # --compiler-option: an experiment on top of the library's
        return jax.jit(run, donate_argnums=(1,), compiler_options=options or None), pol, plan

    def abstract_args(self, spec: Spec, batch: int, plan):
        cfg = self.config
        p, d = plan.layout.pool_size, cfg.head_dim
        dt = self.weights.embed.dtype
        sds = jax.ShapeDtypeStruct
        pools = (sds((batch, p, d), dt), sds((batch, p, d), dt), sds((batch, p), jnp.int32),
                 sds((batch, p), jnp.float32), sds((batch, p), jnp.float32))
        m = sds((cfg.num_layers, batch, cfg.num_kv_heads), jnp.int32)
        meta = (m, m, m, m, sds((batch,), jnp.int32))
        return pools, meta, sds((batch,), jnp.int32)

    def pool_bytes_per_seq(self, plan) -> int:
        p, d = plan.layout.pool_size, self.config.head_dim
        return p * (2 * d * self.weights.embed.dtype.itemsize + 12)

    def lower(self, spec: Spec):
        """Lower one spec (in the main thread). Returns the lowered program."""
        jitted, pol, plan = self.runner(spec)
        pools, meta, tok = self.abstract_args(spec, spec.batch, plan)
        return jitted.lower(self.weights, pools, meta, tok)

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
# measuring


def time_job(bench: Bench, job: Job, compiled, batch: int, plan, bw):
    """Fill the state, run the compiled N-step program (warm-up + reps), return the row."""
    pools, meta, used, n_streams = fill_state(bench, job, batch, plan)
    tok = jnp.zeros((batch,), jnp.int32)
    n = bench.n_steps
    t_fill = time.perf_counter()
    pools, tok = compiled(bench.weights, pools, meta, tok)  # warm-up
    first_tokens = np.asarray(tok)[:8].tolist()  # from the fresh state
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
    # 1: the headline (32K, B=1024): every allocation, both implementations
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
    # 6: decode-time eviction (H2O, TOVA, RoCo, the real CAKE policy's cascade layout) against the same
    # layout and scorer without it ("_keep"), batch 8 and 32, the GPU default (Pallas)
    t6 = []
    for b in [b for b in (8, 32) if b in batches] or [batches[0]]:
        for layout in ("h2o", "tova", "roco", "cake_cascade"):
            t6 += [Job(Spec(lay, bmid, b, "pallas", "library"), lay, c32) for lay in (layout, layout + "_keep")]
            if layout != "roco":  # the same policy with its eviction on the XLA path (kvjax/evict.py)
                t6.append(Job(Spec(layout, bmid, b, "pallas", "xla_evict"), layout, c32))
    tiers.append(("decode-time eviction vs the same layout without it", t6))
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
    ap.add_argument("--variants", default="library", choices=("library",),
                    help="kept for the earlier runs' commands: only the library as installed")
    ap.add_argument("--probe", action="store_true", help="only time the weight path (no KV) of the layer scan")
    ap.add_argument("--tag", default="", help="suffix of the output file names (e.g. _dsf)")
    ap.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an XLA compiler option for every timed program, on top of the library's (repeatable)")
    ap.add_argument("--weights", default="stacked", choices=("stacked", "unstacked", "packed"),
                    help="unstacked: Weights.layers as a tuple of per-layer LayerWeights; packed: per-layer with "
                         "q|k|v and gate|up packed (kvjax.load's GPU layout)")
    args = ap.parse_args(argv)
    if args.probe and args.weights != "stacked":
        ap.error("--probe compares the weight layouts itself, from stacked weights: leave --weights stacked")
    args.variants = ["library"]
    EXTRA_OPTIONS.update(parse_option(o) for o in args.compiler_option)
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
    else:
        cfg = _shapes.llama31_8b_config()
        contexts, budgets, batches = (8192, 32768, 131072), (256, 1024, 4096), (1, 8, 32, "max")
        n_steps, reps = args.steps or 16, args.reps or 4
    meta = _shapes.device_meta()
    log(f"device {meta['device']} jax {meta['jax']}")
    bw = rbw = mm = None
    if args.tiny:
        states.WINDOW = 8
    else:
        bw = _shapes.copy_bandwidth()
        rbw = _shapes.read_bandwidth()
        mm = _shapes.matmul_flops()
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s, read bandwidth {rbw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    t0 = time.perf_counter()
    weights = _shapes.random_weights(cfg, jnp.bfloat16 if not args.tiny else jnp.float32,
                                     unstacked=args.weights == "unstacked", packed=args.weights == "packed")
    log(f"weights {_shapes.weight_bytes(weights) / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s")
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
                extra_compiler_options=dict(EXTRA_OPTIONS))

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


def _read_pct(meta, r):
    """% of the read-bandwidth floor: (bytes per step / read bandwidth) / measured time."""
    rbw = meta.get("read_bandwidth_GBps")
    if not rbw or not r.get("ms_per_step"):
        return None
    return 100 * (r["bytes_per_step"] / (rbw * 1e9)) / (r["ms_per_step"] / 1e3)


def markdown(meta, rows, skipped):
    f = _shapes.fmt
    bw = meta.get("copy_bandwidth_GBps")
    lines = [
        f"Decode on {meta['device']} ({meta['platform']}, jax {meta['jax']}), {meta['model']}, {meta['dtype']}. "
        f"Copy bandwidth {f(bw, '{:.0f}')} GB/s (x + 1, read + write), read bandwidth "
        f"{f(meta.get('read_bandwidth_GBps'), '{:.0f}')} GB/s. {meta['steps_per_call']} decode steps per jitted call "
        f"(`lax.fori_loop`, cache donated), median of {meta['reps']} calls after a warm-up. Synthetic cache states, "
        f"random keys/values ({meta['values_note']}). `budget`: tokens per KV head (window included); "
        "`GB/step`: weights read + kept K/V read; `% BW`: (GB/step / copy bandwidth) / measured time; `% read`: "
        "the same against the read bandwidth (the floor of a step that reads each byte once)."
        + (f" Extra XLA options on every program: `{meta['extra_compiler_options']}`."
           if meta.get("extra_compiler_options") else ""),
        "",
        "| alloc | ctx | budget | batch | impl | variant | ms/step | tokens/s | GB/step | roofline ms | % BW | % read "
        "| compute ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r.get("alloc", ""), r.get("budget") or 0, r.get("ctx", 0), r.get("batch", 0), r.get("impl", ""),
                     r.get("variant", ""))
    for r in sorted((r for r in rows if "error" not in r), key=key):
        lines.append(
            f"| {r['alloc']} | {_ctx(r['ctx'])} | {r['budget'] or 'all'} | {r['batch']}"
            f"{' (max)' if r['batch_requested'] == 'max' else ''} | {r['impl']} | {r['variant']} | {r['ms_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['bytes_per_step'] / 1e9:.2f} | {f(r.get('roofline_ms'), '{:.2f}')} | "
            f"{f(r.get('bw_fraction') and 100 * r['bw_fraction'], '{:.0f}%')} | {f(_read_pct(meta, r), '{:.0f}%')} | "
            f"{f(r.get('compute_ms'), '{:.2f}')} |")
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "Failed rows:", ""] + [f"- {r['name']}: {r['error'][:300]}" for r in errs]
    if skipped:
        lines += ["", f"Not measured (time budget): {len(skipped)} rows: " + ", ".join(skipped[:60])
                  + (" ..." if len(skipped) > 60 else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
