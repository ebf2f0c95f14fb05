"""A measured time estimate of the full quality run of a model (a few minutes of measurement).

    python benchmarks/quality_estimate.py --model qwen2.5-0.5b [the grid options of quality.py] [--out DIR]

It measures, on this machine and at each length of the run, with one prompt:
- a shared prompt pass of 5 policies (Full, SnapKV, Ada-SnapKV, CAKE, H2O at 25%): its first call
  (compile + run) and a second (run only); then the pass of Full alone, to split the second into the
  forward and the compression of each extra policy;
- RoCo's chunked pass (first and second call) at the shortest length, as a multiple of the forward;
- greedy decoding at the run's batch size, from the full cache and from the 25% SnapKV cache (the
  compressed prompt tiled over the batch): first and second call, seconds per step;
and composes the full run from the grid quality.py would run (batches per (length, mode), its pool
groups, the new tokens of each batch, one compile per (group | decode loop) per (length, mode)),
plus the XKV profiles (one forward per profile prompt) and the perplexity part (one decode step
per streamed token). Assumptions: prefill time grows linearly with the batch; a decode step costs
the same for every policy at a ratio (interpolated linearly between 25% and Full); compiles are not
shared between lengths and modes. Writes <out>/quality_<model>_estimate.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402

import kvjax  # noqa: E402
from kvjax import policies as P  # noqa: E402
from kvjax import prompts as kp  # noqa: E402
from kvjax.eval import ruler  # noqa: E402
from quality import batch_size, batches, parse_args  # noqa: E402
from quality_grid import chunked, groups, make_policy, needs_profile, pool_bytes, ratio_tokens  # noqa: E402
from quality_ppl import DECODE_STEPS, LIBRARY  # noqa: E402
from quality_shared import prefill_alone, prefill_shared  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure_length(params, L, bsz, window, log, with_roco: bool):
    tok = params.tokenizer
    s = ruler.make_samples("niah_single", L, tok, 1, seed=424242)
    group = [P.Full(), P.SnapKV(budget=0.25, window=window), P.AdaKV(P.SnapKV(budget=0.25, window=window)),
             P.CAKE(budget=0.25, window=window), P.H2O(budget=0.25, recent=window)]
    m = {}
    (pres, _), m["group_first_s"] = _timed(lambda: prefill_shared(params, s, "aware", group, 32, 0))
    del pres
    (pres, _), m["group_run_s"] = _timed(lambda: prefill_shared(params, s, "aware", group, 32, 0))
    (full, _), m["full_first_s"] = _timed(lambda: prefill_shared(params, s, "aware", group[:1], 32, 0))
    (full, _), m["forward_s"] = _timed(lambda: prefill_shared(params, s, "aware", group[:1], 32, 0))
    m["per_policy_s"] = max(m["group_run_s"] - m["forward_s"], 0.0) / (len(group) - 1)
    m["group_compile_s"] = max(m["group_first_s"] - m["group_run_s"], 0.0)
    log(f"{L}: shared pass of 5 policies {m['group_first_s']:.1f} s first, {m['group_run_s']:.1f} s again; "
        f"Full alone {m['forward_s']:.1f} s")
    if with_roco:
        roco = P.RoCo(budget=0.25)
        _, m["roco_first_s"] = _timed(lambda: prefill_alone(params, s, "aware", roco, 32, 0))
        _, m["roco_run_s"] = _timed(lambda: prefill_alone(params, s, "aware", roco, 32, 0))
        log(f"{L}: RoCo pass {m['roco_first_s']:.1f} s first, {m['roco_run_s']:.1f} s again")
    q = [" What is it?"] * bsz
    for name, pre in (("full", full[0]), ("compressed", pres[1])):
        times, steps = [], []
        for _ in range(2):
            out, dt = _timed(lambda pre=pre: kvjax.generate(params, prefilled=pre, question=q, max_new_tokens=32))
            times.append(dt)
            steps.append(max(out.stats["generated_lengths"]))
        m[f"decode_{name}_step_s"] = times[1] / max(steps[1], 1)
        m[f"decode_{name}_compile_s"] = max(times[0] - times[1], 0.0)
        log(f"{L}: decode at batch {bsz} from the {name} cache: {m[f'decode_{name}_step_s'] * 1000:.0f} ms/step "
            f"({steps[1]} steps), first call +{m[f'decode_{name}_compile_s']:.1f} s")
    return m


def compose(params, args, meas: dict) -> dict:
    cfg = params.config
    shortest = min(args.lengths)
    roco_factor = meas[shortest].get("roco_run_s", meas[shortest]["forward_s"]) / meas[shortest]["forward_s"]
    parts = dict(prefill_s=0.0, roco_s=0.0, decode_s=0.0, compile_s=0.0, profiles_s=0.0, ppl_s=0.0)
    order = [t for t in args.tasks for _ in range(args.samples)]
    for L in args.lengths:
        m = meas[L]
        bsz = batch_size(args, L)
        step = lambda r, m=m: (m["decode_full_step_s"] if r is None else m["decode_compressed_step_s"] + (  # noqa: E731
            m["decode_full_step_s"] - m["decode_compressed_step_s"]) * max(r - 0.25, 0) / 0.75)
        for mode in args.modes:
            for chunk, _ in batches(order, bsz):
                max_new = max(ruler.MAX_NEW_TOKENS[t] for t in chunk)
                headroom = kp.new_tokens_bucket(max_new) + (32 if mode == "agnostic" else 0)
                bucket = kp.length_bucket(L, cfg.max_position_embeddings)
                cells, sizes, n_alone = [("Full", None)], [pool_bytes(P.Full(), cfg, bucket, headroom, bsz)], 0
                for name in args.policies:
                    for r in args.ratios:
                        if chunked(name):
                            n_alone += 1
                            continue
                        proxy = "SnapKV" if needs_profile(name) else name
                        pol, _ = make_policy(proxy, r, window=args.window)
                        cells.append((name, r))
                        sizes.append(pool_bytes(pol, cfg, bucket, headroom, bsz))
                n_groups = len(groups(cells, sizes, int(args.pool_gib * 2**30)))
                parts["prefill_s"] += bsz * (n_groups * m["forward_s"] + (len(cells) - n_groups) * m["per_policy_s"])
                parts["roco_s"] += n_alone * bsz * m["forward_s"] * roco_factor
                parts["decode_s"] += max_new * (sum(step(r) for _, r in cells) + n_alone * sum(
                    step(r) for r in args.ratios) / max(len(args.ratios), 1))
            compiles = n_groups * m["group_compile_s"] + (len(cells) + n_alone) * m["decode_compressed_compile_s"]
            parts["compile_s"] += compiles + n_alone * max(m.get("roco_first_s", 0) - m.get("roco_run_s", 0), 0)
        if any(needs_profile(p) for p in args.policies):
            parts["profiles_s"] += len(args.ratios) * args.profile_prompts * m["forward_s"]
    if "ppl" in args.parts:
        near = min(args.lengths, key=lambda L: abs(L - args.ppl_length))
        m = meas[near]
        for name in args.ppl_policies:
            if name in LIBRARY or name in DECODE_STEPS:
                for r in args.ppl_ratios:
                    parts["ppl_s"] += (args.ppl_length - ratio_tokens(r, args.ppl_length)) * m["decode_compressed_step_s"]
        parts["ppl_s"] += m["forward_s"] * args.ppl_texts * args.ppl_length / near  # Full
    if "retrieval" not in args.parts:
        for k in ("prefill_s", "roco_s", "decode_s", "compile_s", "profiles_s"):
            parts[k] = 0.0
    total = sum(parts.values())
    return dict(parts={k: round(v) for k, v in parts.items()}, total_s=round(total), total_h=round(total / 3600, 2),
                roco_factor=round(roco_factor, 2))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = pathlib.Path("/tmp")
    if "--out" in argv:
        i = argv.index("--out")
        out_dir = pathlib.Path(argv[i + 1])
        del argv[i:i + 2]
    args = parse_args(argv)
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    params = kvjax.load(args.model, dtype=args.dtype)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    meas = {L: measure_length(params, L, batch_size(args, L), args.window, log, L == min(args.lengths))
            for L in args.lengths}
    est = compose(params, args, meas)
    est["measured_s"] = round(time.perf_counter() - t0)
    grid = dict(lengths=args.lengths, tasks=len(args.tasks), samples=args.samples, ratios=args.ratios,
                policies=len(args.policies), modes=args.modes, batch_tokens=args.batch_tokens, pool_gib=args.pool_gib,
                ppl=dict(length=args.ppl_length, texts=args.ppl_texts, ratios=args.ppl_ratios,
                         policies=args.ppl_policies))
    p = est["parts"]
    est["summary"] = (f"{args.model}: about {est['total_h']:.1f} h on this machine (prefill {p['prefill_s'] / 3600:.1f} h, "
                      f"RoCo passes {p['roco_s'] / 3600:.1f} h, decoding {p['decode_s'] / 3600:.1f} h, compiles "
                      f"{p['compile_s'] / 3600:.1f} h, profiles {p['profiles_s'] / 3600:.2f} h, perplexity "
                      f"{p['ppl_s'] / 3600:.1f} h), measured in {est['measured_s']} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"quality_{args.model}_estimate.json"
    path.write_text(json.dumps(dict(grid=grid, measured={str(k): {a: round(b, 3) for a, b in v.items()}
                                                         for k, v in meas.items()}, estimate=est,
                                    device=str(jax.devices()[0]), at=time.strftime("%Y-%m-%d %H:%M")), indent=1))
    log(est["summary"])
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
