"""Decode-time eviction of one layer as one GPU kernel (`kvjax.pallas_kernels.stream_evict`).

    supports(scorer, ev, heads=, head_dim=, width=, model_axis=)                 -> bool
    decode_evict_fused(scorer, ev, pools, st, length, logits, lse, active, step_due, next_pos,
                       width, model_axis)                                          -> (pools, length)

`decode_evict_fused` returns what `kvjax.decode.decode_step`'s `_decode_evict` returns for the same
layer, bit for bit where the float sums run in the same order (the group's and the heads' sums
in index order): the probabilities from the attention kernel's per-stream logits and log-sum-exp,
the scorer's statistics, one swap-remove per stream above its budget, the pools updated in place.
The XLA path runs ~10 kernels per layer for this (a reduction, six scatters, a few fusions); the
kernel is one program per stream that reads its view once and writes it back once.

Supported: the scorers whose decode update and eviction key the kernel knows (H2O's
`AccumulatedAttention`, TOVA's `LastQueryAttention`, CAKE's `CakeIndicator` with the default
`eviction_key`, RoCo's `RobustAttention` with its per-stream rule; exact types), `every == 1`, a
head dimension that is a power of two, views of at most `MAX_WIDTH` slots, no mesh axis for TOVA
(its layer mean would need a psum across devices). Anything else (learned scorers, `every > 1`,
RoCo's `stride > 1`) stays on the XLA path.
"""

from __future__ import annotations

import jax

from kvjax.cache import Pools
from kvjax.pallas_kernels.stream_evict import stream_evict
from kvjax.policies.base import Scorer
from kvjax.policies.cake import CakeIndicator
from kvjax.policies.roco import RobustAttention, scope_size
from kvjax.policies.scorers import AccumulatedAttention, LastQueryAttention

#: the widest view the kernel takes (registers: a handful of [W'] vectors per program)
MAX_WIDTH = 8192


def kernel_rule(scorer) -> dict | None:
    """The kernel's static options for this scorer (`stream_evict`'s update, group_reduce,
    layer_mean, pool_kernel), or None if the kernel does not know its math."""
    t = type(scorer)
    if t is RobustAttention:
        return dict(update="add", group_reduce=scorer.group_reduce, robust=True)
    if t.eviction_key is not Scorer.eviction_key or getattr(scorer, "stream_eviction_key", None) is not None:
        return None
    if t is AccumulatedAttention:
        return dict(update="add", group_reduce=scorer.group_reduce)
    if t is LastQueryAttention:
        return dict(update="set", group_reduce=scorer.group_reduce, layer_mean=True)
    if t is CakeIndicator:
        return dict(update="set", group_reduce=scorer.group_reduce, pool_kernel=int(scorer.kernel))
    return None


def supports(scorer, ev, *, heads: int | None = None, head_dim: int, width: int, model_axis: str | None = None,
             backend: str | None = None) -> bool:
    """Whether `decode_evict_fused` can run this layer's eviction. `backend`: where the kernel would
    run (default: JAX's default backend; the kernel is Triton, GPU only)."""
    del heads  # any number of KV heads and query heads per group (static loops in the kernel)
    backend = jax.default_backend() if backend is None else backend
    if backend != "gpu" or ev is None or ev.every != 1:
        return False
    rule = kernel_rule(scorer)
    if rule is None or rule["group_reduce"] not in ("mean", "max"):
        return False
    if rule.get("layer_mean") and model_axis is not None:
        return False
    return head_dim & (head_dim - 1) == 0 and 1 <= width <= MAX_WIDTH


def _num_warps(width: int) -> int:
    return 4 if width <= 1024 else 8


def decode_evict_fused(scorer, ev, pools: Pools, st, length, logits, lse, active, step_due, next_pos, width: int,
                       model_axis: str | None = None, *, logits_offset: int = 0, implementation: str = "pallas",
                       interpret=False, heads_per_program: int | None = None):
    """One layer's decode-time eviction in one kernel: what `_decode_evict(pools, length, probs, st,
    step_due)` returns, with the probabilities computed inside from the attention kernel's outputs.

    pools: the layer's pools after the append (the new token's k, v, pos written); st: the layer's
    streams (start, length before the append, budget [B, H]); length [B, H] after the append;
    logits [B, H, G', C] and lse [B, H, G] from `append_and_attend(..., stream_logits=width)`
    (offset j at column `logits_offset + j`: pass the kernel's raw buffer with its offset to skip
    the slice's copy); active, step_due [B] bool; next_pos [B] (the new token's position).
    implementation "xla" runs the kernel's jnp reference instead (tests, CPU); heads_per_program:
    the kernel's streams per program (default 1: a program per stream).
    Returns (pools, length [B, H]), the pools updated in place on GPU.
    """
    rule = kernel_rule(scorer)
    if rule is None or ev is None or ev.every != 1:
        raise ValueError(f"decode_evict_fused does not support {type(scorer).__name__} with {ev}: check supports()")
    if rule.get("layer_mean") and model_axis is not None:
        raise ValueError("decode_evict_fused: a layer-shared scorer under a mesh needs a psum across devices")
    if rule.get("robust"):  # RoCo: the candidates in scope, from the budget and the excess over it
        rule = dict(rule, scope=scope_size(st.budget, length - st.budget, scorer.recent_ratio, scorer.sinks))
    pos, score, score2, k, v, new_length = stream_evict(
        st.start, length, st.length, st.budget, active, step_due, next_pos, logits, lse, pools.pos, pools.score,
        pools.score2, pools.k, pools.v, recent=int(ev.recent), sinks=int(ev.sinks), width=width,
        logits_offset=logits_offset, implementation=implementation, interpret=interpret,
        num_warps=_num_warps(width), heads_per_program=heads_per_program or 1, **rule)
    return Pools(k, v, pos, score, score2), new_length.astype(length.dtype)
