"""Argument checks of `ragged_decode_attention`: each error names the argument, its shape and what is allowed."""

from __future__ import annotations

import jax.numpy as jnp


def check_arguments(q, k_pool, v_pool, start, length, pos, min_pos, append, append_pos, layer):
    """Raise ValueError for arguments `ragged_decode_attention` cannot take (shapes in its docstring)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, H, G, D], got shape {q.shape}")
    b, h, g, d = q.shape
    for name, x in (("k_pool", k_pool), ("v_pool", v_pool)):
        if x.ndim != 3 or x.shape[0] != b or x.shape[2] != d:
            raise ValueError(f"{name} must be [B, P, D] = [{b}, P, {d}], got {x.shape}")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must have one shape, got {k_pool.shape} and {v_pool.shape}")
    for name, x in (("start", start), ("length", length)):
        if x.shape[-2:] != (b, h) or x.ndim != 2 + (layer is not None) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer {'[L, B, H] (with layer)' if layer is not None else '[B, H]'} "
                             f"array, [B, H] = {(b, h)}, got {x.dtype}{list(x.shape)}")
    if (pos is None) != (min_pos is None):
        raise ValueError("pos and min_pos must be given together")
    if pos is not None:
        if pos.shape != k_pool.shape[:2] or not jnp.issubdtype(pos.dtype, jnp.integer):
            raise ValueError(f"pos must be an integer [B, P] = {k_pool.shape[:2]} array, got {pos.dtype}{list(pos.shape)}")
        if min_pos.shape != (b,) or not jnp.issubdtype(min_pos.dtype, jnp.integer):
            raise ValueError(f"min_pos must be an integer [B] = ({b},) array, got {min_pos.dtype}{list(min_pos.shape)}")
    if append is not None:
        k_new, v_new, slot = append
        if k_new.shape != (b, h, d) or v_new.shape != (b, h, d) or slot.shape != (b, h):
            raise ValueError(f"append must be (k_new [B, H, D], v_new [B, H, D], slot [B, H]) = "
                             f"{(b, h, d)}, {(b, h, d)}, {(b, h)}; got {k_new.shape}, {v_new.shape}, {slot.shape}")
    if append_pos is not None:
        pool, new_pos = append_pos
        if append is None or pool.shape != k_pool.shape[:2] or pool.dtype != jnp.int32 or new_pos.shape != (b,):
            raise ValueError(f"append_pos must be (pos_pool int32{list(k_pool.shape[:2])}, new_pos [{b}]) with append; "
                             f"got {pool.dtype}{list(pool.shape)}, {list(new_pos.shape)}, append={append is not None}")
