"""Check every Pallas kernel against its jnp reference on the accelerator, and time both.

    python benchmarks/kernels_gpu.py [--out benchmarks/results] [--cpu-smoke]

Shapes are realistic for decode over a compressed cache (8 KV heads, GQA group 4, head_dim 128,
bf16). Each row: max abs error vs the reference, median time of pallas and xla (after warm-up,
`block_until_ready`), and for the decode attention the bytes read and the achieved bandwidth.
A kernel that fails to lower or run is recorded, not fatal. Writes kernels_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, iters=50, warmup=5):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(n_bytes=1 << 30):
    """Measured device copy bandwidth (read + write) in bytes/s."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    t = timed(f, x, iters=20)
    return 2 * x.nbytes / t


def bench_topk(rows, n, smoke):
    from kvjax.pallas_kernels.masked_topk import masked_topk

    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(rows, n)).astype(np.float32))
    k = jnp.asarray(rng.integers(1, n, rows).astype(np.int32))
    valid = jnp.asarray(rng.random((rows, n)) > 0.05)
    ref = jax.jit(lambda a, b, c: masked_topk(a, b, c))
    pal = jax.jit(lambda a, b, c: masked_topk(a, b, c, implementation="pallas", interpret=smoke))
    err = int(jnp.sum(ref(s, k, valid) != pal(s, k, valid)))
    return dict(kernel="masked_topk", shape=f"[{rows}, {n}]", mismatches=err,
                pallas_ms=timed(pal, s, k, valid) * 1e3, xla_ms=timed(ref, s, k, valid) * 1e3)


def bench_scatter(b, h, t, d, smoke):
    from kvjax.pallas_kernels import budget_scatter as bs

    rng = np.random.default_rng(0)
    keep = jnp.asarray(rng.random((b, h, t)) < 0.25)
    caps = np.full((b, h), t // 4 + 64, np.int32)
    dst = jnp.asarray(np.cumsum(caps, 1) - caps)
    p = int(caps.sum(1).max())
    src = jnp.asarray(rng.normal(size=(b, h, t, d)), jnp.bfloat16)
    pool = jnp.zeros((b, p, d), jnp.bfloat16)
    plan = bs.pack_plan(keep, dst, p)
    ref = jax.jit(lambda *a: bs.budget_scatter(*a))
    pal = jax.jit(lambda *a: bs.budget_scatter(*a, implementation="pallas", interpret=smoke))
    err = float(jnp.abs(ref(pool, src, *plan).astype(jnp.float32) - pal(pool, src, *plan).astype(jnp.float32)).max())
    return dict(kernel="budget_scatter", shape=f"src [{b}, {h}, {t}, {d}] -> pool [{b}, {p}, {d}]", max_abs_err=err,
                pallas_ms=timed(pal, pool, src, *plan) * 1e3, xla_ms=timed(ref, pool, src, *plan) * 1e3)


def bench_decode(b, h, g, d, per_stream, smoke, bw, block_kv=64, num_splits=4):
    from kvjax.attention import decode_attention
    from kvjax.pallas_kernels import ragged_decode_attention as rda

    rng = np.random.default_rng(0)
    p = h * per_stream
    q = jnp.asarray(rng.normal(size=(b, h, g, d)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(b, p, d)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, p, d)), jnp.bfloat16)
    start = jnp.asarray(np.tile(np.arange(h) * per_stream, (b, 1)).astype(np.int32))
    length = jnp.full((b, h), per_stream, jnp.int32)
    scale = d ** -0.5
    ref = jax.jit(lambda *a: rda.ragged_decode_attention(*a, sm_scale=scale))
    pal = jax.jit(lambda *a: rda.ragged_decode_attention(*a, sm_scale=scale, implementation="pallas",
                                                          interpret=smoke, block_kv=block_kv, num_splits=num_splits))
    region = jax.jit(lambda qq, kk, vv, s, l: decode_attention(qq, kk, vv, s, l, None, None, scale=scale)[0])
    args = (q, k, v, start, length)
    err = float(jnp.abs(ref(*args).astype(jnp.float32) - pal(*args).astype(jnp.float32)).max())
    kv_bytes = 2 * b * p * d * 2
    t_pal, t_region = timed(pal, *args), timed(region, *args)
    return dict(kernel="ragged_decode_attention", shape=f"B {b}, H {h}, G {g}, D {d}, {per_stream} slots/stream",
                block_kv=block_kv, num_splits=num_splits, max_abs_err=err, pallas_ms=t_pal * 1e3,
                xla_region_ms=t_region * 1e3, kv_bytes=kv_bytes,
                pallas_bw_fraction=(kv_bytes / t_pal) / bw if bw else None,
                xla_bw_fraction=(kv_bytes / t_region) / bw if bw else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret mode")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    dev = jax.devices()[0]
    bw = None if smoke else copy_bandwidth()
    jobs = (
        [lambda: bench_topk(8, 256, smoke), lambda: bench_scatter(1, 2, 64, 64, smoke),
         lambda: bench_decode(2, 2, 4, 64, 128, smoke, bw)]
        if smoke else
        [lambda: bench_topk(32 * 8, 8192, smoke), lambda: bench_topk(8 * 8, 32768, smoke),
         lambda: bench_scatter(8, 8, 8192, 128, smoke)]
        + [lambda b=b, n=n, bk=bk, ns=ns: bench_decode(b, 8, 4, 128, n, smoke, bw, bk, ns)
           for b in (1, 8, 32) for n in (1024, 4096) for bk, ns in ((64, 4), (128, 8), (64, 16))]
    )
    rows = []
    for job in jobs:
        try:
            rows.append(job())
        except Exception as e:  # record and go on
            rows.append(dict(kernel="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:]))
        print(json.dumps(rows[-1], default=str), flush=True)
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                copy_bandwidth_GBps=None if bw is None else bw / 1e9, smoke=smoke)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_smoke" if smoke else f"kernels_{dev.platform}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    lines = [f"Kernels vs references on {meta['device']} (jax {meta['jax']}); copy bandwidth "
             f"{meta['copy_bandwidth_GBps'] or 0:.0f} GB/s.", "",
             "| kernel | shape | error | pallas ms | xla ms | pallas BW | xla BW |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] == "error":
            lines.append(f"| error | {r['error'][:120]} | | | | | |")
            continue
        err = r.get("mismatches", r.get("max_abs_err"))
        xla = r.get("xla_ms", r.get("xla_region_ms"))
        fmt = lambda x: "" if x is None else f"{x:.0%}"
        shape = r["shape"] + (f", blk {r['block_kv']} x {r['num_splits']} splits" if "block_kv" in r else "")
        lines.append(f"| {r['kernel']} | {shape} | {err} | {r['pallas_ms']:.3f} | {xla:.3f} | "
                     f"{fmt(r.get('pallas_bw_fraction'))} | {fmt(r.get('xla_bw_fraction'))} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
