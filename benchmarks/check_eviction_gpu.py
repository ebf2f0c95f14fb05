"""On a GPU: decode-time eviction through the Pallas kernel (the GPU default) keeps the same tokens
as the XLA path, and so does RoCo's chunked prefill through the chunk-attention kernel.

    python benchmarks/check_eviction_gpu.py [--out benchmarks/results] [--steps 64] [--tiny]

Three parts, written to check_eviction_<device>.json and .md (`--parts` runs some of them; the
others stay as that file in --out had them, with their run's meta):

1. Kernel level, one fixed cache state at Llama-3.1-8B's attention shape (8 sequences, 8 KV heads,
   GQA 4, head_dim 128, ragged streams of up to 1,100 slots, a new token appended): the output,
   log-sum-exp and group-reduced probabilities (`stream_logits` + `kvjax.decode_attention.
   stream_probs`) of the Triton kernel against the XLA path, in bf16 and f32.
2. Model level: Llama-3.1-8B's shape with `--layers` layers and random weights; a batch of prompts
   of different lengths is prefilled once, then decoded `--steps` greedy steps twice from the same
   cache, implementation "xla" and "pallas", feeding the XLA path's tokens to both, for H2O, TOVA,
   CAKE and RoCo. Reported: the share of streams whose kept positions are equal after the last
   step, the steps whose argmax agrees, the largest logit difference. In float32 (matmuls at
   "highest" precision on both paths, so neither runs TF32) a correct kernel keeps the same tokens:
   the criterion is >= 99% of streams and of steps. In bf16 the two paths round differently and
   random-weight attention is nearly flat, so near-ties flip evictions: reported, not a criterion.
3. Prompt-time eviction: RoCo's chunked prefill of the same prompts (budget 128, chunk 32) through
   the chunk-attention kernel and through the XLA path: kept positions per stream, last logits.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def kernel_level(tiny: bool) -> list[dict]:
    from kvjax.decode_attention import stream_probs
    from kvjax.pallas_kernels import ragged_decode_attention as rda

    b, h, g, d, longest = (2, 2, 4, 32, 100) if tiny else (8, 8, 4, 128, 1100)
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, longest, (b, h)).astype(np.int32)
    caps = lengths + 1
    start = (np.cumsum(caps, 1) - caps).astype(np.int32) + 3
    p = int((start + caps).max())
    width = int(caps.max())
    slot = jnp.asarray(start + lengths)
    extra = dict(interpret=True, backend="gpu") if tiny else {}
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        mk = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32)).astype(dtype)  # noqa: E731
        q, k, v, kn, vn = mk(b, h, g, d), mk(b, p, d), mk(b, p, d), mk(b, h, d), mk(b, h, d)
        kw = dict(sm_scale=d ** -0.5, append=(kn, vn, slot), return_lse=True, stream_logits=width)
        ref = rda.ragged_decode_attention(q, jnp.copy(k), jnp.copy(v), jnp.asarray(start), jnp.asarray(lengths), **kw)
        got = rda.ragged_decode_attention(q, jnp.copy(k), jnp.copy(v), jnp.asarray(start), jnp.asarray(lengths),
                                          implementation="pallas", **kw, **extra)
        n = jnp.asarray(lengths + 1)
        row = dict(dtype=jnp.dtype(dtype).name, streams=b * h, longest=longest,
                   out_max_diff=float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - ref[0].astype(jnp.float32)))),
                   pools_equal=bool(jnp.array_equal(got[1], ref[1]) and jnp.array_equal(got[2], ref[2])),
                   lse_max_diff=float(jnp.max(jnp.abs(got[3] - ref[3]))))
        for reduce in ("mean", "max"):
            pr, pg = np.asarray(stream_probs(ref[3], ref[4], n, reduce)), np.asarray(stream_probs(got[3], got[4], n, reduce))
            row[f"probs_{reduce}_max_diff"] = float(np.abs(pg - pr).max())
            row[f"probs_{reduce}_max_rel"] = float((np.abs(pg - pr) / np.maximum(pr, 1e-30)).max())
            # the slot each stream would evict by these probabilities (H2O-like, no running sums)
            key = np.where(np.arange(width) < np.asarray(n)[..., None], pg, np.inf)
            key_ref = np.where(np.arange(width) < np.asarray(n)[..., None], pr, np.inf)
            row[f"argmin_{reduce}_equal"] = float((key.argmin(-1) == key_ref.argmin(-1)).mean())
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        row["ok"] = bool(row["pools_equal"] and row["probs_mean_max_rel"] < tol and row["probs_max_max_rel"] < tol)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def small_model(args, dtype):
    """(params, prompts): `--layers` layers of Llama-3.1-8B's shape (a 4096-token vocabulary and MLP),
    random weights, four prompts of different lengths."""
    from kvjax.io.checkpoint import Params
    from kvjax.models import ModelConfig

    base = dict(_shapes.TINY if args.tiny else _shapes.LLAMA31_8B)
    base.update(num_hidden_layers=args.layers, vocab_size=4096 if not args.tiny else base["vocab_size"],
                intermediate_size=4096 if not args.tiny else base["intermediate_size"])
    cfg = ModelConfig.from_hf_dict(base)
    params = Params(cfg, _shapes.random_weights(cfg, dtype, unstacked=not args.tiny), tokenizer=None)
    rng = np.random.default_rng(0)
    lengths = (300, 180, 250, 120) if args.tiny else (1500, 900, 1300, 700)
    prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    return params, prompts


def model_level(args, dtype) -> list[dict]:
    import kvjax
    from kvjax import policies as P
    from kvjax.decode import decode_step

    params, prompts = small_model(args, dtype)
    cfg = params.config
    budget, window = (32, 8) if args.tiny else (128, 32)
    policies = {"H2O": P.H2O(budget=budget, recent=window), "TOVA": P.TOVA(budget=budget),
                "CAKE": P.CAKE(budget=budget, window=window), "RoCo": P.RoCo(budget=budget, chunk=64)}
    rows = []
    for name, pol in policies.items():
        pre = kvjax.prefill(params, prompts, pol, max_new_tokens=args.steps, implementation="xla")
        steps = {impl: jax.jit(lambda w, c, t, impl=impl: decode_step(w, c, t, pol, None, config=cfg, plan=pre.plan,
                                                                     implementation=impl)) for impl in ("xla", "pallas")}
        caches = {impl: jax.tree_util.tree_map(jnp.copy, pre.cache) for impl in steps}
        tok = jnp.argmax(pre.logits, -1).astype(jnp.int32)
        agree, worst = 0, 0.0
        for _ in range(args.steps):
            out = {}
            for impl in steps:
                caches[impl], out[impl] = steps[impl](params.weights, caches[impl], tok)
            a, b = np.asarray(out["xla"], np.float32), np.asarray(out["pallas"], np.float32)
            worst = max(worst, float(np.abs(a - b).max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).all())
            tok = jnp.asarray(a.argmax(-1), jnp.int32)
        kx, kp = kvjax.kept_positions(caches["xla"]), kvjax.kept_positions(caches["pallas"])
        same = [np.array_equal(x, y) for lx, lp in zip(kx, kp) for bx, bp in zip(lx, lp) for x, y in zip(bx, bp)]
        rows.append(dict(dtype=jnp.dtype(dtype).name, policy=name, streams=len(same), streams_equal=float(np.mean(same)),
                         steps=args.steps, steps_same_argmax=agree / args.steps, max_logit_diff=worst,
                         ok=bool(np.mean(same) >= 0.99 and agree / args.steps >= 0.99)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prefill_level(args, dtype) -> list[dict]:
    """RoCo's chunked prefill (prompt-time eviction) through the chunk-attention kernel ("pallas")
    and the XLA path, the same model and prompts as `model_level`: kept positions and last logits."""
    import kvjax
    from kvjax import policies as P

    params, prompts = small_model(args, dtype)
    pol = P.RoCo(budget=32 if args.tiny else 128, chunk=16 if args.tiny else 32)
    pre = {impl: kvjax.prefill(params, prompts, pol, max_new_tokens=8, implementation=impl)
           for impl in ("xla", "pallas")}
    kx, kp = (kvjax.kept_positions(pre[i].cache) for i in ("xla", "pallas"))
    same = [np.array_equal(np.sort(x), np.sort(y)) for lx, lp in zip(kx, kp) for bx, bp in zip(lx, lp)
            for x, y in zip(bx, bp)]
    a, b = (np.asarray(pre[i].logits, np.float32) for i in ("xla", "pallas"))
    row = dict(dtype=jnp.dtype(dtype).name, policy=f"RoCo (chunk {pol.chunk})", streams=len(same),
               streams_equal=float(np.mean(same)), same_argmax=float((a.argmax(-1) == b.argmax(-1)).mean()),
               max_logit_diff=float(np.abs(a - b).max()), ok=bool(np.mean(same) >= 0.99))
    print(json.dumps(row), flush=True)
    return [row]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--parts", default="kernel,model,prefill", help="which of the three parts to run")
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script (interpret mode)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.tiny:
        import kvjax.pallas_kernels.ragged_decode_attention as rda

        ra = rda.ragged_decode_attention_pallas
        rda.ragged_decode_attention_pallas = lambda *a, **k: ra(*a, **{**k, "interpret": True, "backend": "gpu"})
    kernel = kernel_level(args.tiny) if "kernel" in parts else []
    prefill, model = [], []
    for dtype in (jnp.float32, jnp.bfloat16):
        with jax.default_matmul_precision("highest" if dtype == jnp.float32 else None):
            prefill += prefill_level(args, dtype) if "prefill" in parts else []
            model += model_level(args, dtype) if "model" in parts else []
    meta = _shapes.device_meta()
    meta.update(layers=args.layers, steps=args.steps)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug()
    result = dict(meta=meta, kernel=kernel, model=model, prefill=prefill, part_meta={p: meta for p in parts})
    path = out / f"check_eviction_{slug}.json"
    if path.exists():  # the parts not run this time stay as the file had them, with their run's meta
        old = json.loads(path.read_text())
        for p in {"kernel", "model", "prefill"} - parts:
            result[p] = old.get(p, [])
            result["part_meta"][p] = old.get("part_meta", {}).get(p, old.get("meta"))
    kernel, model, prefill = result["kernel"], result["model"], result["prefill"]
    path.write_text(json.dumps(result, indent=1))
    md = [f"# Decode-time eviction: Pallas (the GPU default) vs XLA on {meta['device']} (jax {meta['jax']})", "",
          "Made by `benchmarks/check_eviction_gpu.py`; nothing here is edited by hand. Each part's run: "
          + "; ".join(f"{p}: jax {m['jax']} on {m['device']}" for p, m in sorted(result["part_meta"].items()) if m)
          + ".", "",
          "## Kernel level: one fixed cache state (8 sequences x 8 KV heads, GQA 4, head_dim 128, new token appended)",
          "", "| dtype | out max diff | pools equal | lse max diff | probs (mean) max rel. diff | probs (max) max rel. "
          "diff | same argmin (mean / max) | ok |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['out_max_diff']:.2g} | {r['pools_equal']} | {r['lse_max_diff']:.2g} | "
           f"{r['probs_mean_max_rel']:.2g} | {r['probs_max_max_rel']:.2g} | {100 * r['argmin_mean_equal']:.0f}% / "
           f"{100 * r['argmin_max_equal']:.0f}% | {r['ok']} |" for r in kernel]
    md += ["", f"## Model level: {args.layers} layers of Llama-3.1-8B's shape, random weights, {args.steps} greedy "
           "steps from one prefilled cache, prompts of 1500/900/1300/700 tokens, budget 128", "",
           "float32 runs with matmuls at 'highest' precision on both paths (criterion: >= 99% of streams and steps); "
           "bfloat16 rows are reported only (near-ties on nearly flat random-weight attention flip evictions).", "",
           "| dtype | policy | streams with equal kept positions | steps with the same argmax | largest logit difference | ok |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['policy']} | {100 * r['streams_equal']:.1f}% of {r['streams']} | "
           f"{100 * r['steps_same_argmax']:.0f}% | {r['max_logit_diff']:.3g} | "
           f"{r['ok'] if r['dtype'] == 'float32' else '(reported)'} |" for r in model]
    md += ["", "## Prompt-time eviction: RoCo's chunked prefill, the chunk-attention kernel vs XLA (the model "
           "and prompts above)", "", "Kept positions of every (layer, sequence, KV head) stream after the prefill and "
           "the last prompt token's logits; float32 criterion >= 99% of streams; bfloat16 reported only.", "",
           "| dtype | policy | streams with equal kept positions | same argmax | largest logit difference | ok |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['policy']} | {100 * r['streams_equal']:.1f}% of {r['streams']} | "
           f"{100 * r['same_argmax']:.0f}% | {r['max_logit_diff']:.3g} | "
           f"{r['ok'] if r['dtype'] == 'float32' else '(reported)'} |" for r in prefill]
    (out / f"check_eviction_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
