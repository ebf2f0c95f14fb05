"""Flax NNX modules over kvjax's Llama-family weights, for fine-tuning with optax.

The modules hold exactly the arrays of a `kvjax.Params` as `nnx.Param`s, laid out like the
`Weights` pytree (same field names, same shapes, same dtypes, stacked `[L, ...]` or per-layer), and
their `__call__` runs kvjax's own `forward`: nothing of the math is written twice.

    model = LlamaForCausalLM.from_pretrained("path/to/hf_checkpoint", dtype=jnp.float32)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(loss_fn)(model)      # loss_fn calls model(tokens) -> logits
    optimizer.update(model, grads)
    kvjax.generate(model.to_params(), prompt, policy=kvjax.policies.SnapKV(budget=128))

`from_params` shares the Params' buffers (no copy): a training step that donates the model's
buffers deletes those of the Params it came from; use `to_params()` afterwards.

Importing this module imports flax; nothing in kvjax imports it, so flax stays a lazy dependency.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.io.checkpoint import Params
from kvjax.io.tokenizer import Tokenizer

from kvjax.models import LayerWeights, ModelConfig, Weights, forward, unpack_layers

_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerWeights))
# nnx.List (flax >= 0.12) marks a list of modules as pytree data; older flax takes a plain list
_ModuleList = getattr(nnx, "List", list)


def _value(variable: nnx.Variable):
    """The array a Variable holds (`get_value` in flax >= 0.12, where `.value` is deprecated)."""
    get = getattr(variable, "get_value", None)
    return get() if get is not None else variable.value


def _param(x):
    return None if x is None else nnx.Param(x)


def _layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """LayerWeights field -> shape of one layer (input-major projections), for the config's biases."""
    e, f = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = dict(attn_norm=(e,), wq=(e, hq), wk=(e, hkv), wv=(e, hkv), wo=(hq, e), mlp_norm=(e,),
                  w_gate=(e, f), w_up=(e, f), w_down=(f, e))
    if config.qkv_bias:
        shapes |= dict(bq=(hq,), bk=(hkv,), bv=(hkv,))
    if config.o_bias:
        shapes |= dict(bo=(e,))
    if config.mlp_bias:
        shapes |= dict(b_gate=(f,), b_up=(f,), b_down=(e,))
    return shapes


def _check_weights(weights: Weights, config: ModelConfig) -> None:
    """Every leaf has the shape the config implies; a clear error names the first one that does not."""
    v, e, n = config.vocab_size, config.hidden_size, config.num_layers
    expected = [("embed", weights.embed, (v, e)), ("final_norm", weights.final_norm, (e,))]
    if (weights.lm_head is None) != config.tie_word_embeddings:
        raise ValueError(
            f"params.weights.lm_head is {'None' if weights.lm_head is None else 'present'} but the config has "
            f"tie_word_embeddings={config.tie_word_embeddings}"
        )
    if weights.lm_head is not None:
        expected.append(("lm_head", weights.lm_head, (e, v)))
    if weights.per_layer:
        if len(weights.layers) != n:
            raise ValueError(f"params.weights.layers holds {len(weights.layers)} layers, the config says {n}")
        layers = [(f"layers[{i}]", lw, ()) for i, lw in enumerate(weights.layers)]
    else:
        layers = [("layers", weights.layers, (n,))]
    shapes = _layer_shapes(config)
    for name, lw, lead in layers:
        for field in _LAYER_FIELDS:
            x = getattr(lw, field)
            if field not in shapes:
                if x is not None:
                    raise ValueError(f"params.weights.{name}.{field} is set but the config has no such bias")
                continue
            expected.append((f"{name}.{field}", x, lead + shapes[field]))
    for name, x, shape in expected:
        if x is None or tuple(x.shape) != shape:
            got = None if x is None else tuple(x.shape)
            raise ValueError(f"params.weights.{name} has shape {got}, the config implies {shape}")


class DecoderLayer(nnx.Module):
    """One decoder layer's weights as `nnx.Param`s, named as `LayerWeights`' fields; or, when built
    from stacked LayerWeights, all L layers at once (every Param with a leading `[L]` axis).
    Unused biases are None."""

    def __init__(self, weights: LayerWeights):
        for field in _LAYER_FIELDS:
            setattr(self, field, _param(getattr(weights, field)))

    def to_layer_weights(self) -> LayerWeights:
        return LayerWeights(**{f: None if getattr(self, f) is None else _value(getattr(self, f))
                               for f in _LAYER_FIELDS})


class CausalLM(nnx.Module):
    """A Llama-family decoder as an NNX module: `embed`, `layers`, `final_norm`, `lm_head` (None
    when tied), as in `Weights`. `layers` is one stacked `DecoderLayer` (scanned in `__call__`) or a
    list of per-layer ones (unrolled), as the params were. `config` and `tokenizer` are static.

    Build with `from_params` or `from_pretrained`; `CausalLM.from_params` picks the subclass from
    `config.model_type`, a subclass accepts only its own model type."""

    model_type: str | None = None

    def __init__(self, config: ModelConfig, weights: Weights, tokenizer: Tokenizer | None = None):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a kvjax.models.ModelConfig, got {type(config).__name__}")
        if not isinstance(weights, Weights):
            raise TypeError(f"weights must be a kvjax.models.Weights, got {type(weights).__name__}")
        if self.model_type is not None and config.model_type != self.model_type:
            raise ValueError(
                f"{type(self).__name__} takes model_type {self.model_type!r}, the config has "
                f"{config.model_type!r}: use {_CLASSES[config.model_type].__name__} or CausalLM.from_params"
            )
        weights = unpack_layers(weights, config)  # packed projections (kvjax.load on GPU) split into their own Params
        _check_weights(weights, config)
        self.config = config
        self.tokenizer = tokenizer
        self.embed = nnx.Param(weights.embed)
        if weights.per_layer:
            self.layers = _ModuleList([DecoderLayer(lw) for lw in weights.layers])
        else:
            self.layers = DecoderLayer(weights.layers)
        self.final_norm = nnx.Param(weights.final_norm)
        self.lm_head = _param(weights.lm_head)

    @property
    def per_layer(self) -> bool:
        """Whether each layer has its own Params (unrolled) rather than one stacked set (scanned)."""
        return not isinstance(self.layers, DecoderLayer)

    # -- conversion -------------------------------------------------------------------------------

    @classmethod
    def from_params(cls, params: Params) -> "CausalLM":
        """The module holding `params.weights` (the same arrays, not copies; packed q|k|v and gate|up
        matrices are split, which copies them)."""
        if not isinstance(params, Params):
            raise TypeError(f"params must be a kvjax.Params, got {type(params).__name__}")
        target = _CLASSES.get(params.config.model_type) if cls is CausalLM else cls
        if target is None:
            raise ValueError(
                f"params.config.model_type is {params.config.model_type!r}; the NNX modules cover "
                f"{', '.join(sorted(_CLASSES))}"
            )
        return target(params.config, params.weights, params.tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype=None, *, mesh=None, per_layer: bool | None = None) -> "CausalLM":
        """Load a Hugging Face checkpoint directory, a directory saved by `kvjax.save`, or an
        embedded model by name, through `kvjax.load` (same arguments; dtype defaults to bfloat16)."""
        from kvjax.api import load

        params = load(path, dtype=jnp.bfloat16 if dtype is None else dtype, mesh=mesh, per_layer=per_layer)
        return cls.from_params(params)

    def to_weights(self) -> Weights:
        """The `Weights` pytree of the current Param values (tracers inside a transform)."""
        if self.per_layer:
            layers = tuple(layer.to_layer_weights() for layer in self.layers)
        else:
            layers = self.layers.to_layer_weights()
        return Weights(
            embed=_value(self.embed),
            layers=layers,
            final_norm=_value(self.final_norm),
            lm_head=None if self.lm_head is None else _value(self.lm_head),
        )

    def to_params(self) -> Params:
        """A `kvjax.Params` of the current weights, for `kvjax.generate` with any policy."""
        return Params(self.config, self.to_weights(), self.tokenizer, source="flax.nnx")

    # -- compute ----------------------------------------------------------------------------------

    def __call__(self, tokens: jax.Array, lengths: jax.Array | None = None, *, chunk: int = 512) -> jax.Array:
        """Logits of every position, no cache: `kvjax.models.forward` on this module's weights.
        tokens [B, T] int, lengths [B] (right padding; default T) -> [B, T, V] float32."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        return forward(self.to_weights(), self.config, tokens, lengths, chunk=chunk)


class LlamaForCausalLM(CausalLM):
    """Llama 2 / 3 / 3.1 / 3.2 (model_type "llama")."""

    model_type = "llama"


class MistralForCausalLM(CausalLM):
    """Mistral (model_type "mistral"; sliding-window attention when the config sets one)."""

    model_type = "mistral"


class Qwen2ForCausalLM(CausalLM):
    """Qwen2 / Qwen2.5 (model_type "qwen2": biases on q, k and v)."""

    model_type = "qwen2"


#: config.model_type -> its module class (the config names the type as a string)
_CLASSES: dict[str, type[CausalLM]] = {c.model_type: c for c in (LlamaForCausalLM, MistralForCausalLM,
                                                                   Qwen2ForCausalLM)}
