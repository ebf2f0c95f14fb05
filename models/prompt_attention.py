"""Causal self-attention over a prompt, chunked over queries so `[T, T]` never exists at once.

Layout: queries are grouped by KV head (`[B, KV, G, T, D]`) so every matmul is batch-major
(`[B*KV, G*C, D] x [B*KV, D, T]`), which XLA:CPU runs several times faster than a 4-D einsum, and
the cache never has to be expanded to query heads.

Besides the output, the same pass can return the column sums of the softmax probabilities
(`sum_t a[h, t, j]`), which H2O-style scorers need, and the column sums of the squared, group-reduced
probabilities (`sum_t (reduce_g a[g, t, j])^2`), which RoCo's robustness needs; they come out of the
same chunks, with the exact softmax normaliser, at no extra `[T, T]` memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def attention_mask(q_pos, k_pos, lengths, sliding_window: int | None):
    """Which keys each query may see.

    q_pos [C] and k_pos [T] are positions; lengths [B] the valid prompt length per sequence.
    Returns mask [B, C, T] bool.
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        causal &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    valid_key = k_pos[None, :] < lengths[:, None]  # [B, T]
    return causal[None] & valid_key[:, None, :]


def _cudnn_flash_ok(q) -> bool:
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128


def fused_available(q) -> bool:
    """Whether `fused_causal_attention` runs as a fused (flash) kernel here: cuDNN on a GPU, 16-bit
    values, head_dim <= 128. Elsewhere XLA would materialise the [T, T] logits."""
    return _cudnn_flash_ok(q)


def _cudnn_attention_with_stats():
    """jax's cuDNN attention entry point that returns the softmax statistics in float32 ([B, N, T]),
    or None. `jax.nn.dot_product_attention(..., return_residual=True)` casts them to the output's
    dtype: in bfloat16 an lse near 10 is off by up to 0.03, each probability by up to 3%."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    except ImportError:  # private module moved
        return None
    return dot_product_attention, MaskType


def float32_lse_available(q) -> bool:
    """Whether `fused_causal_attention(q, ..., return_lse=True)` gets cuDNN's float32 log-sum-exp."""
    return _cudnn_flash_ok(q) and _cudnn_attention_with_stats() is not None


def fused_causal_attention(q, k, v, *, scale: float, sliding_window: int | None = None, return_lse: bool = False,
                           lse_api: str = "auto"):
    """Causal attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU: no
    [T, T] in memory; 17x faster than the chunked pass at 32K tokens on an H100). Same arguments and
    output as `causal_attention`; right-padded prompts need no mask here, because a valid query only
    sees earlier positions, all of them valid.

    return_lse: also return each query's log-sum-exp of its scaled logits, lse [B, KV, G, T] float32
    (what `prompt_column_sums_pallas(lse=...)` takes; rows of padding queries are meaningless).
    lse_api: "auto" takes it from jax's cuDNN entry point in float32 where cuDNN runs, else from
    the public `return_residual=True`, which returns it in the output's dtype ("public" forces that)."""
    if lse_api not in ("auto", "public"):
        raise ValueError(f"lse_api must be 'auto' or 'public', got {lse_api!r}")
    b, kv, g, t, d = q.shape
    qf = q.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)  # query head kv * G + g uses KV head kv
    kf, vf = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    impl = "cudnn" if _cudnn_flash_ok(q) else None
    private = _cudnn_attention_with_stats() if impl == "cudnn" and lse_api == "auto" else None
    if return_lse and private is not None:
        attend, mask_type = private
        out, lse = attend(qf, kf, vf, scale=scale, mask_type=mask_type.CAUSAL, sliding_window_length=sliding_window,
                          return_residual=True)  # lse [B, N, T] float32
        lse = lse.astype(jnp.float32).reshape(b, kv, g, t)
    elif return_lse:
        out, lse = jax.nn.dot_product_attention(qf, kf, vf, scale=scale, is_causal=True, local_window_size=window,
                                                implementation=impl, return_residual=True)  # lse [B, T, N]
        lse = lse.astype(jnp.float32).transpose(0, 2, 1).reshape(b, kv, g, t)
    else:
        out = jax.nn.dot_product_attention(qf, kf, vf, scale=scale, is_causal=True, local_window_size=window,
                                           implementation=impl)
    out = out.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
    return (out, lse) if return_lse else out


def query_chunks(q, chunk: int):
    """q [B, KV, G, T, D] -> ([N, B, KV, G, C, D] zero-padded to N * C >= T queries, C): the chunks a
    blockwise pass scans over, C = min(chunk, T)."""
    b, kv, g, t, d = q.shape
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    return q.reshape(b, kv, g, n_chunks, chunk, d).transpose(3, 0, 1, 2, 4, 5), chunk


def causal_attention(
    q,
    k,
    v,
    lengths,
    *,
    scale: float,
    sliding_window: int | None = None,
    chunk: int = 512,
    column_sums: bool = False,
    column_squares: bool = False,
    group_reduce: str = "mean",
    fused: bool | None = None,
    stats_lse: str = "cudnn",
):
    """Softmax attention of every prompt token over the prompt.

    q [B, KV, G, T, D], k/v [B, KV, T, D], lengths [B] int32 (right-padded prompts).
    Returns out [B, KV, G, T, D] in q's dtype and, if `column_sums`, colsum [B, KV, G, T] float32:
    the attention each key received summed over the valid queries.
    `column_squares` returns (out, colsum, colsq) with colsq [B, KV, T] float32: the squared attention
    each key received, summed over the valid queries, after reducing the G query heads of its KV head
    (`group_reduce`: "mean" or "max"). The group is reduced before squaring because RoCo (EasyKV)
    tracks the variance of the KV head's attention, not of each query head's.
    `fused`: use `fused_causal_attention` (True), the chunked XLA pass (False), or the fused one where
    `fused_available` says it is fast (None). Column statistics on a GPU come with the fused path from
    the column-sums kernels (kvjax/pallas_kernels/prompt_column_sums.py, nothing [T, T] in memory);
    elsewhere from the chunked pass. `stats_lse`: "cudnn" takes each query's log-sum-exp from cuDNN's
    attention (float32 softmax statistics) where it has them, so the kernels make one pass over the
    logits (one query head per program without the squares); "kernel": the kernels' own two passes.
    """
    b, kv, g, t, d = q.shape
    stats = column_sums or column_squares
    if stats_lse not in ("cudnn", "kernel"):
        raise ValueError(f"stats_lse must be 'cudnn' or 'kernel', got {stats_lse!r}")
    if (fused if fused is not None else fused_available(q)) and (not stats or jax.default_backend() == "gpu"):
        if not stats:
            return fused_causal_attention(q, k, v, scale=scale, sliding_window=sliding_window)
        from kvjax.pallas_kernels.prompt_column_sums import prompt_column_sums

        kw = dict(scale=scale, sliding_window=sliding_window, column_squares=column_squares, group_reduce=group_reduce,
                  implementation="pallas")
        lse = None
        if stats_lse == "cudnn" and float32_lse_available(q):
            try:
                out, lse = fused_causal_attention(q, k, v, scale=scale, sliding_window=sliding_window,
                                                  return_lse=True)
            except TypeError:  # jax's private cuDNN entry point changed its signature: the kernels' own pass
                pass
        if lse is not None:
            res = prompt_column_sums(q, k, lengths, lse=lse, **kw)
        else:  # the log-sum-exp pass, then the grouped column sums (the kernels before cuDNN's lse)
            out = fused_causal_attention(q, k, v, scale=scale, sliding_window=sliding_window)
            res = prompt_column_sums(q, k, lengths, per_head=False, **kw)
        return (out, *res) if column_squares else (out, res)
    q_chunks, chunk = query_chunks(q, chunk)
    n_chunks = q_chunks.shape[0]
    k_t = jnp.swapaxes(k, -1, -2)  # [B, KV, D, T]
    k_pos = jnp.arange(t)

    column_sums = column_sums or column_squares

    def one_chunk(carry, xs):
        qc, c_idx = xs  # qc [B, KV, G, C, D]
        q_pos = c_idx * chunk + jnp.arange(chunk)
        logits = jnp.matmul(
            qc.reshape(b, kv, g * chunk, d), k_t, preferred_element_type=jnp.float32
        ).reshape(b, kv, g, chunk, t) * scale
        mask = attention_mask(q_pos, k_pos, lengths, sliding_window)  # [B, C, T]
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.matmul(probs.astype(v.dtype).reshape(b, kv, g * chunk, t), v).reshape(b, kv, g, chunk, d)
        if column_sums:
            q_valid = (q_pos[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, C]
            colsum, colsq = carry
            colsum = colsum + jnp.einsum("bkgct,bc->bkgt", probs, q_valid)
            if column_squares:
                reduced = jnp.max(probs, axis=2) if group_reduce == "max" else jnp.mean(probs, axis=2)
                colsq = colsq + jnp.einsum("bkct,bc->bkt", reduced * reduced, q_valid)
            carry = (colsum, colsq)
        return carry, out.astype(q.dtype)

    # the squares' accumulator is a placeholder scalar unless asked for
    init = (jnp.zeros((b, kv, g, t), jnp.float32), jnp.zeros((b, kv, t) if column_squares else (), jnp.float32))
    (colsum, colsq), outs = jax.lax.scan(one_chunk, init, (q_chunks, jnp.arange(n_chunks)))
    out = outs.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, n_chunks * chunk, d)[:, :, :, :t]
    if column_squares:
        return out, colsum, colsq
    return (out, colsum) if column_sums else out


def window_attention(q, k, lengths, window: int, scale: float):
    """Softmax attention of the last `window` valid queries of each sequence over the prompt (what
    observation-window scorers such as SnapKV read).

    q [B, H, G, T, D], k [B, H, T, D] -> (probs [B, H, G, w, T] float32, row_valid [B, w]).
    """
    b, h, g, t, d = q.shape
    q_pos = lengths[:, None] - window + jnp.arange(window)[None, :]  # [B, w]
    row_valid = q_pos >= 0
    q_pos = jnp.maximum(q_pos, 0)
    qw = jnp.take_along_axis(q, q_pos[:, None, None, :, None], axis=3)  # [B, H, G, w, D]
    logits = jnp.matmul(
        qw.reshape(b, h, g * window, d), jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32
    ).reshape(b, h, g, window, t) * scale
    k_pos = jnp.arange(t)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < lengths[:, None, None])
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1), row_valid
