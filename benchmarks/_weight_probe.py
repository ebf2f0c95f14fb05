"""The decode step's weight path alone (no KV cache), three ways: stacked weights in `lax.scan`,
the same scan unrolled, and per-layer buffers in a Python loop. This is the measurement that showed
the scan copying every layer's weights before its GEMMs (`decode.py --probe`, runs 1-4).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp

import _shapes


def probe_weight_path(config, weights, batches, n_steps, reps, bw, log, workers=8, out_dir=None, tag="") -> list[dict]:
    """Time the decode step's weight path alone (no KV cache: the query stands in for the attention
    output) three ways, to see what the layer `lax.scan` costs: "scan" (as kvjax.decode: the stacked
    [L, ...] weights are scanned), "scan_unroll" (the same scan, unroll=True) and "unstacked"
    (a Python loop over 32 separate per-layer weight pytrees: no slicing of a stacked array)."""
    from kvjax.models import decoder_layer, embed, final_logits

    num_layers = config.num_layers

    def attend(q, k, v):  # the query stands in for the attention output; k and v stay live
        return q + (jnp.mean(k) + jnp.mean(v)).astype(q.dtype) * 1e-3, None

    def layer(x, lw, pos):
        return decoder_layer(lw, x, pos, config, attend)[0]

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
