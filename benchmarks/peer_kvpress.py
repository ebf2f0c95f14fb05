"""kvjax next to kvpress 0.5.5 (PyTorch) on the same GPU: decode latency, throughput, peak memory.

    python benchmarks/peer_kvpress.py [--ctx 32768] [--budgets 256,1024,4096] [--peer-path /tmp/peer]
                                      [--out benchmarks/results] [--tiny]

Same model shape (Llama-3.1-8B: transformers `LlamaForCausalLM` from the config with random bf16
weights for kvpress; `kvjax.models.Weights` with random bf16 weights for kvjax), one random prompt
of `--ctx` tokens (batch 1: kvpress does not batch), SnapKV and AdaKV(SnapKV) at the same budgets:
B tokens per KV head for kvjax, compression ratio r = (ctx - B - 0.25) / ctx for kvpress, so that
kvpress keeps int(ctx (1 - r)) = B tokens per head (window included in both).

kvpress: its pipeline's own procedure (`kvpress/pipeline.py`): under `with press(model)`,
`model.model(context_ids, past_key_values=DynamicCache())`, then greedy decoding one token per
`model(...)` call with explicit positions (the pipeline's loop, `.item()` per token included).
Timed with `torch.cuda.synchronize()`; peak memory is `torch.cuda.max_memory_allocated()`
(weights included) over prefill + decode, and over decode alone.

kvjax: `kvjax.compress.prefill` (jitted) then `kvjax.decode.decode_step` in a jitted `fori_loop` of
`--new` steps (pools donated); implementation "pallas" (and "xla", the library default, at B=1024);
at B=1024 also batch 32 (the prefilled cache repeated 32 times). Peak memory is the allocator's
`peak_bytes_in_use` with XLA_PYTHON_CLIENT_PREALLOCATE=false (weights included), one process per
press with budgets in increasing order (the peak can only grow, and grows with the budget).

Each engine runs in its own subprocess (torch and JAX do not share the GPU allocator); kvpress
runs with `--peer-path` first on PYTHONPATH (a private target dir holding kvpress 0.5.5 and
transformers 5.2, which kvpress requires). Writes peer_kvpress_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback
import types

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def ratio_for(ctx: int, budget: int) -> float:
    return (ctx - budget - 0.25) / ctx


# ---------------------------------------------------------------------------------------------
# kvpress (PyTorch)


def _import_kvpress():
    """`import kvpress`, with stubs for the modules only some presses import at top level."""
    sys.modules["datasets"] = types.ModuleType("datasets")
    sys.modules["datasets"].load_dataset = None
    for name in ("fire", "requests", "cachetools"):
        if importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            if name == "cachetools":
                mod.LRUCache = lambda *a, **k: None
                mod.cached = lambda *a, **k: (lambda f: f)
            sys.modules[name] = mod
    import kvpress

    return kvpress


def run_kvpress(args) -> dict:
    import torch
    import transformers

    kvpress = _import_kvpress()
    sys.path.insert(0, str(HERE))
    import _shapes

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = _shapes.hf_config_dict(args.tiny)
    cfg = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg)
    model.eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, kvpress=getattr(kvpress, "__version__", None),
                kvpress_file=kvpress.__file__, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                init_s=round(time.perf_counter() - t0, 1), attn_implementation=model.config._attn_implementation,
                weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    try:
        from importlib.metadata import version

        meta["kvpress"] = version("kvpress")
    except Exception:  # noqa: BLE001
        pass
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.ctx), generator=gen).to(dev)
    presses = {
        "SnapKV": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "AdaKV(SnapKV)": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
    }
    rows = []
    mem = (lambda: torch.cuda.max_memory_allocated()) if dev == "cuda" else (lambda: None)
    reset = torch.cuda.reset_peak_memory_stats if dev == "cuda" else (lambda: None)
    for pname, make in presses.items():
        for budget in args.budgets:
            r = ratio_for(args.ctx, budget)
            try:
                press = make(r)
                cache = transformers.DynamicCache()
                sync()
                reset()
                t0 = time.perf_counter()
                with torch.no_grad():
                    with press(model):
                        model.model(input_ids=ids, past_key_values=cache)
                    sync()
                    t_prefill = time.perf_counter() - t0
                    peak_prefill = mem()
                    kept = [cache.get_seq_length(i) for i in range(len(cache))]
                    reset()
                    position_ids = torch.tensor([[args.ctx]], device=dev)
                    tok = torch.zeros((1,), dtype=torch.long, device=dev)
                    times = []
                    for i in range(args.warmup + args.new):
                        sync()
                        t1 = time.perf_counter()
                        out = model(input_ids=tok.unsqueeze(0), past_key_values=cache, position_ids=position_ids + i)
                        new_id = out.logits[0, -1].argmax()
                        new_id.item()  # the pipeline's stop check syncs every token
                        sync()
                        times.append(time.perf_counter() - t1)
                        tok = new_id.reshape(1)
                    peak_decode = mem()
                step = statistics.median(times[args.warmup:])
                rows.append(dict(engine="kvpress", press=pname, budget=budget, ratio=r, ctx=args.ctx, batch=1,
                                 prefill_s=t_prefill, ms_per_token=step * 1e3, tokens_per_s=1 / step,
                                 mean_ms_per_token=1e3 * sum(times[args.warmup:]) / args.new,
                                 kept_per_head_layer0=kept[0] if kept else None,
                                 peak_bytes=max(peak_prefill or 0, peak_decode or 0) or None,
                                 peak_prefill_bytes=peak_prefill, peak_decode_bytes=peak_decode,
                                 ada_masks=pname.startswith("AdaKV")))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(engine="kvpress", press=pname, budget=budget, error=f"{type(e).__name__}: {e}"[:600],
                                 trace=traceback.format_exc()[-3000:]))
            finally:
                cache = out = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps({k: rows[-1].get(k) for k in ("engine", "press", "budget", "prefill_s", "ms_per_token",
                                                           "peak_bytes", "error")}), flush=True)
            if args.part_out:  # after every row: a timeout keeps what was measured
                pathlib.Path(args.part_out).write_text(json.dumps(dict(meta=meta, rows=rows), default=str))
    return dict(meta=meta, rows=rows)


# ---------------------------------------------------------------------------------------------
# kvjax (JAX)


def run_kvjax(args) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(HERE))
    import _shapes

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax import policies as P
    from kvjax import compress as engine
    from kvjax.decode import decode_step

    tiny = args.tiny
    cfg = _shapes.tiny_config() if tiny else _shapes.llama31_8b_config()
    window = 8 if tiny else 64
    if tiny:
        import kvjax.pallas_kernels.ragged_decode_attention as rda

        orig = rda.ragged_decode_attention_pallas
        rda.ragged_decode_attention_pallas = lambda *a, **k: orig(*a, **{**k, "interpret": True, "backend": "gpu"})
    dev = jax.devices()[0]
    peak = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use")
    # per-layer buffers on the GPU, as kvjax.load gives there (a stacked scan copies every layer per step)
    weights = _shapes.random_weights(cfg, jnp.float32 if tiny else jnp.bfloat16, unstacked=not tiny)
    meta = _shapes.device_meta()
    meta.update(weight_bytes=_shapes.weight_bytes(weights), preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                peak_after_weights=peak())
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, args.ctx)), jnp.int32)
    lengths = jnp.asarray([args.ctx], jnp.int32)
    n = args.new
    rows = []

    def make_policy(budget):
        snap = P.SnapKV(budget=budget, window=window)
        return P.AdaKV(snap) if args.kvjax_press.startswith("AdaKV") else snap

    def decode_program(pol, plan, impl):
        def run(weights, cache, tok):
            def body(i, carry):
                c, t = carry
                c, logits = decode_step(weights, c, t, pol, None, config=cfg, plan=plan, implementation=impl)
                return c, jnp.argmax(logits, -1).astype(jnp.int32)

            return jax.lax.fori_loop(0, n, body, (cache, tok))

        return jax.jit(run, donate_argnums=(1,))

    def time_decode(prog, cache, tok, reps):
        t0 = time.perf_counter()
        cache, tok = prog(weights, cache, tok)  # compiles, warms up
        jax.block_until_ready(tok)
        first = time.perf_counter() - t0
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            cache, tok = prog(weights, cache, tok)
            jax.block_until_ready(tok)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) / n, first

    for budget in sorted(args.kvjax_budgets):
        pol = make_policy(budget)
        plan = engine.make_plan(pol, cfg, args.ctx, n)
        try:
            pre = jax.jit(lambda w, t, l: engine.prefill(w, t, l, pol, jax.random.key(0), config=cfg, plan=plan))
            t0 = time.perf_counter()
            cache, logits = pre(weights, tokens, lengths)
            jax.block_until_ready(logits)
            first_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            del cache
            cache, logits = pre(weights, tokens, lengths)
            jax.block_until_ready((cache, logits))
            t_prefill = time.perf_counter() - t0
            peak_prefill = peak()
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            impls = ["pallas"] + (["xla"] if budget == args.main_budget and args.kvjax_xla else [])
            for impl in impls:
                # decode from a copy: the program donates (overwrites) its pools
                c1 = jax.tree_util.tree_map(lambda x: x.copy(), cache)
                step, first = time_decode(decode_program(pol, plan, impl), c1, tok, args.reps)
                del c1
                rows.append(dict(engine="kvjax", press=args.kvjax_press, budget=budget, ctx=args.ctx, batch=1,
                                 impl=impl, prefill_s=t_prefill, prefill_first_call_s=first_prefill,
                                 ms_per_token=step * 1e3, tokens_per_s=1 / step, decode_first_call_s=first,
                                 peak_bytes=peak(), peak_prefill_bytes=peak_prefill,
                                 cache_bytes=cache.nbytes, kept_tokens=int(jnp.sum(cache.streams.length))))
                print(json.dumps({k: rows[-1].get(k) for k in ("engine", "press", "budget", "impl", "prefill_s",
                                                               "ms_per_token", "peak_bytes")}), flush=True)
            if budget == args.main_budget and args.batch > 1:
                big = jax.tree_util.tree_map(lambda x: jnp.repeat(x, args.batch, axis=0), cache)
                toks = jnp.repeat(tok, args.batch)
                step, first = time_decode(decode_program(pol, plan, "pallas"), big, toks, args.reps)
                rows.append(dict(engine="kvjax", press=args.kvjax_press, budget=budget, ctx=args.ctx, batch=args.batch,
                                 impl="pallas", ms_per_token=step * 1e3, tokens_per_s=args.batch / step,
                                 note="the prefilled cache repeated; peak not comparable (batch > 1)"))
                del big
                print(json.dumps({k: rows[-1].get(k) for k in ("engine", "budget", "batch", "ms_per_token",
                                                               "tokens_per_s")}), flush=True)
            del cache
            if args.part_out:
                pathlib.Path(args.part_out).write_text(json.dumps(dict(meta=meta, rows=rows), default=str))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(engine="kvjax", press=args.kvjax_press, budget=budget, error=f"{type(e).__name__}: {e}"[:600],
                             trace=traceback.format_exc()[-3000:]))
            print(rows[-1]["error"], flush=True)
    return dict(meta=meta, rows=rows)


# ---------------------------------------------------------------------------------------------
# orchestration


def _sub(args, extra, env_extra, timeout):
    part = pathlib.Path(args.out) / f".peer_part_{extra[1].replace('(', '_').replace(')', '')}.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--part-out", str(part), "--ctx", str(args.ctx),
           "--budgets", ",".join(map(str, args.budgets)), "--new", str(args.new), "--reps", str(args.reps),
           "--batch", str(args.batch), "--main-budget", str(args.main_budget),
           "--kvjax-budgets", ",".join(map(str, args.kvjax_budgets))] + extra + (["--tiny"] if args.tiny else []) + (
               ["--kvjax-xla"] if args.kvjax_xla else [])
    env = dict(os.environ, **env_extra)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        log = (p.stdout + p.stderr)[-6000:]
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        log = f"timeout after {timeout}s\n" + ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-4000:]
        rc = 124
    print(f"--- {' '.join(extra)}: rc {rc} in {time.perf_counter() - t0:.0f}s\n{log}", flush=True)
    if part.exists():
        out = json.loads(part.read_text())
        part.unlink()
        return out, rc, log
    return dict(meta={}, rows=[dict(engine=extra[1], error=f"subprocess rc {rc}", log=log[-2000:])]), rc, log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--budgets", default=None)
    ap.add_argument("--main-budget", type=int, default=None, help="budget with extra kvjax rows (xla, batch)")
    ap.add_argument("--kvjax-budgets", default=None, help="budgets run with kvjax (default: --budgets)")
    ap.add_argument("--kvjax-xla", action="store_true", help="kvjax: also time the xla decode at the main budget")
    ap.add_argument("--new", type=int, default=32, help="decode tokens timed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="kvjax: timed calls of --new steps")
    ap.add_argument("--batch", type=int, default=32, help="kvjax: extra decode batch at the main budget")
    ap.add_argument("--peer-path", default="/tmp/peer", help="prepended to PYTHONPATH for kvpress")
    ap.add_argument("--engines", default="kvpress,kvjax")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per subprocess")
    ap.add_argument("--kvpress-timeout", type=int, default=None, help="seconds for the kvpress subprocess")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kvjax-press", default="SnapKV", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.ctx = args.ctx or (256 if args.tiny else 32768)
    args.budgets = [int(b) for b in (args.budgets or ("16,32,64" if args.tiny else "256,1024,4096")).split(",")]
    args.main_budget = args.main_budget or (32 if args.tiny else 1024)
    args.kvjax_budgets = [int(b) for b in args.kvjax_budgets.split(",")] if args.kvjax_budgets else args.budgets
    if args.tiny:
        args.new, args.batch = min(args.new, 4), min(args.batch, 4)
    if args.engine == "kvpress":
        res = run_kvpress(args)
        pathlib.Path(args.part_out).write_text(json.dumps(res, default=str))
        return 0
    if args.engine == "kvjax":
        res = run_kvjax(args)
        pathlib.Path(args.part_out).write_text(json.dumps(res, default=str))
        return 0

    t_start = time.perf_counter()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    parts, logs = {}, {}
    if "kvpress" in engines:
        pp = os.pathsep.join([p for p in (args.peer_path, os.environ.get("PYTHONPATH", "")) if p])
        parts["kvpress"], _, logs["kvpress"] = _sub(args, ["--engine", "kvpress"], {"PYTHONPATH": pp},
                                                    args.kvpress_timeout or args.timeout)
    if "kvjax" in engines:
        for press in ("AdaKV(SnapKV)", "SnapKV"):
            parts[press], _, logs[press] = _sub(args, ["--engine", "kvjax", "--kvjax-press", press],
                                                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, args.timeout)
    rows = [r for p in parts.values() for r in p["rows"]]
    meta = dict(ctx=args.ctx, budgets=args.budgets, new_tokens=args.new, wall_s=round(time.perf_counter() - t_start, 1),
                kvpress=parts.get("kvpress", {}).get("meta"), kvjax=(parts.get("SnapKV") or parts.get("AdaKV(SnapKV)") or {}).get("meta"),
                kvjax_adakv_meta=parts.get("AdaKV(SnapKV)", {}).get("meta"))
    slug = _slug(meta, args.tiny)
    (out_dir / f"peer_kvpress_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    md = markdown(meta, rows)
    (out_dir / f"peer_kvpress_{slug}.md").write_text(md)
    print(md)
    return 0


def _slug(meta, tiny):
    dev = ((meta.get("kvjax") or {}).get("device") or (meta.get("kvpress") or {}).get("device") or "cpu").lower()
    tag = next((t for t in ("h200", "h100", "a100", "l40s", "l4", "b200") if t in dev), "cpu" if "cpu" in dev else "gpu")
    return ("tiny_" if tiny else "") + tag


def markdown(meta, rows):
    gib = lambda x: "" if not x else f"{x / 2**30:.2f}"
    kp, kj = meta.get("kvpress") or {}, meta.get("kvjax") or {}
    lines = [f"kvjax vs kvpress on {kj.get('device') or kp.get('device')}: Llama-3.1-8B shapes, random bf16 weights, "
             f"one {meta['ctx']}-token prompt (batch 1 unless stated), {meta['new_tokens']} decode tokens. "
             f"kvpress {kp.get('kvpress')} (torch {kp.get('torch')}, transformers {kp.get('transformers')}, "
             f"{kp.get('attn_implementation')}); kvjax on jax {kj.get('jax')}. Budget: tokens per KV head "
             f"(kvpress: compression ratio (ctx - B - 0.25) / ctx). Peak: weights included (kvpress: "
             f"torch.cuda.max_memory_allocated over prefill + decode; kvjax: allocator peak_bytes_in_use, "
             f"no preallocation, budgets in increasing order in one process per press).", "",
             "| engine | press | budget | impl | batch | prefill s | ms/token | tokens/s | peak GiB | peak prefill GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r.get("press", ""), r.get("budget") or 0, r.get("engine", ""), r.get("batch") or 0)
    for r in sorted(rows, key=key):
        if "error" in r:
            lines.append(f"| {r.get('engine')} | {r.get('press', '')} | {r.get('budget', '')} | | | FAILED: "
                         f"{r['error'][:150]} | | | | |")
            continue
        ps = r.get("prefill_s")
        lines.append(f"| {r['engine']} | {r['press']} | {r['budget']} | {r.get('impl', 'torch')} | {r['batch']} | "
                     f"{'' if ps is None else f'{ps:.2f}'} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{gib(r.get('peak_bytes')) if r['batch'] == 1 else ''} | "
                     f"{gib(r.get('peak_prefill_bytes')) if r['batch'] == 1 else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
