"""On a GPU: decode-time eviction through the Pallas kernels (the attention kernel with its
log-sum-exp, then the stream-probabilities kernel) keeps the same tokens as the XLA path.

    python benchmarks/check_stream_probs_gpu.py [--out benchmarks/results] [--steps 64]

For H2O, TOVA, CAKE and RoCo on a Llama-shaped model with random bf16 weights (8 KV heads, head_dim
128, GQA 4, a few layers), a batch of prompts of different lengths is prefilled once, then decoded
`--steps` greedy steps twice from the same cache, with implementation="xla" and "pallas", feeding
the XLA path's tokens to both so the caches see the same inputs. Reported per policy: the share of
streams whose kept positions are equal after the last step, the tokens each path would have chosen
(agreement per step), and the largest logit difference. bf16 near-ties may flip an eviction; the
criterion is kept positions equal for >= 99% of streams and the same argmax on >= 99% of steps.

Writes check_stream_probs_<device>.json and .md.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script (interpret mode)")
    args = ap.parse_args(argv)

    import kvjax
    from kvjax import policies as P
    from kvjax.decode import decode_step
    from kvjax.io.checkpoint import Params
    from kvjax.models import ModelConfig

    base = dict(_shapes.TINY if args.tiny else _shapes.LLAMA31_8B)
    base.update(num_hidden_layers=args.layers, vocab_size=4096 if not args.tiny else base["vocab_size"],
                intermediate_size=4096 if not args.tiny else base["intermediate_size"])
    cfg = ModelConfig.from_hf_dict(base)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    params = Params(cfg, _shapes.random_weights(cfg, dtype, unstacked=not args.tiny), tokenizer=None)
    rng = np.random.default_rng(0)
    lengths = (300, 180, 250, 120) if args.tiny else (1500, 900, 1300, 700)
    prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    budget, window = (32, 8) if args.tiny else (128, 32)
    policies = {"H2O": P.H2O(budget=budget, recent=window), "TOVA": P.TOVA(budget=budget),
                "CAKE": P.CAKE(budget=budget, window=window), "RoCo": P.RoCo(budget=budget, chunk=64)}
    if args.tiny:
        import kvjax.pallas_kernels.ragged_decode_attention as rda
        import kvjax.pallas_kernels.stream_probs as sp

        ra, spp = rda.ragged_decode_attention_pallas, sp.stream_probs
        rda.ragged_decode_attention_pallas = lambda *a, **k: ra(*a, **{**k, "interpret": True, "backend": "gpu"})
        sp.stream_probs = lambda *a, **k: spp(*a, **{**k, "interpret": True, "backend": "gpu"})
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
        rows.append(dict(policy=name, streams=len(same), streams_equal=float(np.mean(same)),
                         steps=args.steps, steps_same_argmax=agree / args.steps, max_logit_diff=worst,
                         ok=bool(np.mean(same) >= 0.99 and agree / args.steps >= 0.99)))
        print(json.dumps(rows[-1]), flush=True)
    meta = _shapes.device_meta()
    meta.update(layers=args.layers, budget=budget, prompt_lengths=lengths, dtype=jnp.dtype(dtype).name)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug()
    (out / f"check_stream_probs_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = [f"Decode-time eviction, Pallas vs XLA, on {meta['device']} (jax {meta['jax']}), {args.layers} layers of "
          f"Llama-3.1-8B's shape, {meta['dtype']}, budget {budget}, {args.steps} greedy steps, prompts {lengths}.", "",
          "| policy | streams with equal kept positions | steps with the same argmax | largest logit difference | ok |",
          "|---|---|---|---|---|"]
    md += [f"| {r['policy']} | {100 * r['streams_equal']:.1f}% of {r['streams']} | {100 * r['steps_same_argmax']:.0f}% | "
           f"{r['max_logit_diff']:.3g} | {r['ok']} |" for r in rows]
    (out / f"check_stream_probs_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
