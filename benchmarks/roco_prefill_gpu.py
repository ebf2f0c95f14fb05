"""Where RoCo's chunked prefill spends its time on one GPU.

    python benchmarks/roco_prefill_gpu.py --out benchmarks/results [--chunks 32,64,128] [--tiny]
                                          [--parts prefix,steps,profile,whole] [--deadline-s 200]

The setting of benchmarks/policies_e2e.py: Llama-3.1-8B's shape with random bf16 weights in
per-layer buffers, 8 prompts of 15243-16384 tokens, `kvjax.policies.RoCo(budget=1024)` with its
defaults, the plan `kvjax.generate` makes for 128 new tokens. RoCo prefills each row's first K
tokens at once (the prefix), then streams the rest through the cache `chunk` tokens per step
(`kvjax.compress.chunked._encode`: a `lax.while_loop` of `kvjax.decode.extend_step`). Parts:

- prefix:  `kvjax.compress.chunked.encode` fed only each row's first K tokens (its while loop then
           has nothing to stream); its cache is the state the steps start from.
- steps:   `extend_step` alone in a jitted device loop (cache donated, every row a full chunk),
           with and without eviction (evict=False: the streams' lengths are reset after each step,
           so every step does the same work), for each chunk in --chunks (plan from
           `chunked.make_plan(..., chunk=c)`, the prefix cache moved into it by `kvjax.cache.relayout`):
           one call (n=1) and per step of an n=4 loop; compile seconds (--compile-workers at a
           time: they overlap); XLA's cost analysis; the prefill it predicts (prefix + steps x step).
- profile: one traced n=4 call of each step program: GPU kernel time by family and the top kernels
           per step (benchmarks/decode_tuning.py's summary).
- whole:   `kvjax.prefill(params, prompts, RoCo(1024), max_new_tokens=128)`, as `generate` times it:
           first call (compile + run) and the median of the next calls.

Writes roco_prefill_<device>.json (after every part: a killed run keeps what it measured), .md and
the traces (trace_c<chunk>_<evict|keep>/, json only unless --keep-xplane) into --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import json
import math
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

import decode_tuning as T  # noqa: E402  (the trace summary: _trace_events, summarize_trace)
from kernels_gpu import wall_ms  # noqa: E402  (median wall ms of timed calls)

LOOP_STEPS = 4  # extend steps per timed / traced loop call


@functools.partial(jax.jit, static_argnames=("config", "plan", "evict"), donate_argnums=(1,))
def chunk_steps(weights, cache, chunks, n, policy, *, config, plan, evict):
    """n (traced int) `extend_step` calls in a device loop, call i feeding chunks[i % N] ([N, B, C],
    every row a full chunk; only each row's last logits, as the prefill). Returns (cache, logits [B, V])."""
    from kvjax.decode import extend_step

    b, c = chunks.shape[1:]
    full = jnp.full((b,), c, jnp.int32)

    def body(i, carry):
        cache, _ = carry
        new, logits, _ = extend_step(weights, cache, chunks[i % chunks.shape[0]], full, policy, config=config,
                                     plan=plan, evict=evict, last_only=True)
        if not evict:  # the same work every step, and the streams never outgrow their slots
            new = dataclasses.replace(new, streams=cache.streams)
        return new, logits[:, 0]

    return jax.lax.fori_loop(0, n, body, (cache, jnp.zeros((b, config.vocab_size), jnp.float32)))


def _cost(compiled):
    """flops and bytes accessed from XLA's cost analysis (a dict, or a list of one in older jax)."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out = {k: float(ca[k]) for k in ("flops", "bytes accessed") if k in ca}
    except Exception as e:  # noqa: BLE001
        out = dict(error=f"{type(e).__name__}: {e}"[:200])
    try:
        out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out


def _compile_all(lowered: dict, workers: int, log):
    """name -> (compiled or exception, compile seconds); `workers` compile at once."""
    def one(item):
        name, low = item
        t0 = time.perf_counter()
        try:
            c = low.compile()
        except Exception as e:  # noqa: BLE001
            c = e
        s = time.perf_counter() - t0
        log(f"compiled {name} in {s:.1f}s" + (f": {type(c).__name__}: {str(c)[:300]}" if isinstance(c, Exception) else ""))
        return name, (c, s)

    with cf.ThreadPoolExecutor(max(1, workers)) as ex:
        return dict(ex.map(one, lowered.items()))


def markdown(res) -> str:
    m = res["meta"]
    lines = [f"# RoCo's chunked prefill, {m['device']} (jax {m['jax']})", "",
             f"{m['model']}, {m['prompts']} prompts of {min(m['lengths'])}-{max(m['lengths'])} tokens, "
             f"`RoCo(budget={m['budget']})` (defaults: chunk 32), plan for {m['new_tokens']} new tokens; "
             f"B={m['prompts']}, H={m['kv_heads']} KV heads, G={m['group']}, L={m['layers']}. Prefix = each "
             "row's first K tokens at once; then `extend_step` per chunk (a while loop). Steps timed in a "
             f"jitted loop of {LOOP_STEPS} (cache donated); compile seconds overlap "
             f"({m['compile_workers']} at a time). Made by `benchmarks/roco_prefill_gpu.py`.", ""]
    bw = m.get("read_bw")
    lines += [f"Weights read per step: {m['weight_read_bytes'] / 1e9:.2f} GB" + (
        f" = {m['weight_read_bytes'] / bw * 1e3:.2f} ms at the measured read bandwidth ({bw / 1e12:.2f} TB/s)."
        if bw else "."), ""]
    w = res.get("whole")
    if w:
        lines += ["## Whole prefill (`kvjax.prefill`)", "",
                  f"first call {w['first_s']:.2f} s, steady {w.get('steady_s', float('nan')):.2f} s "
                  f"(median of {len(w.get('steady_all', []))}), compile ~ {w.get('compile_s', float('nan')):.1f} s", ""]
    p = res.get("prefix")
    if p:
        lines += ["## Prefix (first K tokens at once)", "",
                  f"{p.get('steady_s', float('nan')) * 1e3:.1f} ms steady, compile {p.get('compile_s', float('nan')):.1f} s "
                  "(the program also holds the while loop's step, never run)", ""]
    steps = res.get("steps", [])
    if steps:
        lines += ["## One chunk step (`extend_step`)", "",
                  "| chunk | evict | ms / step (loop) | ms / call (n=1) | us / chunk token | steps for the prompt | "
                  "predicted prefill s | compile s | XLA GFLOP / step | XLA GB / step |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            if "error" in r:
                lines.append(f"| {r['chunk']} | {r['evict']} | error: {r['error'][:150]} | | | | | | | |")
                continue
            ca = r.get("cost", {})
            gf = ca["flops"] / 1e9 if "flops" in ca else None
            gb = ca["bytes accessed"] / 1e9 if "bytes accessed" in ca else None
            lines.append(f"| {r['chunk']} | {r['evict']} | {r['step_ms']:.2f} | {r['call_ms']:.2f} | "
                         f"{r['step_ms'] * 1e3 / r['chunk']:.0f} | {r['n_steps']} | "
                         f"{_shapes.fmt(r.get('predicted_prefill_s'), '{:.2f}')} | {r['compile_s']:.1f} | "
                         f"{_shapes.fmt(gf, '{:.0f}')} | {_shapes.fmt(gb, '{:.2f}')} |")
        lines += ["", "XLA GFLOP / GB: the compiled loop's static cost analysis, which counts the loop body "
                  "(one step) once; a relative measure (GB counts every op's operands, fused reads included).", ""]
        by = {(r["chunk"], r["evict"]): r for r in steps if "error" not in r}
        for c in sorted({k[0] for k in by}):
            if (c, True) in by and (c, False) in by:
                e, k = by[(c, True)]["step_ms"], by[(c, False)]["step_ms"]
                lines.append(f"- chunk {c}: eviction {e - k:.2f} ms of {e:.2f} ms per step ({(e - k) / e:.0%})")
        lines.append("")
    for pr in res.get("profile", []):
        lines += [f"## Profile: chunk {pr['chunk']}, evict={pr['evict']} (per step)", ""] + (
            [] if "families" in pr else [f"no kernel summary: {pr.get('error', '')} {pr.get('processes', '')}"[:300], ""])
        if "families" not in pr:
            continue
        lines += [f"GPU busy {pr['gpu_busy_us_per_step']:.0f} us, span {pr['gpu_span_us_per_step']:.0f} us, "
                  f"wall {pr['wall_ms_per_step'] * 1e3:.0f} us, {pr['kernels_per_step']:.0f} kernels per step", "",
                  "| family | us / step | launches / step |", "|---|---|---|"]
        lines += [f"| {k} | {v['us_per_step']:.0f} | {v['launches_per_step']:.0f} |" for k, v in pr["families"].items()]
        lines += ["", "| kernel | us / step | launches / step |", "|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['us_per_step']:.0f} | {k['launches_per_step']:.1f} |"
                  for k in pr["top_kernels"][:20]]
        lines.append("")
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"- {e[:300]}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def setup(args, log):
    """Weights, prompts, policy and plans as benchmarks/policies_e2e.py builds them; the run's meta."""
    import kvjax
    from kvjax import prompts as kp
    from kvjax.compress import chunked, make_plan as library_plan
    from kvjax.io.checkpoint import Params
    from kvjax.models import ModelConfig

    n_prompts = args.prompts or (2 if args.tiny else 8)
    length = args.length or (320 if args.tiny else 16384)
    budget = args.budget or (48 if args.tiny else 1024)
    cfg = ModelConfig.from_hf_dict(dict(_shapes.TINY if args.tiny else _shapes.LLAMA31_8B, eos_token_id=[]))
    weights = _shapes.random_weights(cfg, jnp.float32 if args.tiny else jnp.bfloat16, unstacked=True)
    rng = np.random.default_rng(0)  # the prompts of benchmarks/policies_e2e.py
    lengths = [length - max(1, length // 100) * i for i in range(n_prompts)]
    prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32).tolist() for n in lengths]
    policy = kvjax.policies.RoCo(budget=budget)
    bucket = kp.length_bucket(max(lengths), cfg.max_position_embeddings)
    headroom = kp.new_tokens_bucket(args.new)
    chunks = [int(c) for c in args.chunks.split(",")]
    plans = {c: chunked.make_plan(policy, cfg, bucket, headroom, chunk=c) for c in chunks}
    if 32 in plans:
        assert plans[32] == library_plan(policy, cfg, bucket, headroom), "the chunk-32 plan is not generate's"
    meta = _shapes.device_meta()
    meta.update(model="tiny" if args.tiny else "Llama-3.1-8B shapes (random bf16 weights, per-layer buffers)",
                prompts=n_prompts, lengths=lengths, budget=budget, new_tokens=args.new, bucket=bucket,
                stream_bound=plans[chunks[0]].stream_bound[0], kv_heads=cfg.num_kv_heads,
                group=cfg.num_heads // cfg.num_kv_heads, layers=cfg.num_layers, compile_workers=args.compile_workers,
                loop_steps=LOOP_STEPS, weight_read_bytes=_shapes.weight_read_bytes(weights),
                plans={c: dict(span=p.max_span, width=p.stream_width, headroom=p.headroom, pool=p.layout.pool_size)
                       for c, p in plans.items()})
    if not args.tiny:
        try:
            meta["read_bw"] = _shapes.read_bandwidth()
        except Exception as e:  # noqa: BLE001
            meta["read_bw_error"] = f"{type(e).__name__}: {e}"[:200]
    log(f"setup done; plans {meta['plans']}")
    return dict(cfg=cfg, weights=weights, params=Params(cfg, weights, tokenizer=None), lengths=lengths,
                prompts=prompts, policy=policy, chunks=chunks, plans=plans, meta=meta)


def measure(ctx, args, parts, res, write, log, elapsed, out):
    """The prefix, the chunk steps and their profiles (parts prefix / steps / profile)."""
    from kvjax.cache import relayout
    from kvjax.compress import chunked

    cfg, weights, policy, plans, chunks = ctx["cfg"], ctx["weights"], ctx["policy"], ctx["plans"], ctx["chunks"]
    lengths, prompts, c0 = ctx["lengths"], ctx["prompts"], ctx["chunks"][0]
    k, width0 = plans[c0].stream_bound[0], plans[c0].stream_width
    # inputs: each row's first K tokens (the prefix), and 8 chunks of the streamed part for the steps
    tok = np.stack([np.asarray(p[:k], np.int32) for p in prompts])
    n_pre = np.minimum(np.asarray(lengths, np.int32), k)
    key = jax.random.key(0)
    stream_tokens = {c: np.stack([np.asarray(p, np.int32)[k + np.arange(8 * c) % (min(lengths) - k)] for p in prompts])
                     .reshape(len(prompts), 8, c).swapaxes(0, 1) for c in chunks}
    enc = dict(config=cfg, plan=plans[c0], chunk=c0, prefix=None, with_nll=False)
    relay = jax.jit(lambda cache, held, plan, width: relayout(cache, plan, held, width),
                    static_argnames=("plan", "width"))

    # lower every program (serially: tracing holds the GIL), then compile them side by side
    lowered, t0 = {}, time.perf_counter()
    lowered["prefix"] = chunked.encode.lower(weights, tok, n_pre, policy, key, **enc)
    cache_abs = jax.eval_shape(functools.partial(chunked.encode, **enc), weights, tok, n_pre, policy, key)[0]
    held = cache_abs.streams.budget
    want_steps = bool(parts & {"steps", "profile"})
    for c in chunks if want_steps else []:
        ca = cache_abs
        if c != c0:
            lowered[f"relayout{c}"] = relay.lower(cache_abs, held, plan=plans[c], width=width0)
            ca = jax.eval_shape(lambda cch, hh, c=c: relayout(cch, plans[c], hh, width0), cache_abs, held)
        for ev in (True, False):
            try:
                lowered[f"steps{c}_{ev}"] = chunk_steps.lower(weights, ca, stream_tokens[c], jnp.int32(1), policy,
                                                              config=cfg, plan=plans[c], evict=ev)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"lowering chunk {c} evict={ev}: {type(e).__name__}: {e}")
    res["lower_s"] = time.perf_counter() - t0
    log(f"lowered {len(lowered)} programs in {res['lower_s']:.1f}s")
    compiled = _compile_all(lowered, args.compile_workers, log)
    write()

    prog, comp_s = compiled["prefix"]
    if isinstance(prog, Exception):
        return res["errors"].append(f"prefix compile: {prog}")
    run_prefix = lambda: prog(weights, tok, n_pre, policy, key)[0]  # noqa: E731
    cache0 = jax.block_until_ready(run_prefix())
    res["prefix"] = dict(compile_s=comp_s, steady_s=wall_ms(run_prefix, iters=args.reps, warmup=0) / 1e3, cost=_cost(prog),
                         stream_lengths=sorted({int(x) for x in np.unique(np.asarray(cache0.streams.length))})[:8],
                         next_pos=np.asarray(cache0.next_pos).tolist())
    log(f"prefix {json.dumps(res['prefix'])}")
    write()
    for c in chunks if want_steps else []:
        for ev in (True, False):
            if elapsed() > args.deadline_s:
                res["errors"].append(f"deadline: chunk {c} evict={ev} not run")
                continue
            row = dict(chunk=c, evict=ev, n_steps=max(math.ceil((max(lengths) - k) / c), 0))
            try:
                prog, comp_s = compiled.get(f"steps{c}_{ev}", (RuntimeError("not lowered"), 0.0))
                if isinstance(prog, Exception):
                    raise prog
                row.update(compile_s=comp_s, cost=_cost(prog))
                state = [jax.tree_util.tree_map(jnp.copy, cache0) if c == c0 else
                         compiled[f"relayout{c}"][0](cache0, cache0.streams.budget)]

                def call(n):
                    state[0], logits = prog(weights, state[0], stream_tokens[c], jnp.int32(n), policy)
                    return logits

                jax.block_until_ready(call(1))
                row["call_ms"] = wall_ms(call, 1, iters=args.reps + 2, warmup=0)
                row["step_ms"] = wall_ms(call, LOOP_STEPS, iters=args.reps, warmup=0) / LOOP_STEPS
                row["lengths_after"] = sorted({int(x) for x in np.unique(np.asarray(state[0].streams.length))})[:8]
                row["predicted_prefill_s"] = res["prefix"]["steady_s"] + row["n_steps"] * row["step_ms"] / 1e3
                if "profile" in parts:
                    res["profile"].append(profile(call, c, ev, row["step_ms"], out, args.keep_xplane, log))
                state.clear()
            except Exception as e:  # noqa: BLE001 (one program's failure is a row, not the end of the run)
                row["error"] = f"{type(e).__name__}: {e}"[:600]
                row["traceback"] = traceback.format_exc()[-1500:]
            res["steps"].append(row)
            log(json.dumps({k_: v for k_, v in row.items() if k_ != "traceback"}))
            write()


def profile(call, c, ev, step_ms, out, keep_xplane, log):
    """One traced call of LOOP_STEPS steps: decode_tuning's kernel summary, per step."""
    tdir = out / f"trace_c{c}_{'evict' if ev else 'keep'}"
    prof = dict(chunk=c, evict=ev, wall_ms_per_step=step_ms)
    try:
        with jax.profiler.trace(str(tdir), create_perfetto_trace=True):
            jax.block_until_ready(call(LOOP_STEPS))
        events, path = T._trace_events(tdir)
        prof["trace_file"] = None if path is None else str(path.relative_to(out))
        if events is not None:
            prof.update(T.summarize_trace(events, LOOP_STEPS))
        if not keep_xplane:  # the summary reads the json trace; the xplane is the bulk
            for f in tdir.rglob("*.xplane.pb"):
                f.unlink()
    except Exception as e:  # noqa: BLE001
        prof["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    log(json.dumps({k: v for k, v in prof.items() if k != "top_kernels"})[:1500])
    return prof


def whole(ctx, args, res, write, log, elapsed):
    """`kvjax.prefill` as `kvjax.generate` runs it: first call (compile + run), then steady calls."""
    import kvjax

    guess = 3.0 * sum(r["predicted_prefill_s"] for r in res["steps"][:1] if "predicted_prefill_s" in r) + 60.0
    if elapsed() + guess > args.deadline_s + 60.0 and not args.tiny:
        res["errors"].append(f"deadline: whole prefill not run (needs ~{guess:.0f}s)")
        return
    run = lambda: kvjax.prefill(ctx["params"], ctx["prompts"], ctx["policy"], max_new_tokens=args.new).logits  # noqa: E731
    try:
        jax.clear_caches()  # frees the step programs; the prefill compiles as in a fresh process
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        res["whole"] = w = dict(first_s=time.perf_counter() - t0)
        write()
        ts = []
        for _ in range(max(1, args.reps - 1)):
            if ts and elapsed() + ts[-1] > args.deadline_s + 60.0:
                break
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            ts.append(time.perf_counter() - t0)
        w.update(steady_all=ts, steady_s=statistics.median(ts), compile_s=w["first_s"] - statistics.median(ts))
        log(f"whole {json.dumps(w)}")
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"whole: {type(e).__name__}: {e}"[:600])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--prompts", type=int, default=None, help="default 8 (tiny: 2)")
    ap.add_argument("--length", type=int, default=None, help="default 16384 (tiny: 320)")
    ap.add_argument("--budget", type=int, default=None, help="default 1024 (tiny: 48)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--chunks", default="32,64,128", help="the first one's plan holds the prefix")
    ap.add_argument("--parts", default="prefix,steps,profile,whole")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile-workers", type=int, default=6)
    ap.add_argument("--deadline-s", type=float, default=200.0, help="start no new part after this (whole: unless it fits)")
    ap.add_argument("--keep-xplane", action="store_true", help="keep the traces' .xplane.pb (large)")
    ap.add_argument("--tiny", action="store_true", help="a miniature on CPU (checks the script)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start  # noqa: E731
    parts = {p.strip() for p in args.parts.split(",")}

    def log(msg):
        print(f"[{elapsed():6.1f}s] {msg}", flush=True)

    ctx = setup(args, log)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug()
    res = dict(meta=ctx["meta"], errors=[], steps=[], profile=[])

    def write():
        (out / f"roco_prefill_{slug}.json").write_text(json.dumps(res, indent=1, default=str))
        (out / f"roco_prefill_{slug}.md").write_text(markdown(res))

    write()
    if parts & {"prefix", "steps", "profile"}:
        measure(ctx, args, parts, res, write, log, elapsed, out)
    if "whole" in parts:
        whole(ctx, args, res, write, log, elapsed)
    res["total_s"] = elapsed()
    write()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
