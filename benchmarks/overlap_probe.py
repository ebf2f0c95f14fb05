"""Can a decode step hide its attention behind its GEMMs by splitting the batch? (GPU probe)

Llama-3.1-8B's 32 layers with per-layer buffers (as `kvjax.load` keeps them on GPU), bf16 random
weights, 2 x HALF sequences of 1024 tokens per KV head, processed as two half-batches. Per layer and
half: RMSNorm, the packed q|k|v projection, the library's decode attention kernel
(`ragged_decode_attention_pallas`), the o projection and the MLP. Four programs, each timed:

    attn     the attention of both halves only                   [the K/V read]
    gemm     the projections and MLPs of both halves only        [the weights, read once per half]
    serial   everything, one kernel after another
    streams  the attention calls annotated to a second GPU stream (`compute_on("gpu_stream:1")` and
             `xla_gpu_experimental_stream_annotation`), so XLA may run one half's attention beside
             the other half's GEMMs; a compile error is recorded, not raised

    python benchmarks/overlap_probe.py --halves 128,16      # on a GPU; writes JSON + markdown
    python benchmarks/overlap_probe.py --tiny --halves 4    # CPU check of the script (interpret mode)

Results: benchmarks/results/overlap_probe_<device>.{json,md}; docs/PERFORMANCE.md reads them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from jax._src.compute_on import extend_compute_type

import _shapes
from kvjax.pallas_kernels.ragged_decode_attention import ragged_decode_attention_pallas

MODES = ("attn", "gemm", "serial", "streams")


def build(half: int, tiny: bool):
    """Weights [L] of dicts, pools [L] of (k_a, v_a, k_b, v_b) [HALF, P, D], inputs 2 x [HALF, E]."""
    L, E, H, G, D, F = (2, 256, 2, 4, 64, 512) if tiny else (32, 4096, 8, 4, 128, 14336)
    T = 64 if tiny else 1024
    dt = jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    rnd = lambda k, shape, s=0.02: jax.random.normal(k, shape, dt) * jnp.asarray(s, dt)  # noqa: E731
    fold = jax.random.fold_in
    W = [dict(qkv=rnd(fold(ks[0], i), (E, (H * G + 2 * H) * D)), o=rnd(fold(ks[1], i), (H * G * D, E)),
              gu=rnd(fold(ks[2], i), (E, 2 * F)), down=rnd(fold(ks[3], i), (F, E))) for i in range(L)]
    pools = [tuple(rnd(fold(ks[4 + j], 2 * i + h), (half, H * T, D), 1.0) for h in range(2) for j in range(2))
             for i in range(L)]
    xs = [rnd(fold(ks[6], h), (half, E), 1.0) for h in range(2)]
    shape = dict(L=L, E=E, H=H, G=G, D=D, F=F, T=T, half=half)
    return W, pools, xs, shape


def program(mode: str, shape: dict, tiny: bool):
    L, E, H, G, D, F, half = (shape[k] for k in ("L", "E", "H", "G", "D", "F", "half"))
    start = jnp.broadcast_to(jnp.arange(H, dtype=jnp.int32) * shape["T"], (half, H))
    length = jnp.full((half, H), shape["T"], jnp.int32)

    @jax.jit
    def attn(q, k, v):  # q [HALF, H, G, D], k/v [HALF, P, D]
        return ragged_decode_attention_pallas(q, k, v, start, length, sm_scale=D ** -0.5, interpret=tiny)

    def norm(x):
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(x.dtype)

    def layer(xs, w, kv):
        ka, va, kb, vb = kv
        if mode == "attn":
            q = [jnp.broadcast_to(x[:, None, None, :D], (half, H, G, D)) for x in xs]
            return tuple(x + attn(qi, k, v).reshape(half, -1)[:, :E] for x, qi, (k, v) in
                         zip(xs, q, ((ka, va), (kb, vb))))
        x = list(xs)
        q = [(norm(xi) @ w["qkv"])[:, :H * G * D].reshape(half, H, G, D) for xi in x]
        outs = []
        for qi, (k, v) in zip(q, ((ka, va), (kb, vb))):
            if mode == "gemm":
                outs.append(qi)
            elif mode == "streams":
                with extend_compute_type("gpu_stream:1"):
                    outs.append(attn(qi, k, v))
            else:
                outs.append(attn(qi, k, v))
        for i in range(2):
            x[i] = x[i] + outs[i].reshape(half, -1) @ w["o"]
            gu = norm(x[i]) @ w["gu"]
            x[i] = x[i] + (jax.nn.silu(gu[:, :F]) * gu[:, F:]) @ w["down"]
        return tuple(x)

    def run(W, pools, xs):
        xs = tuple(xs)
        for i in range(L):  # unrolled over per-layer buffers, as the library's decode step
            xs = layer(xs, W[i], pools[i])
        return xs

    return run


def measure(half: int, tiny: bool, reps: int = 6) -> dict:
    W, pools, xs, shape = build(half, tiny)
    kv_bytes = sum(int(a.size) * a.dtype.itemsize for p in pools for a in p)
    w_bytes = sum(int(a.size) * a.dtype.itemsize for w in W for a in w.values())
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, half=half,
               kv_gb=kv_bytes / 1e9, w_gb=w_bytes / 1e9)
    for mode in MODES:
        opts = {"xla_gpu_experimental_stream_annotation": True} if mode == "streams" else {}
        try:
            lowered = jax.jit(program(mode, shape, tiny)).lower(W, pools, xs)
            comp = lowered.compile(compiler_options=opts) if opts else lowered.compile()
        except Exception as e:  # noqa: BLE001 - the probe's answer for this mode
            res[mode] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(mode, res[mode], flush=True)
            continue
        jax.block_until_ready(comp(W, pools, xs))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(comp(W, pools, xs))
            ts.append(time.perf_counter() - t0)
        res[mode] = {"ms": sorted(ts)[len(ts) // 2] * 1e3, "ms_min": min(ts) * 1e3, "opts": list(opts)}
        print(mode, res[mode], flush=True)
    return res


def markdown(results: list[dict]) -> str:
    lines = [f"# Overlap probe on {results[0]['device']} (jax {results[0]['jax']})", "",
             "Two half-batches of Llama-8B's 32 layers (benchmarks/overlap_probe.py). ms per step, median of the "
             "timed calls; `streams`: the attention on a second GPU stream.", "",
             "| sequences (2 x half) | K/V GB | weights GB | attn | gemm | serial | streams |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r[m]['ms']:.2f}" if "ms" in r.get(m, {}) else "error" for m in MODES]
        lines.append(f"| {2 * r['half']} | {r['kv_gb']:.1f} | {r['w_gb']:.1f} | " + " | ".join(cells) + " |")
    errors = [f"- {m}, {2 * r['half']} sequences: `{r[m]['error'][:300]}`" for r in results for m in MODES
              if "error" in r.get(m, {})]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--halves", default="128,16", help="comma list of half-batch sizes")
    ap.add_argument("--tiny", action="store_true", help="miniature shapes on CPU (checks the script)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report", nargs="*", default=None, metavar="JSON", help="only render these result files")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.report is not None:
        results = [r for f in args.report for r in json.loads(pathlib.Path(f).read_text())["results"]]
    else:
        results = [measure(int(h), args.tiny) for h in args.halves.split(",")]
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug(None if args.report is None else results[0]["device"])
    (out / f"overlap_probe_{slug}.json").write_text(json.dumps(dict(results=results), indent=1))
    (out / f"overlap_probe_{slug}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
