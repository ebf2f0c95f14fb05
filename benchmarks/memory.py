"""Live device bytes after prefill: full cache vs compressed caches, one 4K prompt.

    python benchmarks/memory.py [--tokens 4096] [--model smollm2-135m|<HF directory>] [--out benchmarks/results]

Counts the bytes of every live JAX array after `kvjax.prefill` (weights excluded), which is what
the device really holds for the cache, next to `cache.nbytes` and the live (used) token slots.
Writes `memory_<device>.json` and `memory_<device>.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def live_bytes(exclude_ids: set[int]) -> int:
    return sum(a.nbytes for a in jax.live_arrays() if id(a) not in exclude_ids and not a.is_deleted())


def main():
    import kvjax
    from kvjax import policies as P

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    params = kvjax.load(args.model, dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, params.config.vocab_size, size=(1, args.tokens)).astype(np.int32)
    weight_ids = {id(x) for x in jax.tree_util.tree_leaves(params.weights)}
    policies = {
        "Full": None,
        "StreamingLLM(256)": P.StreamingLLM(budget=256),
        "SnapKV(64)": P.SnapKV(budget=64, window=32),
        "SnapKV(256)": P.SnapKV(budget=256),
        "PyramidKV(256)": P.PyramidKV(budget=256),
        "AdaKV(SnapKV(256))": P.AdaKV(P.SnapKV(budget=256)),
        "H2O(256)": P.H2O(budget=256),
        "SnapKV(0.1)": P.SnapKV(budget=0.1),
    }
    rows = []
    for name, policy in policies.items():
        gc.collect()
        base = live_bytes(weight_ids)
        t0 = time.perf_counter()
        pre = kvjax.prefill(params, tokens, policy, max_new_tokens=16)
        jax.block_until_ready(pre.cache)
        dt = time.perf_counter() - t0
        held = live_bytes(weight_ids) - base
        live = int(np.asarray(pre.cache.streams.length).sum())
        rows.append(dict(policy=name, live_device_bytes=int(held), cache_nbytes=int(pre.cache.nbytes),
                         kv_pool_bytes=int(pre.cache.kv_nbytes), pool_slots=pre.cache.layout.pool_size,
                         live_token_slots=live, prefill_s_incl_compile=round(dt, 2)))
        print(rows[-1], flush=True)
        del pre
    full = rows[0]["live_device_bytes"]
    for r in rows:
        r["fraction_of_full"] = round(r["live_device_bytes"] / full, 4)
    device = jax.devices()[0]
    meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__, model=args.model,
                prompt_tokens=args.tokens, dtype=args.dtype, decode_headroom=16, host=platform.node())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory_{device.platform}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"Live device bytes after prefill of a {args.tokens}-token prompt ({args.model}, {args.dtype}, "
             f"{meta['device']}, jax {meta['jax']}); 16 decode slots of headroom per stream.", "",
             "| policy | live bytes (MiB) | cache.nbytes (MiB) | pool slots | used slots | vs full |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['live_device_bytes'] / 2**20:.2f} | {r['cache_nbytes'] / 2**20:.2f} | "
                     f"{r['pool_slots']} | {r['live_token_slots']} | {r['fraction_of_full']:.3f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
