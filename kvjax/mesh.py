"""Running the one layer step on a mesh: sequences over `data`, KV heads over `model`.

    par = Parallel.of(mesh)                          # None for one device
    step = par.shard(fn, in_specs, out_specs)        # fn sees one device's part of every array

Every prefill, decode and chunk step runs under `jax.shard_map`: each device runs the same
single-device code on its sequences and its KV heads, with the model's config narrowed to its heads
(`local_config`, whose `model_axis` names the axis the layer step sums its attention-output and
MLP partial products over). The pool is sharded the same way: each model shard owns the streams
of its KV heads in its own part of the pool (its own offsets), so per-device cache bytes are the
total divided by data x model, and the cache is never gathered. Tensor parallelism costs the usual
two reductions per layer (attention output, MLP); data parallelism none.

When the model axis is larger than the KV-head count and a multiple of it, each KV head is
replicated (`replicate_kv_heads`, as serving engines do; `stats["mesh"]["kv_head_replicas"]` says
so). Each replica then scores its tokens by the query heads it serves, a part of the original
group, so a compressing policy may keep other tokens than on one device (the full cache gives the
same tokens). Other mismatches are an error that says which mesh would work.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvjax.cache import Cache, Layout, Pools, Streams
from kvjax.errors import InputError
from kvjax.models import ModelConfig, Weights

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A mesh with axes `data` and `model` (either may be absent: size 1)."""

    mesh: Mesh

    @classmethod
    def of(cls, mesh: Mesh | None) -> "Parallel | None":
        if mesh is None:
            return None
        unknown = [a for a in mesh.axis_names if a not in (DATA, MODEL)]
        if unknown:
            raise InputError(f"mesh axes must be named {DATA!r} and/or {MODEL!r}, got {mesh.axis_names}")
        return cls(mesh)

    @property
    def data(self) -> int:
        return int(self.mesh.shape.get(DATA, 1))

    @property
    def model(self) -> int:
        return int(self.mesh.shape.get(MODEL, 1))

    def _axis(self, name: str) -> str | None:
        return name if name in self.mesh.shape else None

    # -- the per-device program
    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config one device's program sees: its query and KV heads, and the axes it is split over."""
        check_heads(config, self.model)
        m = self.model
        return dataclasses.replace(config, num_heads=config.num_heads // m, num_kv_heads=config.num_kv_heads // m,
                                   model_axis=self._axis(MODEL), data_axis=self._axis(DATA))

    def local_layout(self, layout: Layout) -> Layout:
        return dataclasses.replace(layout, shards=self.model)

    def local_policy(self, policy):
        """The policy one device's program runs: Ada-KV trades budget only among the heads of one
        model shard (its `head_groups` counted per shard), so every device holds the same bytes."""
        from kvjax.policies.adakv import AdaKV

        if not isinstance(policy, AdaKV) or self.model == 1 or policy.head_groups == 1:
            return policy
        if policy.head_groups % self.model:
            raise InputError(f"head_groups={policy.head_groups} must be a multiple of the mesh's model axis "
                             f"({self.model}): Ada-KV trades budget only inside a model shard")
        return dataclasses.replace(policy, head_groups=policy.head_groups // self.model)

    def padded_batch(self, batch: int) -> int:
        """Sequences are split over `data`: a batch is padded up to a multiple of its size."""
        return -(-batch // self.data) * self.data

    # -- partition specs
    def batch(self, ndim: int = 1) -> P:
        return P(self._axis(DATA), *([None] * (ndim - 1)))

    def replicated(self, tree):
        return jax.tree_util.tree_map(lambda _: P(), tree)

    def cache_specs(self, layout: Layout) -> Cache:
        d, m = self._axis(DATA), self._axis(MODEL)
        pool3, pool2, streams = P(d, m, None), P(d, m), P(None, d, m)
        return Cache(Pools(pool3, pool3, pool2, pool2, pool2), Streams(streams, streams, streams, streams), P(d),
                     layout)

    def weight_specs(self, weights: Weights, config: ModelConfig) -> Weights:
        """PartitionSpecs of the weights as `kvjax.sharding.weight_shardings` places them."""
        from kvjax.sharding import weight_shardings

        specs = jax.tree_util.tree_map(lambda s: s.spec, weight_shardings(config, self.mesh))
        if weights.per_layer:  # the same specs without the leading [L] axis, once per layer
            one = jax.tree_util.tree_map(lambda s: P(*s[1:]), specs.layers)
            specs = dataclasses.replace(specs, layers=tuple(one for _ in weights.layers))
        return specs

    def shard(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    # -- the three programs that touch the cache, each run per device
    def prefill(self, run, weights, config, plan, tokens, lengths, policy, rng):
        """run(weights, tokens, lengths, policy, rng, config) -> (cache, logits [B, V]), per device."""
        b = self.batch
        fn = lambda w, t, n, pol, r: run(w, t, n, pol, r, self.local_config(config))  # noqa: E731
        specs = (self.weight_specs(weights, config), b(2), b(1), self.replicated(policy), P())
        return self.shard(fn, specs, (self.cache_specs(plan.layout), b(2)))(weights, tokens, lengths, policy, rng)

    def decode(self, step, weights, config, cache, tokens, policy, active):
        """step(weights, cache, tokens, policy, active, config) -> (cache, logits [B, V])."""
        b = self.batch
        fn = lambda w, c, t, pol, a: step(w, c, t, pol, a, self.local_config(config))  # noqa: E731
        specs = (self.weight_specs(weights, config), self.cache_specs(cache.layout), b(1), self.replicated(policy),
                 b(1))
        return self.shard(fn, specs, (self.cache_specs(cache.layout), b(2)))(weights, cache, tokens, policy, active)

    def relayout(self, move, cache, held, plan):
        """move(cache, held) -> cache in `plan`'s layout, each device its own part."""
        d, m = self._axis(DATA), self._axis(MODEL)
        return self.shard(move, (self.cache_specs(cache.layout), P(None, d, m)), self.cache_specs(plan.layout))(
            cache, held)

    def put(self, array, spec: P):
        """A global array from the same host value on every process (multi-host safe)."""
        sharding = NamedSharding(self.mesh, spec)
        array = jnp.asarray(array) if not hasattr(array, "shape") else array
        return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    def gathered(self, tree):
        """Every leaf replicated on every device (so each process can read it)."""
        rep = NamedSharding(self.mesh, P())
        return jax.jit(lambda t: t, out_shardings=jax.tree_util.tree_map(lambda _: rep, tree))(tree)


def mesh_stats(par: Parallel, params, cache: Cache) -> dict:
    """How one generation was split: the mesh, each device's KV heads and the cache bytes it holds."""
    per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(cache))
    return {"data": par.data, "model": par.model, "kv_heads_per_device": params.config.num_kv_heads // par.model,
            "kv_head_replicas": params.kv_replicas, "cache_bytes_per_device": int(per_device),
            "pool_sharding": str(cache.pools.k.sharding.spec)}


def check_heads(config: ModelConfig, model: int) -> None:
    """InputError unless `model` divides the query and KV heads (replicate KV heads first when the
    model axis is a multiple of their count)."""
    if config.num_kv_heads % model or config.num_heads % model:
        hint = (f"; with model={model} > {config.num_kv_heads} KV heads, load with the mesh so the KV heads are "
                "replicated" if model % config.num_kv_heads == 0 else "")
        raise InputError(f"mesh axis 'model' of size {model} must divide the model's {config.num_heads} query heads "
                         f"and {config.num_kv_heads} KV heads{hint}; or use a model axis of "
                         f"{_divisors(config.num_kv_heads, config.num_heads)}")


def _divisors(kv: int, heads: int) -> str:
    return ", ".join(str(m) for m in range(1, kv + 1) if kv % m == 0 and heads % m == 0)


def replicate_kv_heads(params, model: int):
    """Params whose KV heads are each repeated model / KV times (the key and value projections'
    columns), so a model axis larger than the KV-head count splits them evenly, as serving engines
    do; the cache then holds each replica's stream on its own device."""
    config = params.config
    kv = config.num_kv_heads
    if model <= kv or model % kv or config.num_heads % model:
        return params
    r, d = model // kv, config.head_dim

    def widen(w):  # [..., KV * D] -> [..., KV * r * D], each head's block repeated r times
        if w is None:
            return None
        lead = w.shape[:-1]
        return jnp.repeat(w.reshape(*lead, kv, d), r, axis=-2).reshape(*lead, kv * r * d)

    def layer(lw):
        return dataclasses.replace(lw, wk=widen(lw.wk), wv=widen(lw.wv), bk=widen(lw.bk), bv=widen(lw.bv))

    w = params.weights
    layers = tuple(layer(lw) for lw in w.layers) if w.per_layer else layer(w.layers)
    return dataclasses.replace(params, config=dataclasses.replace(config, num_kv_heads=kv * r),
                               weights=dataclasses.replace(w, layers=layers), kv_replicas=params.kv_replicas * r)


def shard_params(params, mesh: Mesh):
    """Params placed on `mesh` for sharded prefill and decode (kvjax.shard): KV heads replicated when
    the model axis is a multiple of their count, the weights split by `kvjax.sharding`'s rules, each
    device's part taken from the same host value on every process (multi-host safe)."""
    from kvjax.models import unpack_layers, unstack_layers
    from kvjax.sharding import auto_mesh, weight_shardings

    par = Parallel.of(mesh)
    mesh = auto_mesh(mesh)
    if params.weights.packed:  # the sharding rules split q, k, v and gate, up by their own columns
        params = dataclasses.replace(params, weights=unpack_layers(params.weights, params.config))
    per_layer = params.weights.per_layer
    if per_layer:  # placed stacked, as the sharding rules are written, then split again
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *params.weights.layers)
        params = dataclasses.replace(params, weights=dataclasses.replace(params.weights, layers=stacked))
    params = replicate_kv_heads(params, par.model)
    check_heads(params.config, par.model)
    host = jax.tree_util.tree_map(lambda a: jax.device_get(a), params.weights)
    shardings = weight_shardings(params.config, mesh)
    placed = jax.tree_util.tree_map(
        lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]), host, shardings)
    if per_layer:
        placed = unstack_layers(placed)
    return dataclasses.replace(params, weights=placed, mesh=mesh)
