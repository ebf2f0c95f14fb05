"""The prompt column-sums kernels on a GPU: settings sweep and one layer against cuDNN attention.

    python benchmarks/column_sums_gpu.py [--out benchmarks/results] [--length 16384] [--batch 8] [--tiny]

One layer of Llama-3.1-8B's attention shape (8 KV heads, GQA 4, head_dim 128, bf16) over `--batch`
prompts of `--length` tokens: `prompt_column_sums_pallas` (the log-sum-exp pass and the column-sums
pass, H2O's statistics) for block x num_warps x num_stages; cuDNN flash attention
(`jax.nn.dot_product_attention`) for the same layer as the yardstick; the chunked XLA pass the
library used before. TFLOP/s count one causal QK^T per pass (2 * B * Hq * T^2 / 2 * D each).
Writes column_sums_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402
from kernels_gpu import wall_ms  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _time(fn, *args, reps=3):
    """Median wall seconds of `reps` calls after one warm-up (kernels_gpu's timer)."""
    return wall_ms(fn, *args, iters=reps, warmup=1) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    from kvjax.models.prompt_attention import causal_attention, fused_causal_attention
    from kvjax.pallas_kernels import prompt_column_sums as pcs

    b, kv, g, t, d = (1, 2, 4, 256, 64) if args.tiny else (args.batch, 8, 4, args.length, 128)
    rng = np.random.default_rng(0)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    q = jnp.asarray(rng.normal(size=(b, kv, g, t, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kv, t, d)), dtype)
    lengths = jnp.asarray([t - 37 * i for i in range(b)], jnp.int32)
    scale = d ** -0.5
    flops = 2 * b * kv * g * t * t / 2 * d  # one causal QK^T
    rows = []
    settings = [(64, None, None)] if args.tiny else [
        (blk, w, st) for blk in (64, 128) for w in (4, 8) for st in (2, 3)]
    ref = None
    for blk, w, st in settings:
        fn = jax.jit(lambda q, k, n, blk=blk, w=w, st=st: pcs.prompt_column_sums_pallas(
            q, k, n, scale=scale, block=blk, num_warps=w, num_stages=st, interpret=args.tiny))
        try:
            sec = _time(fn, q, k, lengths)
            out = fn(q, k, lengths)
            ref = out if ref is None else ref
            rows.append(dict(kind="column sums (pallas)", block=blk, num_warps=w, num_stages=st, ms=sec * 1e3,
                             tflops=2 * flops / sec / 1e12, max_rel_diff_to_first=float(jnp.max(jnp.abs(out - ref))
                                                                                       / jnp.max(ref))))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kind="column sums (pallas)", block=blk, num_warps=w, num_stages=st,
                             error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
    if not args.tiny:  # float32 inputs take smaller tiles by default (the shared memory): they must run
        q32, k32 = q[:1, :, :, :2048].astype(jnp.float32), k[:1, :, :2048].astype(jnp.float32)
        try:
            got = pcs.prompt_column_sums_pallas(q32, k32, jnp.asarray([2048], jnp.int32), scale=scale)
            want = causal_attention(q32, k32, k32, jnp.asarray([2048], jnp.int32), scale=scale, column_sums=True,
                                    fused=False)[1]
            rows.append(dict(kind="float32, default block", ok=True,
                             max_rel_diff=float(jnp.max(jnp.abs(got - want)) / jnp.max(want))))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kind="float32, default block", error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
    q5, k5 = q, k
    if not args.tiny:
        att = jax.jit(lambda q, k, v: fused_causal_attention(q, k, v, scale=scale))
        sec = _time(att, q5, k5, k5)
        rows.append(dict(kind="cuDNN flash attention (output)", ms=sec * 1e3, tflops=2 * flops / sec / 1e12))
        print(json.dumps(rows[-1]), flush=True)
    chunked = jax.jit(lambda q, k, n: causal_attention(q, k, k, n, scale=scale, column_sums=True, fused=False)[1])
    sec = _time(chunked, q5, k5, lengths, reps=1)
    cs = chunked(q5, k5, lengths)
    rows.append(dict(kind="chunked XLA pass (output + column sums)", ms=sec * 1e3,
                     max_rel_diff_to_pallas=None if ref is None else float(jnp.max(jnp.abs(cs - ref)) / jnp.max(cs))))
    print(json.dumps(rows[-1]), flush=True)
    meta = _shapes.device_meta()
    meta.update(batch=b, kv_heads=kv, group=g, length=t, head_dim=d, dtype=jnp.dtype(dtype).name)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug()
    (out / f"column_sums_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = [f"# Prompt column sums, one layer, {meta['device']} (jax {meta['jax']})", "",
          f"{b} prompts of {t} tokens, {kv} KV heads x {g}, head_dim {d}, {meta['dtype']}. "
          "TFLOP/s: one causal QK^T per pass (the Pallas kernels make two passes; cuDNN's QK^T and PV count as two). "
          "Made by `benchmarks/column_sums_gpu.py`.", "",
          "| what | block | warps | stages | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            cells = f"{r['ms']:.1f} | {r.get('tflops', 0) or 0:.0f} |"
        elif "error" in r:
            cells = f"error: {r['error'][:80]} | |"
        else:
            cells = f"ran; max rel. diff to the chunked pass {r['max_rel_diff']:.2g} | |"
        md.append(f"| {r['kind']} | {r.get('block', '')} | {r.get('num_warps') or ''} | {r.get('num_stages') or ''} | "
                  + cells)
    (out / f"column_sums_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
