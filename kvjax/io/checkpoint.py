"""Loading Hugging Face checkpoints into `Params`, and saving/restoring converted params with Orbax."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models import LayerWeights, ModelConfig, Weights, unpack_layers
from kvjax.models.config import ConfigError
from kvjax.errors import bad_input
from kvjax.io.safetensors import CheckpointError, TensorStore
from kvjax.io.tokenizer import Tokenizer, load_tokenizer

KVJAX_MARKER = "kvjax_params.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclasses.dataclass(frozen=True)
class Params:
    """Everything `generate` needs: the static config, the weight pytree and the tokenizer."""

    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer | None
    source: str = ""
    #: the jax.sharding.Mesh ("data", "model") the weights are placed on, or None (kvjax.mesh)
    mesh: Any = None
    #: copies of each of the checkpoint's KV heads (a model axis larger than their count, kvjax.mesh)
    kv_replicas: int = 1

    @property
    def dtype(self):
        return self.weights.embed.dtype

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.weights))


def _hf_layer_tensors(config: ModelConfig, i: int) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """Field of LayerWeights -> (HF tensor name, HF shape, transpose to input-major)."""
    e, f = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    p = f"model.layers.{i}."
    t = {
        "attn_norm": (p + "input_layernorm.weight", (e,), False),
        "wq": (p + "self_attn.q_proj.weight", (hq, e), True),
        "wk": (p + "self_attn.k_proj.weight", (hkv, e), True),
        "wv": (p + "self_attn.v_proj.weight", (hkv, e), True),
        "wo": (p + "self_attn.o_proj.weight", (e, hq), True),
        "mlp_norm": (p + "post_attention_layernorm.weight", (e,), False),
        "w_gate": (p + "mlp.gate_proj.weight", (f, e), True),
        "w_up": (p + "mlp.up_proj.weight", (f, e), True),
        "w_down": (p + "mlp.down_proj.weight", (e, f), True),
    }
    if config.qkv_bias:
        t |= {
            "bq": (p + "self_attn.q_proj.bias", (hq,), False),
            "bk": (p + "self_attn.k_proj.bias", (hkv,), False),
            "bv": (p + "self_attn.v_proj.bias", (hkv,), False),
        }
    if config.o_bias:
        t["bo"] = (p + "self_attn.o_proj.bias", (e,), False)
    if config.mlp_bias:
        t |= {
            "b_gate": (p + "mlp.gate_proj.bias", (f,), False),
            "b_up": (p + "mlp.up_proj.bias", (f,), False),
            "b_down": (p + "mlp.down_proj.bias", (e,), False),
        }
    return t


def load_hf_weights(directory, config: ModelConfig, dtype=jnp.bfloat16, shardings=None) -> Weights:
    """Read a HF Llama/Mistral/Qwen2 checkpoint tensor by tensor into `Weights` of `dtype`.

    `shardings`, if given, is a `Weights`-shaped pytree of `jax.sharding.Sharding` (see
    `kvjax.sharding.weight_shardings`); each stacked tensor is placed directly with it.
    """
    store = TensorStore(directory)
    np_dtype = jnp.dtype(dtype)

    def put(x: np.ndarray, sharding):
        if sharding is None:
            return jnp.asarray(x)
        # each device's part from the host value (every process reads the same files: multi-host safe)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    layer_sh = shardings.layers if shardings is not None else None
    fields: dict[str, Any] = {}
    for field in _hf_layer_tensors(config, 0):
        stacked = []
        for i in range(config.num_layers):
            name, shape, transpose = _hf_layer_tensors(config, i)[field]
            x = store.read(name, shape)
            stacked.append(np.asarray(x.T if transpose else x, dtype=np_dtype))
        fields[field] = put(np.stack(stacked), getattr(layer_sh, field) if layer_sh is not None else None)
    v, e = config.vocab_size, config.hidden_size
    embed = store.read("model.embed_tokens.weight", (v, e)).astype(np_dtype)
    lm_head = None
    if not config.tie_word_embeddings:
        lm_head = put(
            np.asarray(store.read("lm_head.weight", (v, e)).T, dtype=np_dtype),
            shardings.lm_head if shardings is not None else None,
        )
    return Weights(
        embed=put(embed, shardings.embed if shardings is not None else None),
        layers=LayerWeights(**fields),
        final_norm=put(store.read("model.norm.weight", (e,)).astype(np_dtype),
                       shardings.final_norm if shardings is not None else None),
        lm_head=lm_head,
    )


def is_kvjax_dir(directory) -> bool:
    return (pathlib.Path(directory) / KVJAX_MARKER).exists()


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype):
    """The weights' dtype as a numpy dtype, or None (InputError for anything but DTYPES)."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise bad_input("dtype", dtype, f"one of {DTYPES} (or None: the checkpoint's own)")
    return dt


def load_checkpoint(directory, dtype=None, mesh=None) -> Params:
    """Load a HF checkpoint directory or a directory written by `save_params`, in `dtype` (None:
    bfloat16 for a HF checkpoint, the saved dtype for a saved one)."""
    dtype = check_dtype(dtype)
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if is_kvjax_dir(directory):
        params = restore_params(directory, mesh=mesh)
        if dtype is not None and params.dtype != dtype:
            params = dataclasses.replace(params, weights=jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                                                                 params.weights))
        return params
    dtype = jnp.bfloat16 if dtype is None else dtype
    config = ModelConfig.from_file(directory)
    shardings = None
    if mesh is not None:
        from kvjax.sharding import weight_shardings

        shardings = weight_shardings(config, mesh)
    weights = load_hf_weights(directory, config, dtype, shardings)
    return Params(config, weights, load_tokenizer(directory), source=str(directory), mesh=mesh)


def save_params(params: Params, directory) -> pathlib.Path:
    """Write converted params (Orbax), their config and tokenizer files to `directory`."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    weights = unpack_layers(params.weights, params.config)
    if weights.per_layer:  # saved stacked and unpacked, whatever the in-memory layout
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *weights.layers)
        weights = dataclasses.replace(weights, layers=stacked)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "weights", weights, force=True)
    if params.source:
        for name in TOKENIZER_FILES:
            src = pathlib.Path(params.source) / name
            if src.exists():
                shutil.copy(src, directory / name)
    meta = {"config": params.config.to_dict(), "dtype": str(params.dtype), "source": params.source}
    (directory / KVJAX_MARKER).write_text(json.dumps(meta, indent=1))
    return directory


def restore_params(directory, mesh=None) -> Params:
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).resolve()
    meta = json.loads((directory / KVJAX_MARKER).read_text())
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{directory / KVJAX_MARKER} is malformed: {e}") from None
    abstract = _abstract_weights(config, jnp.dtype(meta["dtype"]), mesh)
    with ocp.StandardCheckpointer() as ckpt:
        weights = ckpt.restore(directory / "weights", abstract)
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer.json").exists() else None
    return Params(config, weights, tokenizer, source=str(directory), mesh=mesh)


def _abstract_weights(config: ModelConfig, dtype, mesh) -> Weights:
    """ShapeDtypeStructs of the Weights a config implies (the Orbax restore target)."""
    shardings = None
    if mesh is not None:
        from kvjax.sharding import weight_shardings

        shardings = weight_shardings(config, mesh)
    shapes = {
        f: (config.num_layers,) + (s[::-1] if transpose else s)
        for f, (_, s, transpose) in _hf_layer_tensors(config, 0).items()
    }
    sh_layers = shardings.layers if shardings is not None else None

    def sds(shape, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    v, e = config.vocab_size, config.hidden_size
    return Weights(
        embed=sds((v, e), shardings.embed if shardings else None),
        layers=LayerWeights(
            **{f: sds(s, getattr(sh_layers, f) if sh_layers is not None else None) for f, s in shapes.items()}
        ),
        final_norm=sds((e,)),
        lm_head=None if config.tie_word_embeddings else sds((e, v), shardings.lm_head if shardings else None),
    )
