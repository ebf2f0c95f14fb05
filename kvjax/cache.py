"""The pooled KV cache: every (sequence, layer, KV head) stream lives in one fixed-size pool.

A *stream* is the list of kept tokens of one (layer l, sequence b, KV head h). All streams of a
sequence share one pool of P slots, so the bytes held equal the total of the streams' capacities,
whatever the split across layers and heads:

    Cache
      pools     Pools: k, v [B, P, D] (keys after RoPE), pos [B, P] (-1 = empty),
                score, score2 [B, P] (the policy's running statistics, for decode-time eviction)
      streams   Streams: start, length, cap, budget [L, B, H] int32, layer-major (a layer scan
                slices them): first slot, used slots (kept tokens packed at the front), reserved
                slots, and the tokens the stream may hold (prompt and generated together)
      next_pos  [B] position of the next token of each sequence
      layout    static: each layer's region of the pool

Layer l's streams lie in the static region `[layer_base[l], layer_base[l] + layer_span[l])`; how
the region is split among the layer's heads may differ per sequence (Ada-KV). Policies whose layer
budgets depend on every layer (CAKE) give all layers the whole pool as one shared region.

The plan (`Plan`) fixes the shapes of one compiled prefill/decode: the layout, each layer's bound
on a stream's kept tokens, and the decode headroom. `region_layout` and `place_streams` are the
one place where regions and streams are laid out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

#: per-stream capacities are rounded up to this many slots, so nearby budgets share a compile
BUDGET_ROUNDING = 16


def round_up(x: int, m: int = BUDGET_ROUNDING) -> int:
    return -(-int(x) // m) * m


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of a pool: each layer's region. Changing it recompiles; budgets inside don't.

    On a mesh (kvjax.mesh) the pool of a sequence is split into `shards` equal parts along its slots,
    one per model shard, each holding the streams of its `num_kv_heads` KV heads at its own offsets:
    the regions and the pool size here are one part's."""

    layer_base: tuple[int, ...]
    layer_span: tuple[int, ...]
    num_kv_heads: int
    shards: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.layer_span)

    @property
    def pool_size(self) -> int:
        # layers' regions are disjoint, or all the same whole pool (one shared region)
        return max(b + s for b, s in zip(self.layer_base, self.layer_span))

    @property
    def max_span(self) -> int:
        return max(self.layer_span)

    @property
    def shared(self) -> bool:
        """All layers share one region, the whole pool (streams of every layer back to back)."""
        return self.num_layers > 1 and set(self.layer_base) == {0} and set(self.layer_span) == {self.pool_size}


def region_layout(spans, num_kv_heads: int) -> Layout:
    """Disjoint layer regions of the given sizes, the largest last, so a slice of the largest size
    from any layer's base stays inside the pool."""
    order = sorted(range(len(spans)), key=lambda l: spans[l])
    base = [0] * len(spans)
    offset = 0
    for l in order:
        base[l] = offset
        offset += int(spans[l])
    return Layout(tuple(base), tuple(int(s) for s in spans), num_kv_heads)


def shared_layout(pool_size: int, num_layers: int, num_kv_heads: int) -> Layout:
    """Every layer's region is the whole pool (streams of all layers back to back)."""
    return Layout((0,) * num_layers, (int(pool_size),) * num_layers, num_kv_heads)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static sizes of one compiled prefill/decode.

    layout:         the pool's layer regions
    stream_bound:   per layer, the most tokens a stream keeps after prefill
    headroom:       extra slots per stream for decode tokens (the decode bucket, or the eviction
                    period for policies that evict while decoding)
    adaptive_heads: stream lengths differ within a layer (Ada-KV); the decode kernel splits more
    packed:         a stream reserves only what it keeps plus headroom (Ada-KV, the cascade);
                    otherwise every stream of layer l reserves stream_bound[l] plus headroom
    decode_width:   the widest stream while decoding, when known from a prefilled cache
                    (`for_decode`); None: from the bound
    """

    layout: Layout
    stream_bound: tuple[int, ...]
    headroom: int
    adaptive_heads: bool = False
    packed: bool = False
    decode_width: int | None = None

    @property
    def max_span(self) -> int:
        return self.layout.max_span

    @property
    def stream_width(self) -> int:
        """The most slots a stream holds: what decode-time eviction looks at per stream."""
        if self.decode_width is not None:
            return self.decode_width
        return min(max(self.stream_bound) + self.headroom, self.max_span)

    def for_decode(self, caps) -> "Plan":
        """This plan narrowed to the streams a prefilled cache really reserved, caps [L, B, H] (host
        values): decode-time eviction then works on that many slots per stream. The cascade (CAKE)
        sizes its bound for a layer that could keep the whole prompt; once prefill has split the
        budget, streams are far shorter. Rounded up to a power of two (>= 16), so nearby caches
        share one compiled decode loop."""
        need = int(np.max(caps)) if np.size(caps) else 1
        width = min(max(16, 1 << (need - 1).bit_length()), self.stream_width)
        return dataclasses.replace(self, decode_width=width)


def place_streams(plan: Plan, kept, bound, first, reserve=None):
    """Where a layer's streams go: (start [B, H], cap [B, H]) int32, start relative to the region.

    kept [B, H] tokens each stream keeps; bound: the layer's stream bound (scalar); first [B] the
    first free slot of the region; reserve [B] (packed plans): tokens a stream may grow to before
    it evicts, when more than it keeps. Streams of a sequence lie back to back in head order.
    """
    if plan.packed:
        held = kept if reserve is None else jnp.maximum(kept, reserve[:, None])
        caps = held.astype(jnp.int32) + plan.headroom
    else:
        caps = jnp.broadcast_to(jnp.asarray(bound, jnp.int32) + plan.headroom, kept.shape)
    return first[:, None] + jnp.cumsum(caps, axis=1) - caps, caps


def layout_streams(plan: Plan, kept):
    """Every layer's streams laid out as prefill lays them out: kept [L, B, H] -> (start, cap)
    [L, B, H] int32, start absolute. Layers with their own region start at its base; in a shared
    layout each layer follows the previous one."""
    starts, caps = [], []
    first = jnp.zeros(kept.shape[1], jnp.int32)
    for layer in range(kept.shape[0]):
        start, cap = place_streams(plan, kept[layer], plan.stream_bound[layer], first)
        if plan.layout.shared:
            first = first + cap.sum(axis=1)
        else:
            start = start + plan.layout.layer_base[layer]
        starts.append(start), caps.append(cap)
    return jnp.stack(starts), jnp.stack(caps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pools:
    """The slots of every stream of every sequence. k, v [B, P, D]; pos, score, score2 [B, P]."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array
    score2: jax.Array

    #: what an empty slot holds, field by field
    EMPTY = dict(k=0, v=0, pos=-1, score=0, score2=0)

    @classmethod
    def empty(cls, batch: int, slots: int, head_dim: int, dtype) -> "Pools":
        return cls(
            k=jnp.zeros((batch, slots, head_dim), dtype),
            v=jnp.zeros((batch, slots, head_dim), dtype),
            pos=jnp.full((batch, slots), -1, jnp.int32),
            score=jnp.zeros((batch, slots), jnp.float32),
            score2=jnp.zeros((batch, slots), jnp.float32),
        )

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def map(self, fn) -> "Pools":
        """Apply fn(array, empty_value) to every field."""
        return Pools(**{f: fn(getattr(self, f), e) for f, e in self.EMPTY.items()})

    def region(self, base, size: int) -> "Pools":
        """Slots [base, base + size) of every field (base may be traced)."""
        return self.map(lambda a, _: jax.lax.dynamic_slice_in_dim(a, base, size, axis=1))

    def put_region(self, region: "Pools", base) -> "Pools":
        """Write `region` (from `region(base, ...)`) back at base."""
        return Pools(**{f: jax.lax.dynamic_update_slice_in_dim(getattr(self, f), getattr(region, f), base, axis=1)
                        for f in self.EMPTY})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Streams:
    """Bookkeeping of every stream, layer-major: start, length, cap, budget [L, B, H] int32
    (indexed by one layer inside a layer scan: [B, H])."""

    start: jax.Array
    length: jax.Array
    cap: jax.Array
    budget: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    pools: Pools
    streams: Streams
    next_pos: jax.Array
    layout: Layout = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        return self.pools.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes really held by the cache's arrays (pool and bookkeeping)."""
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the key/value pool alone."""
        return int(self.pools.k.nbytes + self.pools.v.nbytes)

    def layer_region(self, layer: int) -> slice:
        base = self.layout.layer_base[layer]
        return slice(base, base + self.layout.layer_span[layer])


def kept_positions(cache: Cache) -> list[list[list[np.ndarray]]]:
    """For every layer, sequence and KV head, the sorted original positions kept: [l][b][h] -> int array."""
    pos = np.asarray(cache.pools.pos)
    start, length = np.asarray(cache.streams.start), np.asarray(cache.streams.length)
    # on a mesh, head h's stream lies in the pool part of its model shard, at its own offsets
    part = lambda h: (h // cache.layout.num_kv_heads) * cache.layout.pool_size  # noqa: E731
    return [
        [
            [np.sort(pos[b, part(h) + start[l, b, h]: part(h) + start[l, b, h] + length[l, b, h]])
             for h in range(start.shape[2])]
            for b in range(pos.shape[0])
        ]
        for l in range(start.shape[0])
    ]


def occupancy(cache: Cache) -> jax.Array:
    """Used slots per sequence [B] (the live KV, as opposed to the reserved pool)."""
    return cache.streams.length.sum(axis=(0, 2))


def relayout(cache: Cache, plan: Plan, held, width: int) -> Cache:
    """The same streams laid out in the pool of another plan (more room to decode into).

    held [L, B, H]: tokens each stream may hold before it evicts (its length; its budget for a
    policy that evicts while decoding); width: static bound on any stream's length (the old plan's
    `max(stream_bound) + headroom`). Kept tokens keep their order; the new pool's other slots are empty.
    """
    start, cap = layout_streams(plan, held)
    old, length = cache.streams.start, cache.streams.length
    j = jnp.arange(width)
    inside = j < length[..., None]  # [L, B, H, W]
    b = cache.batch_size
    per_row = lambda a: jnp.moveaxis(a, 1, 0).reshape(b, -1)  # [L, B, H, W] -> [B, L*H*W]
    src = per_row(jnp.minimum(old[..., None] + j, cache.pools.slots - 1))
    dst = per_row(jnp.where(inside, start[..., None] + j, plan.layout.pool_size))  # past the pool: dropped
    rows = jnp.arange(b)[:, None]
    fresh = Pools.empty(b, plan.layout.pool_size, cache.pools.k.shape[2], cache.pools.k.dtype)

    def move(new, old_pool):
        return new.at[rows, dst].set(old_pool[rows, src], mode="drop")

    pools = Pools(**{f: move(getattr(fresh, f), getattr(cache.pools, f)) for f in Pools.EMPTY})
    streams = Streams(start, length, cap, cache.streams.budget)
    return Cache(pools, streams, cache.next_pos, plan.layout)


def tile(cache: Cache, n: int) -> Cache:
    """A cache of one sequence repeated n times (several questions about one compressed context)."""
    rep = lambda axis: (lambda a: jnp.repeat(a, n, axis=axis))
    return Cache(jax.tree_util.tree_map(rep(0), cache.pools), jax.tree_util.tree_map(rep(1), cache.streams),
                 jnp.repeat(cache.next_pos, n), cache.layout)
