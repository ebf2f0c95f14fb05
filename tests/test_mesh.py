"""The cache shards with the mesh: sequences over `data`, KV heads over `model`; the tokens equal one
device's (f32, greedy), the pool's sharding is (data, model) and each device holds its share of the
bytes. Meshes are forced CPU devices in a subprocess (XLA_FLAGS), and two processes on localhost
rehearse a multi-host run (jax.distributed with CPU collectives)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

TESTS = pathlib.Path(__file__).resolve().parent

pytestmark = pytest.mark.slow

_SETUP = """
import os, sys, json, dataclasses
sys.path.insert(0, {tests!r})
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import kvjax
from kvjax import policies as P
from test_generate import _tiny_params
params = _tiny_params(num_attention_heads=8, num_key_value_heads=4)
prompts = [np.random.default_rng(i).integers(0, 256, n).astype(np.int32) for i, n in enumerate((150, 90, 120))]
POLICIES = {{"snapkv": lambda m: P.SnapKV(budget=32, window=8),
            "adakv": lambda m: P.AdaKV(P.SnapKV(budget=32, window=8), head_groups=m),
            "cake": lambda m: P.CAKE(budget=32, window=8),
            "h2o": lambda m: P.H2O(budget=32, recent=8)}}
"""


def _run(code: str, devices: int, env_extra=None, timeout=420):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1",
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def mesh_results():
    code = _SETUP.format(tests=str(TESTS)) + textwrap.dedent("""
        from kvjax.cache import kept_positions
        rows = []
        for shape in [(1, 2), (2, 2)]:  # (2, 2) splits the sequences over `data` too
            mesh = jax.make_mesh(shape, ("data", "model"))
            sp = kvjax.shard(params, mesh)
            for name, make in POLICIES.items():
                # one device with Ada-KV's trades kept inside each model shard's heads, as on the mesh
                ref = kvjax.generate(params, prompts, policy=make(shape[1]), max_new_tokens=6)
                out = kvjax.generate(sp, prompts, policy=make(1), max_new_tokens=6)
                kr, ko = kept_positions(ref.cache), kept_positions(out.cache)
                kept = all(np.array_equal(kr[l][b][h], ko[l][b][h]) for l in range(2) for b in range(3) for h in range(4))
                leaves = jax.tree_util.tree_leaves(out.cache.pools)
                total = sum(x.nbytes for x in leaves)
                device0 = sum(x.addressable_shards[0].data.nbytes for x in leaves)
                rows.append(dict(shape=shape, policy=name, same=out.tokens == ref.tokens, kept=kept,
                                 spec=[str(a) for a in out.cache.pools.k.sharding.spec], pool_bytes=total,
                                 pool_bytes_device0=device0, stats=out.stats["mesh"]))
        try:  # 3 KV heads cannot split over a model axis of 2
            kvjax.shard(_tiny_params(num_attention_heads=6, num_key_value_heads=3), jax.make_mesh((1, 2), ("data", "model")))
        except kvjax.errors.InputError as e:
            rows.append(dict(error=str(e)))
        two = _tiny_params(num_attention_heads=8, num_key_value_heads=2)
        sp = kvjax.shard(two, jax.make_mesh((1, 4), ("data", "model")))  # 2 KV heads, each replicated twice
        out = kvjax.generate(sp, prompts, max_new_tokens=6)  # the full cache: exactly one device's tokens
        snap = kvjax.generate(sp, prompts, policy=P.SnapKV(budget=32, window=8), max_new_tokens=6)
        rows.append(dict(replicated=out.tokens == kvjax.generate(two, prompts, max_new_tokens=6).tokens,
                         kv_heads=sp.config.num_kv_heads, stats=out.stats["mesh"], compressed_rows=len(snap.tokens)))
        from kvjax.models import pack_layers, unstack_layers
        packed = dataclasses.replace(params, weights=pack_layers(unstack_layers(params.weights)))
        spk = kvjax.shard(packed, jax.make_mesh((1, 2), ("data", "model")))  # unpacked to be split
        snapkv = P.SnapKV(budget=32, window=8)
        rows.append(dict(packed_same=kvjax.generate(spk, prompts, policy=snapkv, max_new_tokens=6).tokens
                         == kvjax.generate(params, prompts, policy=snapkv, max_new_tokens=6).tokens,
                         packed_after_shard=spk.weights.packed))
        try:
            kvjax.load("/never/read", mesh=jax.make_mesh((1, 2), ("data", "model")), packed=True)
        except kvjax.errors.InputError as e:
            rows.append(dict(packed_error=str(e)))
        print("RESULT", json.dumps(rows))
    """)
    res = _run(code, devices=4)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("shape", [[1, 2], [2, 2]], ids=["model2", "data2-model2"])
@pytest.mark.parametrize("policy", ["snapkv", "adakv", "cake", "h2o"])
def test_a_mesh_gives_one_devices_tokens_and_splits_the_pool(mesh_results, shape, policy):
    row = next(r for r in mesh_results if r.get("shape") == shape and r.get("policy") == policy)
    assert row["same"] and row["kept"]
    data, model = shape
    spec = (row["spec"] + ["None", "None"])[:2]  # a PartitionSpec drops trailing Nones
    assert spec == [("data" if data > 1 else "None"), ("model" if model > 1 else "None")]
    # every device holds its part of the pool: the total divided by data x model
    assert row["pool_bytes_device0"] * data * model == row["pool_bytes"]
    assert row["stats"]["kv_heads_per_device"] == 4 // model


def test_kv_heads_are_replicated_when_the_model_axis_is_a_multiple_and_otherwise_an_error(mesh_results):
    error = next(r["error"] for r in mesh_results if "error" in r)
    assert error.startswith("mesh axis 'model' of size 2 must divide the model's 6 query heads and 3 KV heads")
    rep = next(r for r in mesh_results if "replicated" in r)
    assert rep["replicated"] and rep["kv_heads"] == 4 and rep["compressed_rows"] == 3
    assert rep["stats"]["kv_heads_per_device"] == 1 and rep["stats"]["kv_head_replicas"] == 2


def test_packed_params_are_unpacked_to_shard_and_cannot_be_loaded_packed_on_a_mesh(mesh_results):
    row = next(r for r in mesh_results if "packed_same" in r)
    assert row["packed_same"] and not row["packed_after_shard"]
    error = next(r["packed_error"] for r in mesh_results if "packed_error" in r)
    assert "packed" in error and "with a mesh" in error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_tokens_as_one(tmp_path):
    """A (2, 2) mesh over 2 processes x 2 CPU devices (jax.distributed, gloo collectives)."""
    port = _free_port()
    start = textwrap.dedent(f"""
        import os, jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                                   process_id=int(os.environ["KVJAX_TEST_PROCESS"]))
    """)
    code = start + _SETUP.format(tests=str(TESTS)) + textwrap.dedent("""
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        mesh = jax.make_mesh((2, 2), ("data", "model"))
        sp = kvjax.shard(params, mesh)
        out = kvjax.generate(sp, prompts, policy=P.CAKE(budget=32, window=8), max_new_tokens=6)
        print("TOKENS", json.dumps(out.tokens), flush=True)
        jax.distributed.shutdown()
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, KVJAX_TEST_PROCESS=str(i))) for i in range(2)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=420)
            assert p.returncode == 0, stderr[-4000:]
            outs.append(json.loads(next(l for l in stdout.splitlines() if l.startswith("TOKENS "))[len("TOKENS "):]))
    finally:
        for p in procs:
            p.kill()
    one = _run(_SETUP.format(tests=str(TESTS)) + textwrap.dedent("""
        out = kvjax.generate(params, prompts, policy=P.CAKE(budget=32, window=8), max_new_tokens=6)
        print("TOKENS", json.dumps(out.tokens))
    """), devices=1)
    assert one.returncode == 0, one.stderr[-3000:]
    ref = json.loads(next(l for l in one.stdout.splitlines() if l.startswith("TOKENS "))[len("TOKENS "):])
    assert outs[0] == outs[1] == ref
