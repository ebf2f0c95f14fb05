"""Sharding rules: logical axes of the weights -> mesh axes ("data", "model").

Query and KV heads (the columns of W_q, W_k, W_v and the rows of W_o), the MLP's hidden columns and
the output vocabulary shard over `model`; sequences over `data`. A weight dimension that the model
axis does not divide stays replicated (an MLP or vocabulary that does not split evenly costs
memory, not correctness); the heads must split evenly (kvjax.mesh checks it, and replicates KV
heads when the model axis is a multiple of their count). The cache's rules are in kvjax.mesh:
pools [B, P, D] over (data, model), streams [L, B, H] over (None, data, model).
"""

from __future__ import annotations

import dataclasses

from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kvjax.models import LayerWeights, ModelConfig, Weights


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axis name (None = replicated)."""

    batch: str | None = "data"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    mlp: str | None = "model"
    vocab: str | None = "model"
    embed: str | None = None


def _axis(mesh: Mesh, name: str | None, size: int) -> str | None:
    if name is None or name not in mesh.shape:
        return None
    return name if size % mesh.shape[name] == 0 else None


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with automatic (compiler-propagated) sharding, which the
    model's einsums need; `jax.make_mesh` may default to explicit axes."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def weight_shardings(config: ModelConfig, mesh: Mesh, rules: Rules = Rules()) -> Weights:
    """A `Weights`-shaped pytree of NamedShardings for `config` on `mesh`."""
    mesh = auto_mesh(mesh)
    heads = _axis(mesh, rules.heads, config.num_heads)
    kv = _axis(mesh, rules.kv_heads, config.num_kv_heads)
    mlp = _axis(mesh, rules.mlp, config.intermediate_size)
    vocab = _axis(mesh, rules.vocab, config.vocab_size)
    s = lambda *spec: NamedSharding(mesh, P(*spec))
    layers = LayerWeights(
        attn_norm=s(None, None),
        wq=s(None, None, heads),
        wk=s(None, None, kv),
        wv=s(None, None, kv),
        wo=s(None, heads, None),
        mlp_norm=s(None, None),
        w_gate=s(None, None, mlp),
        w_up=s(None, None, mlp),
        w_down=s(None, mlp, None),
        bq=s(None, heads) if config.qkv_bias else None,
        bk=s(None, kv) if config.qkv_bias else None,
        bv=s(None, kv) if config.qkv_bias else None,
        bo=s(None, None) if config.o_bias else None,
        b_gate=s(None, mlp) if config.mlp_bias else None,
        b_up=s(None, mlp) if config.mlp_bias else None,
        b_down=s(None, None) if config.mlp_bias else None,
    )
    return Weights(
        embed=s(None, None),
        layers=layers,
        final_norm=s(None),
        lm_head=None if config.tie_word_embeddings else s(None, vocab),
    )


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = Rules()) -> NamedSharding:
    """Shard the leading (batch) axis of an ndim array over `data`."""
    return NamedSharding(mesh, P(rules.batch if rules.batch in mesh.shape else None, *([None] * (ndim - 1))))
