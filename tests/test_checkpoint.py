"""Loading: sharded safetensors indexes, bfloat16, Orbax save/restore, loading onto a mesh."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.io.safetensors import SafetensorsFile
from test_generate import _tiny_params


def _write_hf(params, directory, shards: int = 1):
    """Write tiny params as an HF checkpoint (safetensors, [out, in] weights), optionally sharded."""
    from safetensors.numpy import save_file

    cfg = params.config
    w = params.weights
    tensors = {"model.embed_tokens.weight": np.asarray(w.embed), "model.norm.weight": np.asarray(w.final_norm),
               "lm_head.weight": np.asarray(w.lm_head).T}
    names = dict(attn_norm="input_layernorm.weight", wq="self_attn.q_proj.weight", wk="self_attn.k_proj.weight",
                 wv="self_attn.v_proj.weight", wo="self_attn.o_proj.weight",
                 mlp_norm="post_attention_layernorm.weight", w_gate="mlp.gate_proj.weight",
                 w_up="mlp.up_proj.weight", w_down="mlp.down_proj.weight")
    for i in range(cfg.num_layers):
        for field, name in names.items():
            x = np.asarray(getattr(w.layers, field)[i])
            tensors[f"model.layers.{i}.{name}"] = x.T if x.ndim == 2 else x
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    hf_cfg = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = keys[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, directory / fname)
        weight_map |= {k: fname for k in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def params():
    return _tiny_params()


def _logits(p, n=12):
    return np.asarray(kvjax.forward(p, np.arange(1, n + 1, dtype=np.int32)[None]))


def test_sharded_index_loads_like_a_single_file(tmp_path, params):
    a, b = tmp_path / "single", tmp_path / "sharded"
    a.mkdir(), b.mkdir()
    pa = kvjax.load(_write_hf(params, a), dtype=jnp.float32)
    pb = kvjax.load(_write_hf(params, b, shards=3), dtype=jnp.float32)
    np.testing.assert_array_equal(_logits(pa), _logits(pb))
    np.testing.assert_allclose(_logits(pa), _logits(params), atol=1e-5)


def test_missing_shard_is_named(tmp_path, params):
    _write_hf(params, tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(kvjax.CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        kvjax.load(tmp_path)


def test_bfloat16_load_and_safetensors_bf16_reader(tmp_path, params):
    _write_hf(params, tmp_path)
    p = kvjax.load(tmp_path, dtype=jnp.bfloat16)
    assert p.weights.layers.wq.dtype == jnp.bfloat16
    np.testing.assert_allclose(_logits(p), _logits(params), atol=0.15)
    from safetensors.numpy import save_file
    import ml_dtypes

    x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    save_file({"x": x}, tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "bf.safetensors").read("x"), x)


def test_orbax_save_and_restore_round_trip(tmp_path, params):
    kvjax.save(params, tmp_path / "saved")
    restored = kvjax.load(tmp_path / "saved")
    assert restored.config == params.config
    np.testing.assert_array_equal(_logits(restored), _logits(params))


def test_load_onto_a_mesh_shards_kv_heads_over_model_axis(tmp_path, params):
    _write_hf(params, tmp_path)
    code = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, numpy as np, kvjax
        mesh = jax.make_mesh((1, 2), ("data", "model"))
        p = kvjax.load({str(tmp_path)!r}, dtype="float32", mesh=mesh)
        wk = p.weights.layers.wk
        assert wk.sharding.spec[2] == "model", wk.sharding
        assert len(wk.addressable_shards) == 2 and wk.addressable_shards[0].data.shape[2] == wk.shape[2] // 2
        out = kvjax.generate(p, [np.arange(1, 20, dtype=np.int32)], max_new_tokens=4)
        print("OK", out.tokens)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "OK" in res.stdout, res.stderr[-3000:]
