"""Check every Pallas kernel against its jnp reference on the accelerator, and time both.

    python benchmarks/kernels_gpu.py [--out benchmarks/results/kernels_gpu.json] [--cpu-smoke]

1. Checks: each kernel vs its reference on fresh random inputs, including awkward shapes (3 KV
   heads, group 3, head_dim 64, pools whose size is no power of two, empty / full / ragged streams,
   sliding-window positions, ties and k = 0 rows).
2. Timings at realistic decode shapes (8 KV heads, GQA group 4, head_dim 128, bf16, pools up to
   64K slots): pallas vs xla. Two clocks per entry:
   - `*_ms`: device time per call, from one jitted program that runs the call `INNER` times back to
     back, each call's input built from the previous call's whole output (the next pool is the
     previous output pool, the next query the previous attention output, ...), so nothing is
     hoisted, merged or sliced away; the median over repetitions, divided by INNER. Compare these.
   - `*_call_ms`: median wall time of single dispatches with `block_until_ready` (includes the
     Python dispatch and the host sync, which dominate small shapes).
   For the decode attention "xla" is the engine's XLA path (`kvjax.decode_attention.decode_attention`,
   one batched matmul over the region) and `ref_ms` the dense masked reference; bandwidth columns
   are the K/V bytes of the streams divided by the time, as a fraction of a measured device copy.
A failing kernel is recorded (error + traceback) and the run goes on. Writes the JSON to --out and
a markdown table beside it (same stem, .md). `--cpu-smoke` runs tiny shapes in interpret mode.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root, if not installed
INNER = 20


def _kernels():
    try:
        from kvjax.pallas_kernels import budget_scatter as bs
        from kvjax.pallas_kernels import masked_topk as mt
        from kvjax.pallas_kernels import ragged_decode_attention as rda
    except ImportError:  # running from a checkout without `pip install -e .`
        from pallas_kernels import budget_scatter as bs
        from pallas_kernels import masked_topk as mt
        from pallas_kernels import ragged_decode_attention as rda
    return mt, bs, rda


def _region_attention():
    """The engine's XLA decode path (`kvjax.decode_attention.decode_attention`), or the same computation
    written out here when kvjax is not installed."""
    try:
        from kvjax.decode_attention import decode_attention

        return lambda q, k, v, s, l, scale: decode_attention(q, k, v, s, l, None, None, scale=scale)[0], "kvjax"
    except ImportError:
        pass

    def region(q, k, v, start, length, scale):
        b, h, g, d = q.shape
        n = k.shape[1]
        slot = jnp.arange(n)[None, None, :]
        mask = (slot >= start[:, :, None]) & (slot < (start + length)[:, :, None])
        logits = jnp.matmul(q.reshape(b, h * g, d), jnp.swapaxes(k, 1, 2),
                            preferred_element_type=jnp.float32).reshape(b, h, g, n) * scale
        probs = jnp.where(mask[:, :, None], jax.nn.softmax(jnp.where(mask[:, :, None], logits, -1e30), -1), 0.0)
        out = jnp.matmul(probs.reshape(b, h * g, n).astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.reshape(b, h, g, d)

    return region, "local copy"


def wall_ms(fn, *args, iters=30, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def device_ms(call, chain, args, *, inner=INNER, reps=15, warmup=2):
    """Median device time of one call: `inner` calls chained inside one jitted program.

    call(*args) -> output; chain(args, output) -> the next call's args, built from the output so that
    the calls stay distinct and ordered, the whole output stays live (XLA cannot compute just a
    slice of it) and the values do not change (e.g. the next pool is this call's output pool)."""

    def many(*a):
        for _ in range(inner):
            out = call(*a)
            a = chain(a, jax.lax.optimization_barrier(out))  # no folding of call i+1 into call i
        return out

    f = jax.jit(many)
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3 / inner


def copy_bandwidth(n_bytes=1 << 30):
    """Measured device copy bandwidth (read + write) in bytes/s: one jitted `a + 1` over 1 GiB."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    return 2 * x.nbytes / (wall_ms(jax.jit(lambda a: a + 1), x, iters=20) / 1e3)


# ---------------------------------------------------------------------------------------------
# inputs


def topk_inputs(rows, n, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(rows, n)).astype(np.float32)
    if ties:
        s[:, ::3] = np.round(s[:, ::3])
        s[0, min(2, n - 1)] = np.nan
        s[-1, 0] = -np.inf
    k = rng.integers(-1, n + 2, rows).astype(np.int32)
    k[0] = 0
    k[-1] = n
    valid = rng.random((rows, n)) > 0.1
    return jnp.asarray(s), jnp.asarray(k), jnp.asarray(valid)


def scatter_inputs(b, h, t, d, dtype, seed=0, frac=0.25):
    rng = np.random.default_rng(seed)
    keep = rng.random((b, h, t)) < frac
    keep[0, 0] = False
    keep[0, -1] = True
    caps = np.full((b, h), t, np.int32)
    dst = jnp.asarray((np.cumsum(caps, 1) - caps).astype(np.int32))
    p = int(caps.sum(1).max()) + 3
    src = jnp.asarray(rng.normal(size=(b, h, t, d)), dtype)
    pool = jnp.asarray(rng.normal(size=(b, p, d)), dtype)
    return pool, src, jnp.asarray(keep), dst


def decode_inputs(b, h, g, d, per_stream, dtype, seed=0, ragged=False, window=False):
    rng = np.random.default_rng(seed)
    gap = 5 if ragged else 0
    p = h * (per_stream + gap) + (7 if ragged else 0)
    start = np.tile(np.arange(h) * (per_stream + gap), (b, 1)).astype(np.int32) + (3 if ragged else 0)
    if ragged:
        length = rng.integers(0, per_stream + 1, (b, h)).astype(np.int32)
        length[0, 0] = 0
        length[-1, -1] = per_stream
    else:
        length = np.full((b, h), per_stream, np.int32)
    q = jnp.asarray(rng.normal(size=(b, h, g, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, p, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, p, d)), dtype)
    extra = {}
    if window:
        extra = dict(pos=jnp.asarray(np.tile(np.arange(p), (b, 1)).astype(np.int32)),
                     min_pos=jnp.asarray(rng.integers(0, p // 2, b).astype(np.int32)))
    return (q, k, v, jnp.asarray(start), jnp.asarray(length)), extra


# ---------------------------------------------------------------------------------------------
# checks (correctness only)


def check_topk(rows, n, interpret):
    mt, _, _ = _kernels()
    s, k, valid = topk_inputs(rows, n, seed=n, ties=True)
    ref = mt.masked_topk(s, k, valid)
    got = mt.masked_topk(s, k, valid, implementation="pallas", interpret=interpret)
    return dict(kernel="masked_topk", shape=f"[{rows}, {n}] ties/NaN/-inf, k=0 and k=N rows",
                mismatches=int(jnp.sum(ref != got)))


def check_scatter(b, h, t, d, dtype, interpret):
    _, bs, _ = _kernels()
    pool, src, keep, dst = scatter_inputs(b, h, t, d, dtype, seed=t)
    ref = bs.pack_streams(pool, src, keep, dst)
    got = bs.pack_streams(pool, src, keep, dst, implementation="pallas", interpret=interpret)
    err = float(jnp.max(jnp.abs(ref.astype(jnp.float32) - got.astype(jnp.float32))))
    return dict(kernel="budget_scatter", shape=f"src [{b}, {h}, {t}, {d}] {jnp.dtype(dtype).name}", max_abs_err=err)


def check_decode(b, h, g, d, per_stream, dtype, interpret, window=False, **kw):
    _, _, rda = _kernels()
    args, extra = decode_inputs(b, h, g, d, per_stream, dtype, seed=per_stream, ragged=True, window=window)
    scale = d ** -0.5
    ref = rda.ragged_decode_attention(*args, sm_scale=scale, **extra)
    got = rda.ragged_decode_attention(*args, sm_scale=scale, **extra, implementation="pallas", interpret=interpret,
                                      **kw)
    err = float(jnp.max(jnp.abs(ref.astype(jnp.float32) - got.astype(jnp.float32))))
    empty = np.asarray(args[4]) == 0
    return dict(kernel="ragged_decode_attention", shape=f"B {b}, H {h}, G {g}, D {d}, P {args[1].shape[1]}, "
                f"{jnp.dtype(dtype).name}, ragged{', window' if window else ''} {kw or ''}",
                max_abs_err=err, empty_streams_zero=bool((np.asarray(got, np.float32)[empty] == 0).all()))


# ---------------------------------------------------------------------------------------------
# timings


def bench_topk(rows, n, smoke, chunk=None):
    mt, _, _ = _kernels()
    s, k, valid = topk_inputs(rows, n)
    k = jnp.clip(k, 1, n - 1)
    if chunk is None:
        pal = lambda a, b, c: mt.masked_topk(a, b, c, implementation="pallas", interpret=smoke)
    else:
        pal = lambda a, b, c: mt.masked_topk_pallas(a, b, c, interpret=smoke, chunk=chunk)
    ref = lambda a, b, c: mt.masked_topk(a, b, c)
    chain = lambda a, keep: (a[0], a[1], a[2] | keep)  # keep is a subset of valid: same values
    mism = int(jnp.sum(jax.jit(ref)(s, k, valid) != jax.jit(pal)(s, k, valid)))
    inner = 2 if smoke else INNER
    return dict(kernel="masked_topk", shape=f"[{rows}, {n}]", mismatches=mism, chunk=chunk or "default",
                pallas_ms=device_ms(pal, chain, (s, k, valid), inner=inner),
                xla_ms=device_ms(ref, chain, (s, k, valid), inner=inner),
                pallas_call_ms=wall_ms(jax.jit(pal), s, k, valid), xla_call_ms=wall_ms(jax.jit(ref), s, k, valid))


def bench_scatter(b, h, t, d, smoke):
    _, bs, _ = _kernels()
    pool, src, keep, dst = scatter_inputs(b, h, t, d, jnp.bfloat16)
    plan = bs.pack_plan(keep, dst, pool.shape[1])
    pal = lambda *a: bs.budget_scatter(*a, implementation="pallas", interpret=smoke)
    ref = lambda *a: bs.budget_scatter(*a)
    chain = lambda a, out: (out,) + tuple(a[1:])  # the next call writes into this call's pool
    args = (pool, src) + tuple(plan)
    err = float(jnp.max(jnp.abs(jax.jit(ref)(*args).astype(jnp.float32) - jax.jit(pal)(*args).astype(jnp.float32))))
    inner = 2 if smoke else INNER
    return dict(kernel="budget_scatter", shape=f"src [{b}, {h}, {t}, {d}] -> pool [{b}, {pool.shape[1]}, {d}]",
                max_abs_err=err, pallas_ms=device_ms(pal, chain, args, inner=inner),
                xla_ms=device_ms(ref, chain, args, inner=inner),
                pallas_call_ms=wall_ms(jax.jit(pal), *args), xla_call_ms=wall_ms(jax.jit(ref), *args))


def bench_decode(b, h, g, d, per_stream, smoke, bw, block_kv=None, num_splits=None, with_ref=False):
    _, _, rda = _kernels()
    decode_attention, _ = _region_attention()
    args, _ = decode_inputs(b, h, g, d, per_stream, jnp.bfloat16)
    scale = d ** -0.5
    pal = lambda *a: rda.ragged_decode_attention(*a, sm_scale=scale, implementation="pallas", interpret=smoke,
                                                 block_kv=block_kv, num_splits=num_splits)
    region = lambda qq, kk, vv, s, l: decode_attention(qq, kk, vv, s, l, scale)
    ref = lambda *a: rda.ragged_decode_attention(*a, sm_scale=scale)
    chain = lambda a, out: (out.astype(a[0].dtype),) + tuple(a[1:])  # the next query is this output
    want = jax.jit(ref)(*args).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(want - jax.jit(pal)(*args).astype(jnp.float32))))
    err_region = float(jnp.max(jnp.abs(want - jax.jit(region)(*args).astype(jnp.float32))))
    inner = 2 if smoke else INNER
    t_pal = device_ms(pal, chain, args, inner=inner)
    t_region = device_ms(region, chain, args, inner=inner)
    kv_bytes = 2 * b * h * per_stream * d * 2
    p = args[1].shape[1]
    splits = num_splits or rda.default_num_splits(b, h, p, block_kv or 64)
    row = dict(kernel="ragged_decode_attention", shape=f"B {b}, H {h}, G {g}, D {d}, P {p}",
               block_kv=block_kv or "default", num_splits=splits, max_abs_err=err, xla_max_abs_err=err_region,
               pallas_ms=t_pal, xla_ms=t_region, kv_bytes=kv_bytes,
               pallas_bw_fraction=(kv_bytes / (t_pal / 1e3)) / bw if bw else None,
               xla_bw_fraction=(kv_bytes / (t_region / 1e3)) / bw if bw else None,
               pallas_call_ms=wall_ms(jax.jit(pal), *args))
    if with_ref:
        row["ref_ms"] = device_ms(ref, chain, args, inner=inner)
    return row


# ---------------------------------------------------------------------------------------------


def jobs_for(smoke, bw):
    if smoke:
        return [
            lambda: check_topk(5, 37, True), lambda: check_scatter(2, 3, 11, 64, jnp.float32, True),
            lambda: check_decode(2, 3, 3, 64, 40, jnp.float32, True),
            lambda: check_decode(2, 2, 4, 64, 40, jnp.bfloat16, True, window=True, block_kv=16),
            lambda: bench_topk(8, 256, True), lambda: bench_scatter(1, 2, 64, 64, True),
            lambda: bench_decode(2, 2, 4, 64, 128, True, bw, block_kv=32, num_splits=2, with_ref=True),
        ]
    checks = [
        lambda: check_topk(37, 1000, False), lambda: check_topk(64, 8192, False),
        lambda: check_scatter(2, 3, 333, 64, jnp.float32, False), lambda: check_scatter(4, 8, 1024, 128, jnp.bfloat16, False),
        lambda: check_decode(3, 3, 3, 64, 1000, jnp.float32, False),  # SmolLM2-like heads, odd P
        lambda: check_decode(4, 8, 4, 128, 2000, jnp.bfloat16, False),
        lambda: check_decode(4, 8, 4, 128, 2000, jnp.bfloat16, False, window=True),
        lambda: check_decode(2, 8, 4, 128, 3000, jnp.bfloat16, False, block_kv=128, num_splits=3),
        lambda: check_decode(2, 8, 4, 128, 3000, jnp.bfloat16, False, block_kv=32, num_splits=1),
    ]
    timings = [lambda: bench_topk(32 * 8, 8192, False), lambda: bench_topk(8 * 8, 32768, False),
               lambda: bench_topk(8 * 8, 32768, False, chunk=4096), lambda: bench_topk(8 * 8, 32768, False, chunk=16384),
               lambda: bench_scatter(8, 8, 8192, 128, False)]
    for b, n in ((1, 4096), (8, 1024), (8, 4096), (32, 1024), (32, 4096), (8, 8192)):
        timings.append(lambda b=b, n=n: bench_decode(b, 8, 4, 128, n, False, bw, with_ref=(b == 8 and n == 1024)))
        if (b, n) in ((8, 4096), (32, 4096), (1, 4096)):
            for bk, ns in ((32, None), (128, None), (64, 1)):
                timings.append(lambda b=b, n=n, bk=bk, ns=ns: bench_decode(b, 8, 4, 128, n, False, bw, bk, ns))
    timings.append(lambda: bench_decode(8, 3, 3, 64, 4000, False, bw))
    return checks + timings


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def markdown(meta, rows):
    fmt = lambda x, f="{:.3f}": "" if x is None else f.format(x)
    lines = [f"Kernels vs references on {meta['device']} ({meta['platform']}, jax {meta['jax']}); device copy "
             f"bandwidth {fmt(meta['copy_bandwidth_GBps'], '{:.0f}')} GB/s. Times: device ms per call "
             f"(chained calls in one program); `call ms`: single dispatch + sync.", "",
             "| kernel | shape | config | error | pallas ms | xla ms | pallas call ms | pallas BW | xla BW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('kernel', '?')} | {r.get('job', '')} | FAILED | {r['error'][:160]} | | | | | |")
            continue
        err = r.get("mismatches", r.get("max_abs_err"))
        cfg = f"blk {r['block_kv']}, {r['num_splits']} splits" if "block_kv" in r else ""
        if "chunk" in r:
            cfg = f"chunk {r['chunk']}"
        if "empty_streams_zero" in r:
            cfg = f"empty streams zero: {r['empty_streams_zero']}"
        pct = lambda x: "" if x is None else f"{x:.0%}"
        lines.append(f"| {r['kernel']} | {r['shape']} | {cfg} | {err} | {fmt(r.get('pallas_ms'))} | "
                     f"{fmt(r.get('xla_ms'))} | {fmt(r.get('pallas_call_ms'))} | {pct(r.get('pallas_bw_fraction'))} | "
                     f"{pct(r.get('xla_bw_fraction'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/kernels_gpu.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret mode, on CPU")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    dev = jax.devices()[0]
    if not smoke and dev.platform == "cpu":
        print("no accelerator: use --cpu-smoke", file=sys.stderr)
    bw = None
    try:
        bw = None if smoke else copy_bandwidth()
    except Exception as e:  # noqa: BLE001
        print(f"copy bandwidth failed: {e}", file=sys.stderr)
    rows = []
    for i, job in enumerate(jobs_for(smoke, bw)):
        t0 = time.perf_counter()
        try:
            row = job()
        except Exception as e:  # record and go on
            row = dict(job=i, error=f"{type(e).__name__}: {e}"[:3000], trace=traceback.format_exc()[-4000:])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                jaxlib=_jaxlib_version(), python=platform.python_version(),
                copy_bandwidth_GBps=None if bw is None else bw / 1e9, smoke=smoke, inner_calls=INNER,
                failures=sum("error" in r for r in rows), xla_decode_path=_region_attention()[1])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    md = markdown(meta, rows)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 1 if meta["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
