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
replicated (`replicate_kv_heads`, as serving engines do); other mismatches are an error that says
which mesh would work.
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
        """The config one device's program sees: its query and KV heads, and the axis to reduce over."""
        check_heads(config, self.model)
        m = self.model
        return dataclasses.replace(config, num_heads=config.num_heads // m, num_kv_heads=config.num_kv_heads // m,
                                   model_axis=MODEL if m > 1 else None)

    def local_layout(self, layout: Layout) -> Layout:
        return dataclasses.replace(layout, shards=self.model)

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

    def put(self, array, spec: P):
        """A global array from the same host value on every process (multi-host safe)."""
        sharding = NamedSharding(self.mesh, spec)
        array = jnp.asarray(array) if not hasattr(array, "shape") else array
        return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    def gathered(self, tree):
        """Every leaf replicated on every device (so each process can read it)."""
        rep = NamedSharding(self.mesh, P())
        return jax.jit(lambda t: t, out_shardings=jax.tree_util.tree_map(lambda _: rep, tree))(tree)


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
