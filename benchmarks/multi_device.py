"""Decode and prefill on a mesh of devices: Llama-3.1-8B shapes, bf16, random weights.

    python benchmarks/multi_device.py [--out benchmarks/results] [--meshes 1x1,2x1,1x2] [--deadline-s 540] [--tiny]

For each mesh (data x model) of the first devices, with the library as users call it
(`kvjax.shard`, `kvjax.prefill`, `kvjax.decode.decode_step(parallel=...)`):
- prefill: one 32K-token prompt per data shard, SnapKV(1024), compile excluded, median of 2;
- decode: a cache compressed by SnapKV(1024) and Ada-KV(SnapKV(1024)) from 2K-token prompts (the
  pool holds 1024 tokens per head whatever the prompt's length, so a step costs what it costs at
  32K), repeated to the batch; N steps in one jitted `fori_loop` (cache donated), median over
  repetitions / N, at batch 1 (SnapKV), 32 and the largest batch that fits beside the weights;
- per-device cache bytes, and whether the mesh gives one device's greedy tokens: 16 prompts,
  16 new tokens, bf16 (the first 16 tokens equal for at least 15 of 16 sequences is the target).

Writes multi_device_<device>.json and multi_device_<device>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402  (sets XLA_PYTHON_CLIENT_MEM_FRACTION before jax initialises)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def place(params, mesh):
    """Params on `mesh` (per-layer buffers kept), or as they are for a one-device run."""
    if mesh is None:
        return params
    from kvjax.mesh import Parallel
    from kvjax.sharding import auto_mesh

    mesh = auto_mesh(mesh)
    specs = Parallel(mesh).weight_specs(params.weights, params.config)
    shardings = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    return dataclasses.replace(params, weights=jax.device_put(params.weights, shardings), mesh=mesh)


def decode_program(params, plan, policy, n_steps, par):
    from kvjax.decode import decode_step

    def run(weights, cache, tok):
        def body(i, carry):
            cache, tok = carry
            cache, logits = decode_step(weights, cache, tok, policy, None, config=params.config, plan=plan,
                                        implementation="pallas" if jax.default_backend() == "gpu" else "xla",
                                        parallel=par)
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, n_steps, body, (cache, tok))

    return jax.jit(run, donate_argnums=(1,))


def batch_cache(pre, batch, par):
    """The prefilled cache's rows repeated to `batch` sequences, each device repeating its own rows
    in its own part of the pool (no full-batch copy anywhere)."""
    from kvjax.cache import Cache

    def take(c, n):
        rows = jnp.arange(n) % c.batch_size
        return Cache(jax.tree_util.tree_map(lambda a: a[rows], c.pools),
                     jax.tree_util.tree_map(lambda a: a[:, rows], c.streams), c.next_pos[rows], c.layout)

    if par is None:
        return jax.block_until_ready(jax.jit(lambda c: take(c, batch))(pre.cache))
    specs = par.cache_specs(pre.cache.layout)
    local = jax.jit(par.shard(lambda c: take(c, batch // par.data), (specs,), specs))
    return jax.block_until_ready(local(pre.cache))


def trace_step(prog, weights, cache, tok, steps, trace_dir):
    """One call of the decode program under the profiler: GPU time per kernel family and the top
    kernels, per step (benchmarks/decode_tuning.py's summary; collectives show as nccl kernels)."""
    import decode_tuning as T

    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        cache, tok = jax.block_until_ready(prog(weights, cache, tok))
    events, _ = T._trace_events(trace_dir)
    summary = T.summarize_trace(events, steps) if events is not None else dict(error="no trace")
    nccl = [k for k in summary.get("top_kernels", []) if "nccl" in k["name"].lower()]
    summary["collectives_us_per_step"] = sum(k["us_per_step"] for k in nccl)
    return dict(summary, cache=cache)


def largest_batch(params, pre, par, reserve=6 << 30) -> int:
    """Sequences whose pools fit beside the weights on every device (a multiple of `data`)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 16 << 30)
    data = 1 if par is None else par.data
    model = 1 if par is None else par.model
    per_seq = sum(x.nbytes for x in jax.tree_util.tree_leaves(pre.cache.pools)) / pre.cache.batch_size
    weights = _shapes.weight_bytes(params.weights) / model
    per_device = int((limit - weights - reserve) // (per_seq / model * 1.25))
    b = per_device * data
    return max(data, b - b % (8 * data) if b >= 16 * data else b - b % data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--meshes", default="1x1,2x1,1x2")
    ap.add_argument("--deadline-s", type=float, default=540.0)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="skip the same-tokens check and the prefill rows")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    left = lambda: args.deadline_s - (time.perf_counter() - t_start)  # noqa: E731

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    import kvjax
    from kvjax import policies as P
    from kvjax.io.checkpoint import Params
    from kvjax.mesh import Parallel, mesh_stats

    tiny = args.tiny
    cfg = _shapes.tiny_config() if tiny else _shapes.llama31_8b_config()
    budget, ctx, short, window = (32, 512, 128, 8) if tiny else (1024, 32768, 2048, 64)
    weights = _shapes.random_weights(cfg, jnp.float32 if tiny else jnp.bfloat16, unstacked=not tiny)
    base = Params(cfg, weights, tokenizer=None)
    meta = _shapes.device_meta()
    meta.update(devices=jax.device_count(), budget=budget, prefill_ctx=ctx, decode_prompt=short, steps=args.steps,
                reps=args.reps, weight_bytes=_shapes.weight_bytes(weights))
    rng = np.random.default_rng(0)
    prompts16 = [rng.integers(0, cfg.vocab_size, short).astype(np.int32) for _ in range(16)]
    reference = None
    rows = []
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if tiny else "") + _shapes.device_slug()

    def write():
        (out / f"multi_device_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
        (out / f"multi_device_{slug}.md").write_text(markdown(meta, rows))

    for shape_text in args.meshes.split(","):
        data, model = (int(x) for x in shape_text.split("x"))
        if data * model > jax.device_count() or left() < 60:
            rows.append(dict(mesh=shape_text, skipped="not enough devices or time"))
            continue
        mesh = None if data * model == 1 else jax.make_mesh((data, model), ("data", "model"),
                                                            devices=jax.devices()[: data * model])
        params = place(base, mesh)
        par = Parallel.of(params.mesh)
        log(f"mesh {shape_text}")
        try:
            # same tokens as one device (greedy, bf16)
            gen = None if args.decode_only else kvjax.generate(params, prompts16, policy=P.SnapKV(budget=budget, window=window), max_new_tokens=16)
            if gen is not None:
                reference = gen.tokens if reference is None else reference
                equal = sum(a[:16] == b[:16] for a, b in zip(gen.tokens, reference))
                rows.append(dict(mesh=shape_text, what="same tokens as one device", equal=equal, of=16))
                log(f"  same tokens: {equal}/16")
            # prefill at 32K: one prompt per data shard
            long = [rng.integers(0, cfg.vocab_size, ctx).astype(np.int32) for _ in range(data)]
            for name, pol in (() if args.decode_only else (("SnapKV", P.SnapKV(budget=budget, window=window)),)):
                kvjax.prefill(params, long, pol, max_new_tokens=16)  # compiles
                ts = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    jax.block_until_ready(kvjax.prefill(params, long, pol, max_new_tokens=16).logits)
                    ts.append(time.perf_counter() - t0)
                rows.append(dict(mesh=shape_text, what="prefill", policy=name, ctx=ctx, batch=data,
                                 seconds=statistics.median(ts)))
                log(f"  prefill {name} {ctx}: {statistics.median(ts):.3f}s")
            # decode
            for name, pol in (("SnapKV", P.SnapKV(budget=budget, window=window)), ("AdaKV", P.AdaKV(P.SnapKV(budget=budget, window=window)))):
                pre = kvjax.prefill(params, prompts16[: max(8, data)], pol, max_new_tokens=args.steps)
                mstats = mesh_stats(par, params, pre.cache) if par is not None else None
                biggest = largest_batch(params, pre, par) if not tiny else 8 * data
                # batch 32 in all, and 32 per device when sequences are split over `data`
                per_device = (32 * data,) if data > 1 else ()
                batches = ((1 if data == 1 else data, 32) + per_device + (biggest,) if name == "SnapKV"
                           else (32,) + per_device + (biggest,))
                if args.decode_only:
                    batches = (biggest,) if name == "SnapKV" else (32, biggest)
                for batch in batches:
                    if left() < 45:
                        rows.append(dict(mesh=shape_text, what="decode", policy=name, batch=batch, skipped="time"))
                        continue
                    cache = batch_cache(pre, batch, par)
                    prog = decode_program(params, pre.plan, pre.policy, args.steps, par)
                    tok = jnp.zeros((batch,), jnp.int32)
                    if par is not None:
                        tok = jax.device_put(tok, jax.sharding.NamedSharding(par.mesh, par.batch(1)))
                    t0 = time.perf_counter()
                    cache, tok = prog(params.weights, cache, tok)
                    jax.block_until_ready(tok)
                    first = time.perf_counter() - t0
                    ts = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        cache, tok = prog(params.weights, cache, tok)
                        jax.block_until_ready(tok)
                        ts.append(time.perf_counter() - t0)
                    step = statistics.median(ts) / args.steps
                    prof = None
                    if batch <= data and name == "SnapKV" and not tiny:  # where the time of a small step goes
                        prof = trace_step(prog, params.weights, cache, tok, args.steps,
                                          pathlib.Path(tempfile.mkdtemp(prefix=f"trace_{shape_text}_")))
                        cache = prof.pop("cache")
                    per_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(cache))
                    rows.append(dict(mesh=shape_text, what="decode", policy=name, batch=batch, ms_per_step=step * 1e3,
                                     tokens_per_s=batch / step, cache_bytes_per_device=int(per_dev),
                                     compile_and_first_s=round(first, 1), mesh_stats=mstats, profile=prof))
                    log(f"  decode {name} b{batch}: {step * 1e3:.2f} ms/step, {batch / step:.0f} tok/s, "
                        f"{per_dev / 2**30:.2f} GiB cache per device")
                    del cache
        except Exception as e:  # noqa: BLE001
            rows.append(dict(mesh=shape_text, error=f"{type(e).__name__}: {str(e)[:600]}",
                             trace=traceback.format_exc()[-2500:]))
            log(f"  FAILED {type(e).__name__}: {str(e)[:300]}")
        write()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    write()
    print(markdown(meta, rows))
    return 0


def markdown(meta, rows) -> str:
    lines = [f"Multi-device on {meta.get('device')} x {meta.get('devices')} (jax {meta.get('jax')}), Llama-3.1-8B "
             f"shapes, bf16, random weights, budget {meta['budget']} tokens per KV head.", "",
             "| mesh (data x model) | what | policy | batch | ms/step | tokens/s | cache GiB / device | seconds | "
             "equal / 16 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['mesh']} | {r.get('what', '')} | {r.get('policy', '')} | {r.get('batch', '')} | "
                         f"{r.get('error', r.get('skipped'))[:120]} | | | | |")
            continue
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else ""  # noqa: E731
        gib = f"{r['cache_bytes_per_device'] / 2**30:.2f}" if r.get("cache_bytes_per_device") else ""
        lines.append(f"| {r['mesh']} | {r['what']} | {r.get('policy', '')} | {r.get('batch', '')} | "
                     f"{f('ms_per_step', '{:.2f}')} | {f('tokens_per_s', '{:.0f}')} | {gib} | {f('seconds', '{:.3f}')} | "
                     f"{r.get('equal', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
