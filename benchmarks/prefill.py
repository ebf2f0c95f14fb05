"""Full-model prefill time with and without compression: Llama-3.1-8B shapes, bf16, random weights.

    python benchmarks/prefill.py [--out benchmarks/results] [--contexts 8192,32768] [--impl xla] [--tiny]

One prompt (batch 1) of 8K and 32K random tokens, prefilled by the library's jitted prefill
(`kvjax.compress.prefill`, one-shot or the cascade as the policy says) with Full,
SnapKV(1024), AdaKV(SnapKV(1024)) and, when `kvjax.policies` has it, CAKE(1024). Each program is
compiled ahead of time (compile time reported apart), run once to warm up, then timed
`--reps` times with `block_until_ready`; the median is reported, and the overhead of compression
is that time over Full's at the same context, minus 1. `compiled GiB` is the compiled program's
own memory (arguments + outputs + temporaries, from XLA's memory analysis).

Writes prefill_<device>.json and prefill_<device>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import pathlib
import statistics
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402  (sets XLA_PYTHON_CLIENT_MEM_FRACTION before jax initialises)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def policies(budget: int, window: int | None = None, cake_window: int | None = None):
    from kvjax import policies as P

    snap = (lambda: P.SnapKV(budget=budget)) if window is None else (lambda: P.SnapKV(budget=budget, window=window))
    out = {"Full": P.Full(), f"SnapKV({budget})": snap(), f"AdaKV(SnapKV({budget}))": P.AdaKV(snap())}
    if hasattr(P, "CAKE"):
        out[f"CAKE({budget})"] = P.CAKE(budget=budget) if cake_window is None else P.CAKE(budget=budget,
                                                                                          window=cake_window)
    return out


def program(config, policy, ctx: int, impl: str, headroom: int):
    from kvjax.compress import make_plan, prefill

    plan = make_plan(policy, config, ctx, headroom)

    def run(weights, tokens, lengths):
        return prefill(weights, tokens, lengths, policy, jax.random.key(0), config=config, plan=plan,
                       implementation=impl)

    return jax.jit(run), plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 8192,32768)")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--impl", default="xla", help="comma-separated: xla, pallas (the selection kernels)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--headroom", type=int, default=64, help="decode slots per stream (max_new_tokens)")
    ap.add_argument("--only", default=None, help="substring of 'policy/ctx/impl' to run")
    ap.add_argument("--tiny", action="store_true", help="miniature model on CPU (checks the script)")
    ap.add_argument("--weights", default="per_layer", choices=("per_layer", "stacked"),
                    help="per_layer: one buffer per layer (kvjax.load's default on GPU); stacked: [L, ...] arrays")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if args.tiny:
        cfg = _shapes.tiny_config()
        contexts = [int(c) for c in (args.contexts or "128,256").split(",")]
        budget = args.budget or 32
        pols = policies(budget, window=8, cake_window=8)
        dtype = jnp.float32
    else:
        cfg = _shapes.llama31_8b_config()
        contexts = [int(c) for c in (args.contexts or "8192,32768").split(",")]
        budget = args.budget or 1024
        pols = policies(budget)
        dtype = jnp.bfloat16
    impls = args.impl.split(",")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "tiny_" + _shapes.device_slug() if args.tiny else _shapes.device_slug()
    meta = _shapes.device_meta()
    log(f"device {meta['device']} jax {meta['jax']}")
    weights = _shapes.random_weights(cfg, dtype, unstacked=args.weights == "per_layer")
    meta.update(weights_layout=args.weights, model="Llama-3.1-8B shapes (random weights)" if not args.tiny else "tiny", dtype=jnp.dtype(dtype).name,
                batch=1, reps=args.reps, headroom=args.headroom, budget=budget)
    jobs = [(name, pol, ctx, impl) for ctx in contexts for impl in impls for name, pol in pols.items()
            if not args.only or args.only in f"{name}/{ctx}/{impl}"]

    # lower here, compile in parallel
    lowered = {}
    for name, pol, ctx, impl in jobs:
        t0 = time.perf_counter()
        fn, plan = program(cfg, pol, ctx, impl, args.headroom)
        tok = jax.ShapeDtypeStruct((1, ctx), jnp.int32)
        ln = jax.ShapeDtypeStruct((1,), jnp.int32)
        try:
            lowered[(name, ctx, impl)] = (fn.lower(weights, tok, ln), time.perf_counter() - t0, plan)
        except Exception as e:  # noqa: BLE001
            lowered[(name, ctx, impl)] = (e, time.perf_counter() - t0, traceback.format_exc()[-3000:])

    def comp(key):
        low, tl, plan = lowered[key]
        if isinstance(low, Exception):
            return key, low, tl, plan
        t0 = time.perf_counter()
        try:
            return key, low.compile(), tl + time.perf_counter() - t0, plan
        except Exception as e:  # noqa: BLE001
            return key, e, tl + time.perf_counter() - t0, traceback.format_exc()[-3000:]

    compiled = {}
    with cf.ThreadPoolExecutor(max_workers=8) as ex:
        for key, c, dt, extra in ex.map(comp, list(lowered)):
            compiled[key] = (c, dt, extra)
            log(f"compiled {key} in {dt:.1f}s" + ("" if not isinstance(c, Exception) else f" FAILED {c}"))

    rows = []
    rng = np.random.default_rng(0)
    for name, pol, ctx, impl in jobs:
        c, dt, extra = compiled[(name, ctx, impl)]
        if isinstance(c, Exception):
            rows.append(dict(policy=name, ctx=ctx, impl=impl, error=f"{type(c).__name__}: {str(c)[:500]}", trace=extra))
            continue
        try:
            tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, ctx)), jnp.int32)
            lengths = jnp.asarray([ctx], jnp.int32)
            cache, logits = c(weights, tokens, lengths)
            jax.block_until_ready(logits)
            del cache
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                cache, logits = c(weights, tokens, lengths)
                jax.block_until_ready((cache, logits))
                ts.append(time.perf_counter() - t0)
                del cache
            ma = c.memory_analysis()
            used = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
            plan = extra
            row = dict(policy=name, ctx=ctx, impl=impl, seconds=statistics.median(ts), seconds_all=ts,
                       compile_s=round(dt, 1), compiled_bytes=int(used), temp_bytes=int(ma.temp_size_in_bytes),
                       output_bytes=int(ma.output_size_in_bytes), pool_slots=plan.layout.pool_size,
                       logits_finite=bool(jnp.all(jnp.isfinite(logits))))
        except Exception as e:  # noqa: BLE001
            row = dict(policy=name, ctx=ctx, impl=impl, error=f"{type(e).__name__}: {str(e)[:500]}",
                       trace=traceback.format_exc()[-3000:])
        rows.append(row)
        log(json.dumps({k: row.get(k) for k in ("policy", "ctx", "impl", "seconds", "compile_s", "error")}))
        md = write(out_dir, slug + args.tag, meta, rows, t_start)  # after every row: a timeout keeps what was measured
    print(md)
    return 0


def write(out_dir, slug, meta, rows, t_start):
    full = {(r["ctx"], r["impl"]): r["seconds"] for r in rows if r["policy"] == "Full" and "seconds" in r}
    for r in rows:
        if "seconds" in r and (r["ctx"], r["impl"]) in full:
            r["overhead_vs_full"] = r["seconds"] / full[(r["ctx"], r["impl"])] - 1
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    payload = dict(meta=meta, rows=rows)
    (out_dir / f"prefill_{slug}.json").write_text(json.dumps(payload, indent=1, default=str))
    md = markdown(meta, rows)
    (out_dir / f"prefill_{slug}.md").write_text(md)
    return md


def markdown(meta, rows):
    f = _shapes.fmt
    lines = [f"Prefill on {meta['device']} ({meta['platform']}, jax {meta['jax']}), {meta['model']}, {meta['dtype']}, "
             f"batch 1, random prompt tokens; median of {meta['reps']} runs after a warm-up (compile excluded). "
             f"`overhead`: time / Full's time at the same context - 1. `compiled GiB`: the program's arguments + "
             f"outputs + temporaries (XLA memory analysis), weights included.", "",
             "| context | policy | impl | seconds | overhead vs Full | tokens/s | compiled GiB | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['ctx']} | {r['policy']} | {r['impl']} | FAILED: {r['error'][:150]} | | | | |")
            continue
        ov = r.get("overhead_vs_full")
        lines.append(f"| {r['ctx']} | {r['policy']} | {r['impl']} | {r['seconds']:.3f} | "
                     f"{'' if ov is None else f'{100 * ov:+.1f}%'} | {r['ctx'] / r['seconds']:.0f} | "
                     f"{r['compiled_bytes'] / 2**30:.2f} | {f(r['compile_s'], '{:.1f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
