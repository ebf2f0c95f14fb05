"""On a GPU: the fused eviction kernel (kvjax/evict_fused.py) against decode.py's XLA eviction (the oracle of tests/test_stream_evict.py) on random states at Llama-3.1-8B attention shapes (B=32 and 8, W=1040): differing entries per field, and microseconds per layer of each path. Prints one JSON line per case."""
import sys, time, json, functools
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
import jax, jax.numpy as jnp
from kvjax.cache import Pools, Streams
from kvjax.decode_attention import stream_probs
from kvjax.evict_fused import decode_evict_fused
from kvjax.policies.base import DecodeEviction
from kvjax.policies.cake import CakeIndicator
from kvjax.policies.scorers import AccumulatedAttention, LastQueryAttention
from test_stream_evict import _oracle

print(jax.__version__, jax.devices())
SC = {"h2o": (AccumulatedAttention(), DecodeEviction()), "tova": (LastQueryAttention(), DecodeEviction()),
      "cake": (CakeIndicator(window=32, kernel=5), DecodeEviction(recent=32))}

def state(b, h, g, d, w, seed=0):
    rng = np.random.default_rng(seed)
    cap = w + 16
    start = (np.arange(h) * cap)[None].repeat(b, 0).astype(np.int32)
    p = h * cap
    next_pos = np.full(b, 32000, np.int32)
    length0 = np.full((b, h), w - 16, np.int32); length0[:, ::2] -= rng.integers(0, 5, size=(b, (h + 1) // 2))
    budget = np.full((b, h), w - 16 - 2, np.int32)
    active = np.ones(b, bool); active[-1] = False
    length = length0 + active[:, None]
    pos = np.full((b, p), -1, np.int32); score = np.zeros((b, p), np.float32); score2 = np.zeros((b, p), np.float32)
    for i in range(b):
        for j in range(h):
            s, n0 = start[i, j], length0[i, j]
            pos[i, s:s + n0] = np.sort(rng.choice(32000, n0, replace=False)); pos[i, s + n0] = 32000
            score[i, s:s + n0 + 1] = rng.random(n0 + 1)
    k = rng.normal(size=(b, p, d)).astype(np.float32); v = rng.normal(size=(b, p, d)).astype(np.float32)
    logits = rng.normal(size=(b, h, g, w)).astype(np.float32) * 3
    valid = np.arange(w) < length[..., None]
    lse = np.asarray(jax.nn.logsumexp(jnp.where(valid[:, :, None], logits, -jnp.inf), axis=-1))
    st = Streams(jnp.asarray(start), jnp.asarray(length0), jnp.asarray(np.full((b, h), cap, np.int32)), jnp.asarray(budget))
    pools = Pools(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), jnp.asarray(pos), jnp.asarray(score), jnp.asarray(score2))
    return pools, st, jnp.asarray(length), jnp.asarray(logits), jnp.asarray(lse), jnp.asarray(active), jnp.ones(b, bool), jnp.asarray(next_pos)

def timed(fn, pools, rest, n=50):
    @functools.partial(jax.jit, donate_argnums=0)
    def loop(pools, rest):
        def body(i, c):
            pools, acc = c
            pools, ln = fn(pools, *rest)
            return pools, acc + ln.sum()
        return jax.lax.fori_loop(0, n, body, (pools, 0))
    out = loop(pools, rest); jax.block_until_ready(out)
    best = 1e9
    for _ in range(5):
        pools = out[0]
        t = time.perf_counter(); out = loop(pools, rest); jax.block_until_ready(out); best = min(best, time.perf_counter() - t)
    return best / n * 1e6

res = {}
for b, w in ((32, 1040), (8, 1040)):
    for name, (sc, ev) in SC.items():
        pools, st, length, logits, lse, active, due, npos = state(b, 8, 4, 128, w)
        def xla(pools, st, length, logits, lse, active, due, npos, sc=sc, ev=ev, w=w):
            probs = stream_probs(lse, logits, length, sc.group_reduce)
            return _oracle(sc, ev, pools, st, length, probs, active, due, npos, w)
        def kern(pools, st, length, logits, lse, active, due, npos, sc=sc, ev=ev, w=w):
            return decode_evict_fused(sc, ev, pools, st, length, logits, lse, active, due, npos, w)
        rest = (st, length, logits, lse, active, due, npos)
        a = jax.jit(xla)(pools, *rest); c = jax.jit(kern)(pools, *rest)
        r = jax.jit(lambda *x: decode_evict_fused(sc, ev, *x, w, implementation="xla"))(pools, *rest)
        cmp = {}
        for tag, got in (("kernel", c), ("reference", r)):
            cmp[tag] = {f: int((np.asarray(getattr(got[0], f), np.float32) != np.asarray(getattr(a[0], f), np.float32)).sum()) for f in ("k", "v", "pos", "score", "score2")}
            cmp[tag]["length"] = int((np.asarray(got[1]) != np.asarray(a[1])).sum())
            cmp[tag]["score_maxdiff"] = float(np.abs(np.asarray(got[0].score) - np.asarray(a[0].score)).max())
        cmp["evicted"] = int((np.asarray(a[1]) < np.asarray(length)).sum())
        cp = lambda: jax.tree.map(jnp.copy, pools)
        t_x = timed(xla, cp(), rest); t_k = timed(kern, cp(), rest)
        key = f"{name} B={b} W={w}"
        res[key] = dict(cmp, xla_us=round(t_x, 2), kernel_us=round(t_k, 2))
        if name == "tova":
            for hb in (1, 2, 8):
                kh = lambda pools, *r, hb=hb: decode_evict_fused(sc, ev, pools, *r, w, heads_per_program=hb)
                res[key][f"kernel_us_hb{hb}"] = round(timed(kh, cp(), rest), 2)
        print(key, json.dumps(res[key]), flush=True)
