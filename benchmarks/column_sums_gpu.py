"""The prompt column-sums kernels on a GPU: cuDNN's log-sum-exp, the per-head kernel, one layer.

    python benchmarks/column_sums_gpu.py [--out benchmarks/results] [--length 16384] [--batch 8]
                                         [--quick] [--tiny]

One layer of Llama-3.1-8B's attention shape (8 KV heads, GQA 4, head_dim 128, bf16) over `--batch`
right-padded prompts of up to `--length` tokens. Checks first, then timings (median wall ms):

- checks: cuDNN's log-sum-exp (`fused_causal_attention(..., return_lse=True)`: jax's cuDNN entry
  point, float32, and the public `return_residual=True`, cast to bf16) against `_lse_kernel`'s over
  the valid rows, with the other conventions it could have (log base 2) for comparison; the column
  sums from cuDNN's lse + the per-head kernel against the two-pass kernels; every head's column sums
  add up to its valid queries; `causal_attention` old (stats_lse="kernel") against new ("cudnn").
- timings: cuDNN attention alone and with its lse; the old two passes (`_lse_kernel` +
  `_colsum_kernel`, 64-row tiles); `_lse_kernel` alone; the per-head kernel given the lse for block x
  num_warps x num_stages (then the other grid order at the best); the per-head kernel after
  `_lse_kernel`; `causal_attention(..., column_sums=True)` and `column_squares=True` old vs new;
  the chunked XLA pass (not with --quick).
TFLOP/s count one causal QK^T per pass (2 * B * Hq * T^2 / 2 * D); cuDNN's QK^T and PV count as two.
A setting that fails (e.g. shared memory) is recorded with its error and the run goes on.
Writes column_sums_<device>.json and .md (`--tiny`: a CPU smoke run in interpret mode, tiny_ prefix).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402
from kernels_gpu import wall_ms  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _err(e) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


class Bench:
    def __init__(self, reps):
        self.rows, self.reps = [], reps

    def add(self, row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def time(self, kind, fn, *args, flops=None, reps=None, **fields):
        """Times fn(*args); returns its output (None on failure, recorded as an error)."""
        try:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            first = time.perf_counter() - t0
            ms = wall_ms(fn, *args, iters=reps or self.reps, warmup=0)
            row = dict(kind=kind, **fields, ms=ms, first_call_s=round(first, 2))
            if flops:
                row["tflops"] = flops / ms / 1e9
            self.add(row)
            return out
        except Exception as e:  # noqa: BLE001
            self.add(dict(kind=kind, **fields, error=_err(e)))
            return None

    def check(self, kind, thunk):
        try:
            self.add(dict(kind=kind, **thunk()))
        except Exception as e:  # noqa: BLE001
            self.add(dict(kind=kind, error=_err(e)))


def _valid(lengths, t):
    return (jnp.arange(t)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, T]


def _lse_diff(a, b, valid):
    d = jnp.where(valid, jnp.abs(a - b), 0.0)
    return float(jnp.max(d))


def _sum_diff(a, b):
    return dict(max_abs_diff=float(jnp.max(jnp.abs(a - b))), max_rel_diff=float(jnp.max(jnp.abs(a - b)) / jnp.max(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="two per-head settings, 2 reps, no chunked XLA pass")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: small shape, float32, interpret mode")
    args = ap.parse_args(argv)
    from kvjax.models import prompt_attention as pa
    from kvjax.pallas_kernels import prompt_column_sums as pcs

    b, kv, g, t, d = (2, 2, 4, 256, 64) if args.tiny else (args.batch, 8, 4, args.length, 128)
    interp = args.tiny
    rng = np.random.default_rng(0)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    q = jnp.asarray(rng.normal(size=(b, kv, g, t, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kv, t, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kv, t, d)), dtype)
    lengths = jnp.asarray([t - 37 * i for i in range(b)], jnp.int32)
    valid = _valid(lengths, t)
    scale = d ** -0.5
    flops = 2 * b * kv * g * t * t / 2 * d  # one causal QK^T
    bench = Bench(reps=2 if (args.quick or args.tiny) else 5)
    jit = jax.jit
    f32_lse = pa.float32_lse_available(q)

    # --- cuDNN attention, with and without its log-sum-exp
    attn = jit(lambda q, k, v: pa.fused_causal_attention(q, k, v, scale=scale))
    attn_lse = jit(lambda q, k, v: pa.fused_causal_attention(q, k, v, scale=scale, return_lse=True))
    attn_lse_pub = jit(lambda q, k, v: pa.fused_causal_attention(q, k, v, scale=scale, return_lse=True,
                                                                 lse_api="public"))
    base = bench.time("cuDNN attention (output)", attn, q, k, v, flops=2 * flops)
    got = bench.time("cuDNN attention + lse" + (" (float32, jax's cuDNN entry point)" if f32_lse else
                                                " (public API: jax's cuDNN entry point unavailable)"),
                     attn_lse, q, k, v, flops=2 * flops)
    got_pub = bench.time("cuDNN attention + lse (public return_residual, output dtype)", attn_lse_pub, q, k, v,
                         flops=2 * flops)
    lse_c = None if got is None else got[1]
    lse_pub = None if got_pub is None else got_pub[1]
    if got is not None and base is not None:
        bench.check("attention output with lse == without", lambda: _sum_diff(got[0].astype(jnp.float32),
                                                                           base.astype(jnp.float32)))
    base = got = got_pub = None  # free the outputs

    # --- the old passes
    lse_fn = jit(lambda q, k, n: pcs.prompt_lse_pallas(q, k, n, scale=scale, interpret=interp))
    lse_k = bench.time("_lse_kernel alone (old pass 1)", lse_fn, q, k, lengths, flops=flops,
                       block=pcs._default_block(dtype, False), num_warps=8, num_stages=3)
    old_fn = jit(lambda q, k, n: pcs.prompt_column_sums_pallas(q, k, n, scale=scale, per_head=False, interpret=interp))
    old = bench.time("old two passes (_lse_kernel + grouped _colsum_kernel)", old_fn, q, k, lengths, flops=2 * flops,
                     block=pcs._default_block(dtype, False), num_warps=8, num_stages=3)

    # --- checks: the log-sum-exp conventions, the column sums
    def lse_check(lse):
        ln2 = math.log(2.0)
        return dict(max_abs_diff_valid_rows=_lse_diff(lse, lse_k, valid),
                    if_log2_times_ln2=_lse_diff(lse * ln2, lse_k, valid),
                    mean_diff_valid_rows=float(jnp.sum(jnp.where(valid, lse - lse_k, 0)) / (jnp.sum(valid) * kv * g)),
                    lse_range_valid=[float(jnp.min(jnp.where(valid, lse_k, jnp.inf))),
                                     float(jnp.max(jnp.where(valid, lse_k, -jnp.inf)))],
                    padded_rows_finite=bool(jnp.all(jnp.isfinite(jnp.where(valid, 0.0, lse)))))

    if lse_k is not None:
        for name, lse in (("cuDNN lse (float32)", lse_c if f32_lse else None), ("public return_residual lse", lse_pub)):
            if lse is not None:
                bench.check(f"check: {name} vs _lse_kernel", lambda lse=lse: lse_check(lse))

    # --- the per-head kernel given the lse: settings sweep
    if args.tiny:
        settings = [(64, None, None)]
    elif args.quick:
        settings = [(128, 8, 3), (64, 8, 3)]
    else:
        settings = [(blk, w, st) for blk in (128, 64) for w in (8, 4) for st in (3, 2)]
    lse_in = lse_c if lse_c is not None else lse_k

    def per_head(blk, w, st, order="keys"):
        return jit(lambda q, k, n, lse: pcs.prompt_column_sums_pallas(
            q, k, n, lse, scale=scale, block=blk, num_warps=w, num_stages=st, order=order, per_head=True,
            interpret=interp))

    best, new = None, None
    if lse_in is not None:
        for blk, w, st in settings:
            fields = dict(block=blk, num_warps=w, num_stages=st, order="keys")
            out = bench.time("per-head kernel given the lse", per_head(blk, w, st), q, k, lengths, lse_in,
                             flops=flops, **fields)
            if out is not None:
                row = bench.rows[-1]
                if best is None or row["ms"] < best["ms"]:
                    best, new = row, out
        if best is not None and not args.tiny:
            blk, w, st = best["block"], best["num_warps"], best["num_stages"]
            bench.time("per-head kernel given the lse", per_head(blk, w, st, "heads"), q, k, lengths, lse_in,
                       flops=flops, block=blk, num_warps=w, num_stages=st, order="heads")
    if new is not None and old is not None:
        src = "cuDNN lse" if lse_c is not None else "_lse_kernel's lse"
        bench.check(f"check: per-head sums ({src}, fastest setting) vs old two passes", lambda: _sum_diff(new, old))

        def totals():  # each valid query's row sums to one: a head's column sums add up to its valid queries
            want = lengths.astype(jnp.float32)[:, None, None]
            return dict(max_rel_diff=float(jnp.max(jnp.abs(new.sum(-1) - want) / want)))

        bench.check("check: per-head sums add up to the valid queries", totals)
    new = None
    both = jit(lambda q, k, n: pcs.prompt_column_sums_pallas(q, k, n, scale=scale, per_head=True, interpret=interp))
    mixed = bench.time("_lse_kernel + per-head kernel (default setting)", both, q, k, lengths, flops=2 * flops)
    if mixed is not None and old is not None:
        bench.check("check: _lse_kernel + per-head vs old two passes", lambda: _sum_diff(mixed, old))
    mixed = old = lse_k = lse_c = lse_pub = lse_in = None

    # --- one layer end to end: causal_attention's GPU path, old vs new
    for squares in (False, True):
        outs = {}
        for how in ("kernel", "cudnn"):
            fn = jit(lambda q, k, v, n, how=how: pa.causal_attention(
                q, k, v, n, scale=scale, column_sums=True, column_squares=squares, stats_lse=how))  # output kept
            label = "old" if how == "kernel" else "new"
            outs[how] = bench.time(f"causal_attention({'column_squares' if squares else 'column_sums'}=True), "
                                   f"{label} (stats_lse={how!r})", fn, q, k, v, lengths)
        if outs["kernel"] is not None and outs["cudnn"] is not None:
            bench.check(f"check: causal_attention {'squares' if squares else 'sums'} new vs old",
                        lambda o=outs: {f"stat{i}": _sum_diff(a, b) for i, (a, b) in
                                        enumerate(zip(o["cudnn"][1:], o["kernel"][1:]), 1)})
        outs = None

    if not args.tiny:  # float32 inputs take smaller tiles by default (the shared memory): they must run
        q32, k32 = q[:1, :, :, :2048].astype(jnp.float32), k[:1, :, :2048].astype(jnp.float32)
        n32 = jnp.asarray([2048], jnp.int32)

        def f32_check():
            want = pa.causal_attention(q32, k32, k32, n32, scale=scale, column_sums=True, fused=False)[1]
            return {("per_head" if ph else "grouped"): float(jnp.max(jnp.abs(
                pcs.prompt_column_sums_pallas(q32, k32, n32, scale=scale, per_head=ph) - want)) / jnp.max(want))
                for ph in (True, False)}

        bench.check("check: float32, default blocks, max rel. diff to the chunked pass", f32_check)
    if not args.quick:
        chunked = jit(lambda q, k, n: pa.causal_attention(q, k, k, n, scale=scale, column_sums=True, fused=False)[1])
        bench.time("chunked XLA pass (output + column sums)", chunked, q, k, lengths, reps=1)

    # --- write
    rows = bench.rows
    ms = {r["kind"]: r["ms"] for r in rows if "ms" in r}
    summary = {}
    att = ms.get("cuDNN attention (output)")
    for label in ("old", "new"):
        key = next((k for k in ms if k.startswith("causal_attention(column_sums=True), " + label)), None)
        if att and key:
            summary[f"{label}: causal_attention(column_sums) / cuDNN attention alone"] = round(ms[key] / att, 3)
    if best is not None:
        summary["fastest per-head setting"] = {x: best[x] for x in ("block", "num_warps", "num_stages", "ms")}
    print(json.dumps(dict(summary=summary)), flush=True)
    meta = _shapes.device_meta()
    meta.update(batch=b, kv_heads=kv, group=g, length=t, head_dim=d, dtype=jnp.dtype(dtype).name,
                float32_cudnn_lse=f32_lse, quick=args.quick)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug()
    (out / f"column_sums_{slug}.json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    md = [f"# Prompt column sums, one layer, {meta['device']} (jax {meta['jax']})", "",
          f"{b} prompts of up to {t} tokens (right-padded, lengths {[int(x) for x in lengths[:3]]}...), {kv} KV heads "
          f"x {g}, head_dim {d}, {meta['dtype']}. Median wall ms. TFLOP/s: one causal QK^T per pass over the "
          "logits (cuDNN's QK^T and PV count as two). Made by `benchmarks/column_sums_gpu.py`"
          + (" --quick" if args.quick else "") + ".", "",
          "| what | block | warps | stages | order | ms | TFLOP/s | notes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            cells = f"{r['ms']:.1f} | {r.get('tflops') or 0:.0f} | |"
        elif "error" in r:
            cells = f" | | error: {r['error'][:100]} |"
        else:
            notes = {x: y for x, y in r.items() if x != "kind"}
            cells = " | | " + json.dumps(notes).replace("|", "/")[:300] + " |"
        md.append(f"| {r['kind']} | {r.get('block') or ''} | {r.get('num_warps') or ''} | "
                  f"{r.get('num_stages') or ''} | {r.get('order') or ''} | " + cells)
    md += ["", "Summary: " + json.dumps(summary)]
    (out / f"column_sums_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
