"""Where a decode step's time goes, and which kernel settings to ship: one run on the GPU.

    python benchmarks/decode_tuning.py --out benchmarks/results [--tiny] [--parts sweep,profile,decode,prefill]

Parts (each writes its rows into decode_tuning_<device>.json; a markdown summary beside it):

- sweep:   `ragged_decode_attention` alone over a real Ada-KV plan's pool (uniform streams, 1024
           tokens per head, Llama-3.1-8B's 8 KV heads, GQA 4, head_dim 128), 32 calls per program
           (one per layer region, as in a decode step), for batch 1, 32 and 408: block_kv x
           num_splits, then num_warps x num_stages around the best. Per call: microseconds, and
           the fraction of the measured copy bandwidth its K/V bytes reach.
- profile: one traced call of the library's 16-step decode program (uniform, 1024/head) at batch
           1, 32 and 408; GPU kernel time summed by kernel family from the profiler's trace,
           beside the wall time, so the per-step cost that is neither weights nor K/V is named.
- decode:  the full decode step (library code, per-layer weights) with the library's kernel
           settings and with the sweep's best, at batch 1 / 32 / max, 256 and 1024 tokens/head.
- prefill: one layer's causal attention at 8K and 32K tokens: kvjax's chunked XLA attention
           against `jax.nn.dot_product_attention(implementation="cudnn")` (flash), time and the
           largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import functools
import gzip
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

import decode as D  # noqa: E402  (the decode benchmark's plans, cache states and timing)


def _compile(lowered):
    if isinstance(lowered, Exception):
        return lowered
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001
        return e


def _time(fn, *args, reps=5):
    out = jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


# ---------------------------------------------------------------------------------------------
# kernel sweep


def kernel_state(bench, batch, budget):
    """Pools, per-layer starts/lengths [L, B, H] of the uniform layout, and a query."""
    spec = D.Spec("ada", budget, batch, "pallas", "library")
    _, plan = bench.policy_plan("ada", budget, bench.min_ctx)
    job = D.Job(spec, "uniform", 32768)
    pools, meta, used, _ = D.fill_state(bench, job, batch, plan)
    start, length = meta[0], meta[1]  # [L, B, H]
    cfg = bench.config
    q = jax.random.normal(jax.random.key(3), (batch, cfg.num_kv_heads, cfg.group_size, cfg.head_dim),
                          jnp.float32).astype(pools[0].dtype)
    span = max(plan.layout.layer_span)
    return pools[0], pools[1], start, length, q, used, span


def kernel_program(settings, scale, interpret):
    from kvjax.pallas_kernels.ragged_decode_attention import ragged_decode_attention_pallas

    @jax.jit
    def run(q, k, v, start, length):
        num_layers = start.shape[0]

        def body(i, acc):
            l = i % num_layers
            out = ragged_decode_attention_pallas(q, k, v, start[l], length[l], sm_scale=scale,
                                                 interpret=interpret, **settings)
            return acc + out.astype(jnp.float32)

        return jax.lax.fori_loop(0, 4 * num_layers, body, jnp.zeros(q.shape, jnp.float32))

    return run


def sweep(bench, batches, budget, bw, log, interpret, deadline):
    from kvjax.pallas_kernels.ragged_decode_attention import default_num_splits

    cfg = bench.config
    rows = []
    for batch in batches:
        k, v, start, length, q, used, span = kernel_state(bench, batch, budget)
        lib_splits = default_num_splits(batch, cfg.num_kv_heads, span, 64)
        kv_bytes = 2 * cfg.head_dim * k.dtype.itemsize * used / cfg.num_layers  # per call (one layer)
        grid = [dict(block_kv=bk, num_splits=ns) for bk in (32, 64, 128) for ns in (1, 2, 4, 8, 16)
                if ns * bk <= 2 * budget]
        if bench.tiny:
            grid = grid[:3]
        grid.append(dict(block_kv=64, num_splits=lib_splits, library=True))

        def measure_all(settings_list):
            lowered = []
            for settings in settings_list:
                kw = {k_: v_ for k_, v_ in settings.items() if k_ != "library"}
                try:
                    lowered.append((settings, kernel_program(kw, cfg.attention_scale, interpret).lower(q, k, v, start, length)))
                except Exception as e:  # noqa: BLE001
                    lowered.append((settings, e))
            with cf.ThreadPoolExecutor(8) as ex:
                compiled = list(ex.map(lambda it: (it[0], _compile(it[1])), lowered))
            out = []
            for settings, c in compiled:
                if isinstance(c, Exception) or time.perf_counter() > deadline:
                    err = "deadline" if not isinstance(c, Exception) else f"{type(c).__name__}: {str(c)[:300]}"
                    out.append(dict(settings, batch=batch, error=err))
                    continue
                sec, _ = _time(c, q, k, v, start, length, reps=3)
                per_call = sec / (4 * cfg.num_layers)
                row = dict(settings, batch=batch, budget=budget, us_per_call=per_call * 1e6, kv_bytes=kv_bytes,
                           bw_fraction=None if not bw else kv_bytes / bw / per_call)
                log(json.dumps(row))
                out.append(row)
            return out

        first = measure_all(grid)
        rows += first
        ok = [r for r in first if "error" not in r and not r.get("library")]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us_per_call"])
        more = [dict(block_kv=best["block_kv"], num_splits=best["num_splits"], num_warps=nw, num_stages=st)
                for nw in (4, 8) for st in (2, 3, 4) if not bench.tiny or (nw, st) == (4, 2)]
        rows += measure_all(more)
    return rows


# ---------------------------------------------------------------------------------------------
# profile of the library decode program


def _trace_events(trace_dir: pathlib.Path):
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        return None, None
    data = json.loads(gzip.decompress(files[-1].read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return events, files[-1]


def _family(name: str) -> str:
    n = name.lower()
    for key, fam in (("ragged_decode", "attention kernel (pallas)"), ("gemm", "gemm"), ("cutlass", "gemm"),
                     ("sm90", "gemm"), ("cublas", "gemm"), ("nvjet", "gemm"), ("scatter", "scatter"),
                     ("dynamic_update", "dynamic-update-slice"), ("memcpy", "memcpy"), ("memset", "memset"),
                     ("reduce", "reduction fusion"), ("input_", "fusion"), ("loop_", "fusion"),
                     ("fusion", "fusion"), ("copy", "copy")):
        if key in n:
            return fam
    return "other"


def summarize_trace(events, steps: int):
    """GPU kernel time per family and per name (per decode step), and the GPU busy/span time."""
    pname = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {p for p, n in pname.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    kern = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
    if not kern:
        return dict(error="no GPU events", processes=sorted(set(pname.values()))[:20])
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kern:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    fam = collections.defaultdict(lambda: [0.0, 0])
    for n, (d, c) in by_name.items():
        fam[_family(n)][0] += d
        fam[_family(n)][1] += c
    ivs = sorted((e["ts"], e["ts"] + e["dur"]) for e in kern)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in ivs:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = ivs[-1][1] - ivs[0][0]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(
        gpu_span_us_per_step=span / steps, gpu_busy_us_per_step=busy / steps, kernels_per_step=len(kern) / steps,
        families={k: dict(us_per_step=v[0] / steps, launches_per_step=v[1] / steps) for k, v in
                  sorted(fam.items(), key=lambda kv: -kv[1][0])},
        top_kernels=[dict(name=n[:160], us_per_step=d / steps, launches_per_step=c / steps) for n, (d, c) in top],
        processes=sorted(set(pname.values()))[:20],
    )


def profile(bench, cases, budget, out_dir, log):
    """cases: (layout, batch) pairs (layouts of benchmarks/decode.py: uni, h2o, h2o_keep, cake_cascade, ...)."""
    rows = []
    for layout, batch in cases:
        spec = D.Spec(layout, budget, batch, "pallas", "library")
        jitted, _, plan = bench.runner(spec)
        job = D.Job(spec, "uniform" if layout == "uni" else layout, 32768)
        pools, meta, _, _ = D.fill_state(bench, job, batch, plan)
        tok = jnp.zeros((batch,), jnp.int32)
        pools, tok = jax.block_until_ready(jitted(bench.weights, pools, meta, tok))
        t0 = time.perf_counter()
        pools, tok = jax.block_until_ready(jitted(bench.weights, pools, meta, tok))
        wall = time.perf_counter() - t0
        tdir = out_dir / f"trace_{layout}_b{batch}"
        row = dict(layout=layout, batch=batch, budget=budget, wall_ms_per_step=wall / bench.n_steps * 1e3)
        try:
            with jax.profiler.trace(str(tdir), create_perfetto_trace=True):
                pools, tok = jax.block_until_ready(jitted(bench.weights, pools, meta, tok))
            events, path = _trace_events(tdir)
            row["trace_file"] = None if path is None else str(path.relative_to(out_dir))
            if events is not None:
                row.update(summarize_trace(events, bench.n_steps))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            row["traceback"] = traceback.format_exc()[-1500:]
        del pools
        log(json.dumps({k: v for k, v in row.items() if k not in ("top_kernels",)})[:3000])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# full decode with chosen kernel settings


def with_kernel_settings(settings):
    """A context that makes kvjax.decode's attention call use fixed kernel settings."""
    import contextlib

    import kvjax.decode as dec

    original = dec.decode_attention

    @contextlib.contextmanager
    def ctx():
        def patched(q, k_r, v_r, rel_start, length, pos_r, min_pos, *, scale, implementation="xla",
                    need_probs=False, region_slots=None):
            if implementation != "pallas" or need_probs:
                return original(q, k_r, v_r, rel_start, length, pos_r, min_pos, scale=scale,
                                implementation=implementation, need_probs=need_probs, region_slots=region_slots)
            from kvjax.pallas_kernels.ragged_decode_attention import ragged_decode_attention_pallas

            out = ragged_decode_attention_pallas(q, k_r, v_r, rel_start, length, sm_scale=scale, **settings)
            return out.astype(jnp.float32), None

        dec.decode_attention = patched
        try:
            yield
        finally:
            dec.decode_attention = original

    return ctx()


def decode_rows(bench, cases, best_by_batch, bw, log, deadline):
    jobs = []
    for budget, batch in cases:
        spec = D.Spec("uni", budget, batch, "pallas", "library")
        plan = bench.policy_plan("uni", budget, bench.min_ctx)[1]
        variants = [("library", None)]
        if best_by_batch.get(batch):
            variants.append(("tuned", best_by_batch[batch]))
        for name, settings in variants:
            try:
                if settings is None:
                    lowered = bench.lower(spec)
                else:
                    with with_kernel_settings(settings):
                        lowered = bench.lower(spec)
            except Exception as e:  # noqa: BLE001
                lowered = e
            jobs.append((budget, batch, spec, plan, name, settings, lowered))
    with cf.ThreadPoolExecutor(8) as ex:
        compiled = list(ex.map(lambda j: _compile(j[-1]), jobs))
    rows = []
    for (budget, batch, spec, plan, name, settings, _), c in zip(jobs, compiled):
        try:
            if isinstance(c, Exception):
                raise c
            if time.perf_counter() > deadline:
                raise TimeoutError("deadline")
            row = D.time_job(bench, D.Job(spec, "uniform", 32768), c, batch, plan, bw)
            row.update(kernel=name, settings=settings)
        except Exception as e:  # noqa: BLE001
            row = dict(budget=budget, batch=batch, kernel=name, settings=settings,
                       error=f"{type(e).__name__}: {str(e)[:400]}")
        log(json.dumps({k: row.get(k) for k in ("budget", "batch", "kernel", "settings", "ms_per_step",
                                                 "bw_fraction", "error")}))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# prefill attention: chunked XLA vs cuDNN flash


def prefill_attention(config, lengths, log, tiny):
    from kvjax.models.prompt_attention import causal_attention

    rows = []
    kv, g, d = config.num_kv_heads, config.group_size, config.head_dim
    for t in lengths:
        key = jax.random.key(t)
        q = jax.random.normal(key, (1, kv, g, t, d), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, kv, t, d), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, kv, t, d), jnp.bfloat16)
        lens = jnp.array([t], jnp.int32)
        scale = config.attention_scale
        chunked = jax.jit(lambda q, k, v: causal_attention(q, k, v, lens, scale=scale))

        def flash(q, k, v, impl):
            qf = q.reshape(1, kv * g, t, d).transpose(0, 2, 1, 3)
            out = jax.nn.dot_product_attention(qf, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=scale,
                                               is_causal=True, implementation=impl)
            return out.transpose(0, 2, 1, 3).reshape(1, kv, g, t, d)

        row = dict(tokens=t)
        try:
            sec, ref = _time(chunked, q, k, v, reps=3)
            row["chunked_xla_ms"] = sec * 1e3
        except Exception as e:  # noqa: BLE001
            row["chunked_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            ref = None
        for impl in ("cudnn",) if not tiny else ("xla",):
            try:
                sec, out = _time(jax.jit(functools.partial(flash, impl=impl)), q, k, v, reps=3)
                row[f"{impl}_ms"] = sec * 1e3
                if ref is not None:
                    row[f"{impl}_max_abs_diff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            except Exception as e:  # noqa: BLE001
                row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(json.dumps(row))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------


def markdown(meta, res) -> str:
    lines = [f"# Decode tuning on {meta.get('device')} (jax {meta.get('jax')})", ""]
    if meta.get("copy_bandwidth_GBps"):
        lines.append(f"Copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s.")
        lines.append("")
    sw = [r for r in res.get("sweep", []) if "error" not in r]
    if sw:
        lines += ["## Kernel alone (one layer's call, uniform 1024 tokens/head)", "",
                  "| batch | block_kv | splits | warps | stages | us/call | % BW |", "|---|---|---|---|---|---|---|"]
        for b in sorted({r["batch"] for r in sw}):
            rs = sorted((r for r in sw if r["batch"] == b), key=lambda r: r["us_per_call"])
            lib = [r for r in rs if r.get("library")]
            for r in rs[:6] + [x for x in lib if x not in rs[:6]]:
                lines.append(f"| {b} | {r['block_kv']} | {r['num_splits']} | {r.get('num_warps', '')} | "
                             f"{r.get('num_stages', '')} | {r['us_per_call']:.1f}{' (library)' if r.get('library') else ''}"
                             f" | {100 * (r.get('bw_fraction') or 0):.0f}% |")
        lines.append("")
    pr = res.get("profile", [])
    if pr:
        lines += ["## Profile of the library decode step (1024/head)", ""]
        for r in pr:
            lines.append(f"- {r.get('layout', 'uni')}, batch {r['batch']}: wall {r['wall_ms_per_step']:.2f} ms/step; GPU span "
                         f"{(r.get('gpu_span_us_per_step') or 0) / 1e3:.2f} ms, busy {(r.get('gpu_busy_us_per_step') or 0) / 1e3:.2f} ms, "
                         f"{r.get('kernels_per_step', 0):.0f} kernels/step")
            for f, v in (r.get("families") or {}).items():
                lines.append(f"  - {f}: {v['us_per_step'] / 1e3:.3f} ms, {v['launches_per_step']:.0f} launches")
            for k in (r.get("top_kernels") or [])[:12]:
                lines.append(f"    - `{k['name'][:90]}`: {k['us_per_step']:.0f} us, {k['launches_per_step']:.0f} launches")
        lines.append("")
    dr = [r for r in res.get("decode", []) if "error" not in r]
    if dr:
        lines += ["## Full decode step", "", "| budget | batch | kernel | settings | ms/step | % BW |", "|---|---|---|---|---|---|"]
        for r in dr:
            lines.append(f"| {r['budget']} | {r['batch']} | {r['kernel']} | {r.get('settings') or 'library'} | "
                         f"{r['ms_per_step']:.2f} | {100 * (r.get('bw_fraction') or 0):.0f}% |")
        lines.append("")
    pf = res.get("prefill", [])
    if pf:
        lines += ["## Prefill attention, one layer", "", "```", *[json.dumps(r) for r in pf], "```", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--parts", default="sweep,profile,decode,prefill")
    ap.add_argument("--tag", default="")
    ap.add_argument("--profile", default=None, help="layout:batch pairs to profile (default uni at 1, 32, 408)")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="stop timing new rows after this")
    ap.add_argument("--weights", default="packed", choices=("packed", "unstacked"),
                    help="packed: q|k|v and gate|up packed, as kvjax.load leaves them on GPU")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = t_start + args.deadline_s

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    meta = _shapes.device_meta()
    if args.tiny:
        cfg = _shapes.tiny_config()
        D.states.WINDOW = 8
        budget, batches, steps = 32, (1, 4), 2
        bw = None
        import kvjax.pallas_kernels.ragged_decode_attention as rda

        D.force_interpret(rda)
    else:
        cfg = _shapes.llama31_8b_config()
        budget, batches, steps = 1024, (1, 32, 408), 16
        bw = _shapes.copy_bandwidth()
        meta["copy_bandwidth_GBps"] = bw / 1e9
    meta["weights_layout"] = args.weights
    log(f"device {meta['device']} jax {meta['jax']} bw {meta.get('copy_bandwidth_GBps')}")
    weights = _shapes.random_weights(cfg, jnp.bfloat16 if not args.tiny else jnp.float32, unstacked=True,
                                     packed=args.weights == "packed")
    bench = D.Bench(cfg, weights, steps, 4 if not args.tiny else 1, 8192 if not args.tiny else 128, args.tiny)
    res = {}
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug()

    def write():
        (out_dir / f"decode_tuning_{slug}{args.tag}.json").write_text(json.dumps(dict(meta=meta, **res), indent=1, default=str))
        (out_dir / f"decode_tuning_{slug}{args.tag}.md").write_text(markdown(meta, res))

    interpret = bool(args.tiny)
    best = {}
    if "sweep" in parts:
        res["sweep"] = sweep(bench, batches, budget, bw, log, interpret, deadline)
        write()
        for b in batches:
            ok = [r for r in res["sweep"] if r.get("batch") == b and "error" not in r and not r.get("library")]
            if ok:
                r = min(ok, key=lambda r: r["us_per_call"])
                best[b] = {k: r[k] for k in ("block_kv", "num_splits", "num_warps", "num_stages") if r.get(k) is not None}
        res["best"] = {str(k): v for k, v in best.items()}
    if "profile" in parts and not args.tiny:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.profile.split(",")] if args.profile else \
            [("uni", b) for b in batches]
        res["profile"] = profile(bench, cases, budget, out_dir, log)
        write()
    if "decode" in parts:
        cases = [(budget, b) for b in batches] + ([(256, 32)] if not args.tiny else [])
        if interpret:
            best = {b: dict(s, interpret=True) for b, s in best.items()}
        res["decode"] = decode_rows(bench, cases, best, bw, log, deadline)
        write()
    if "prefill" in parts:
        res["prefill"] = prefill_attention(cfg, (256, 251) if args.tiny else (8192, 30001, 32768), log, args.tiny)
        write()
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
