"""Shared pieces of the full-model benchmarks (decode.py, prefill.py, peer_kvpress.py).

- `llama31_8b_config()` / `tiny_config()`: the model shape (Llama-3.1-8B, or a miniature for CPU).
- `random_weights(config, dtype, seed)`: a `kvjax.models.Weights` pytree of random values built
  on the device in one jitted call (no checkpoint; speed does not depend on the values).
- `weight_read_bytes(weights)`: bytes a decode step reads from the weights (every matrix once;
  the embedding table is only gathered, one row per sequence).
- `copy_bandwidth()` / `read_bandwidth()`: the device's measured copy (x + 1, read + write
  counted) and read (sum) bandwidths, timed as device loops so dispatch is amortised.
- `device_meta()`: device kind, platform, JAX/jaxlib/Python versions.
"""

from __future__ import annotations

import os
import pathlib
import platform
import statistics
import sys
import time

# let a single process use nearly the whole accelerator (the default preallocates 75%)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo root, if kvjax is not installed

LLAMA31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
    max_position_embeddings=131072 + 4096, tie_word_embeddings=False, bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
)

#: a miniature with the same structure (GQA 4, head_dim 64) for checking the scripts on CPU
TINY = dict(LLAMA31_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def llama31_8b_config():
    from kvjax.models import ModelConfig

    return ModelConfig.from_hf_dict(LLAMA31_8B)


def tiny_config():
    from kvjax.models import ModelConfig

    return ModelConfig.from_hf_dict(TINY)


def hf_config_dict(tiny: bool) -> dict:
    """The same shape as a transformers LlamaConfig dict (for the kvpress peer)."""
    d = dict(TINY if tiny else LLAMA31_8B)
    return d


def random_weights(config, dtype=jnp.bfloat16, seed: int = 0, unstacked: bool = False, packed: bool = False):
    """Random weights with the config's shapes, created on the default device in one jitted call.

    Projections ~ N(0, 1/fan_in) so activations keep a sane scale; norms are 1. `unstacked`:
    `layers` is a tuple of per-layer LayerWeights (separate buffers) instead of stacked [L, ...];
    `packed`: per-layer and packed by `kvjax.models.pack_layers`, as `kvjax.load` leaves them on GPU."""
    from kvjax.models import LayerWeights, Weights, pack_layers

    unstacked = unstacked or packed

    e, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    hq = config.num_heads * config.head_dim
    hkv = config.num_kv_heads * config.head_dim
    v = config.vocab_size

    def rnd(keys, *shape, fan_in):
        return (jax.random.normal(next(keys), shape, dtype) * (fan_in ** -0.5)).astype(dtype)

    def layer_weights(keys, *lead):
        return LayerWeights(
            attn_norm=jnp.ones(lead + (e,), dtype), wq=rnd(keys, *lead, e, hq, fan_in=e),
            wk=rnd(keys, *lead, e, hkv, fan_in=e), wv=rnd(keys, *lead, e, hkv, fan_in=e),
            wo=rnd(keys, *lead, hq, e, fan_in=hq), mlp_norm=jnp.ones(lead + (e,), dtype),
            w_gate=rnd(keys, *lead, e, f, fan_in=e), w_up=rnd(keys, *lead, e, f, fan_in=e),
            w_down=rnd(keys, *lead, f, e, fan_in=f),
        )

    @jax.jit
    def build(key):
        keys = iter(jax.random.split(key, 16))
        layers = None if unstacked else layer_weights(keys, n)
        return Weights(embed=rnd(keys, v, e, fan_in=1), layers=layers, final_norm=jnp.ones((e,), dtype),
                       lm_head=rnd(keys, e, v, fan_in=e))

    w = jax.block_until_ready(build(jax.random.key(seed)))
    if unstacked:
        # one layer at a time: no stacked copy ever exists (it would fragment the allocator)
        one = jax.jit(lambda key: layer_weights(iter(jax.random.split(key, 16))))
        layers = tuple(jax.block_until_ready(one(jax.random.fold_in(jax.random.key(seed + 1), i))) for i in range(n))
        w = Weights(embed=w.embed, layers=layers, final_norm=w.final_norm, lm_head=w.lm_head)
    if packed:
        w = pack_layers(w, consume=True)
    return w


def weight_bytes(weights) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(weights)))


def weight_read_bytes(weights) -> int:
    """Bytes one decode step reads from the weights: everything but the embedding table."""
    return weight_bytes(weights) - int(weights.embed.nbytes)


def _device_loop_seconds(fn, x, iters: int, reps: int) -> float:
    """Median seconds of one `fn` application, from a jitted fori_loop of `iters` applications."""
    f = jax.jit(lambda a: jax.lax.fori_loop(0, iters, lambda i, c: fn(c), a), donate_argnums=0)
    x = jax.block_until_ready(f(x))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / iters


def copy_bandwidth(n_bytes: int = 2 << 30, iters: int = 10, reps: int = 5) -> float:
    """Copy bandwidth in bytes/s: `x + 1` over a bf16 array of n_bytes (read + write counted), as
    benchmarks/kernels_gpu.py measures it, but timed over `iters` back-to-back applications."""
    x = jnp.zeros((n_bytes // 2,), jnp.bfloat16)
    return 2 * n_bytes / _device_loop_seconds(lambda a: a + 1, x, iters, reps)


def read_bandwidth(n_bytes: int = 2 << 30, iters: int = 10, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: a float32 sum over a bf16 array (the result feeds the next
    iteration, so XLA cannot hoist the read out of the loop)."""
    x = jnp.zeros((n_bytes // 2,), jnp.bfloat16)

    def step(a):
        s = jnp.sum(a, dtype=jnp.float32)
        return a.at[0].set((s * 0).astype(a.dtype))

    return n_bytes / _device_loop_seconds(step, x, iters, reps)


def matmul_flops(n: int = 8192, iters: int = 10, reps: int = 5) -> float:
    """Dense bf16 matmul throughput in FLOP/s ([n, n] @ [n, n], float32 accumulation, bf16 out)."""
    x = jnp.ones((n, n), jnp.bfloat16) * 0.01
    w = jnp.ones((n, n), jnp.bfloat16) * 0.01
    sec = _device_loop_seconds(lambda a: (a @ w).astype(a.dtype), x, iters, reps)
    return 2 * n ** 3 / sec


def jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def device_meta() -> dict:
    dev = jax.devices()[0]
    stats = {}
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001
        pass
    return dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, jaxlib=jaxlib_version(),
                python=platform.python_version(), device_bytes_limit=stats.get("bytes_limit"),
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), xla_flags=os.environ.get("XLA_FLAGS"))


def device_slug(kind: str | None = None) -> str:
    """A file-name tag for the device (or for a recorded `device_kind`): 'h100', 'h200', 'cpu', ..."""
    if kind is None:
        dev = jax.devices()[0]
        if dev.platform == "cpu":
            return "cpu"
        kind = dev.device_kind
    kind = kind.lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "b200", "v5e", "v5p", "v6e", "v4"):
        if tag in kind:
            return tag
    return "".join(c if c.isalnum() else "_" for c in kind)[:24]


def fmt(x, f="{:.3f}"):
    return "" if x is None else f.format(x)
