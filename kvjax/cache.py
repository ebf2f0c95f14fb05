"""The pooled KV cache: every (sequence, layer, KV head) stream lives in one fixed-size pool.

A *stream* is the list of kept tokens of one (sequence b, layer l, KV head h). All streams of a
sequence share one pool of P slots, so the bytes held equal the total of the streams' capacities,
whatever the split across layers and heads:

    k, v        [B, P, D]     pool of slots, keys stored after RoPE
    pos         [B, P]        original position of the token in each slot (-1 = empty)
    score       [B, P]        the policy's running statistic per slot (for later re-eviction)
    score2      [B, P]        a second running statistic (RoCo's sum of squared attention)
    start       [B, L, H]     first slot of each stream
    length      [B, L, H]     used slots of each stream (kept tokens are packed at its front)
    cap         [B, L, H]     slots reserved for the stream (length <= cap)
    budget      [B, L, H]     tokens the stream keeps; decode-time eviction holds length there
    next_pos    [B]           position of the next token of each sequence

Layer l's streams all lie in the static region `[layer_base[l], layer_base[l] + layer_span[l])`;
how that region is split among the layer's heads (`start`, `cap`) may differ per sequence (Ada-KV).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of a pool: each layer's region. Changing it recompiles; budgets inside don't."""

    layer_base: tuple[int, ...]
    layer_span: tuple[int, ...]
    num_kv_heads: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_span)

    @property
    def pool_size(self) -> int:
        # layers' regions are disjoint, or all the same whole pool (kvjax/cascade.py)
        return max(b + s for b, s in zip(self.layer_base, self.layer_span))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array
    score2: jax.Array
    start: jax.Array
    length: jax.Array
    cap: jax.Array
    budget: jax.Array
    next_pos: jax.Array
    layout: Layout = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes really held by the cache's arrays (pool and bookkeeping)."""
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the key/value pool alone."""
        return int(self.k.nbytes + self.v.nbytes)

    def layer_region(self, layer: int) -> slice:
        base = self.layout.layer_base[layer]
        return slice(base, base + self.layout.layer_span[layer])


def kept_positions(cache: Cache) -> list[list[list[np.ndarray]]]:
    """For every layer, sequence and KV head, the sorted original positions kept: [l][b][h] -> int array."""
    pos = np.asarray(cache.pos)
    start, length = np.asarray(cache.start), np.asarray(cache.length)
    out = []
    for layer in range(cache.layout.num_layers):
        per_b = []
        for b in range(pos.shape[0]):
            per_b.append(
                [
                    np.sort(pos[b, start[b, layer, h] : start[b, layer, h] + length[b, layer, h]])
                    for h in range(cache.layout.num_kv_heads)
                ]
            )
        out.append(per_b)
    return out


def occupancy(cache: Cache) -> jax.Array:
    """Used slots per sequence [B] (the live KV, as opposed to the reserved pool)."""
    return cache.length.sum(axis=(1, 2))
