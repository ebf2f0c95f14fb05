"""What a policy is: a scorer (which tokens matter) times an allocator (how many each stream keeps).

Policies are frozen dataclasses registered as pytrees: numeric options (budget, alpha, gamma, ...)
are leaves, so changing them does not recompile; structural options (window, pooling kernel, ...)
are static fields, since they set array shapes.

Conventions (shared by every policy):
- A *budget* counts the tokens a stream may hold, window and sinks included. An int is tokens per
  KV head; a float in (0, 1] is a ratio of each sequence's prompt length; an int array of shape [L]
  or [L, H] (with the `PerLayer` allocator) gives per-layer / per-(layer, head) budgets. Prefill
  keeps at most the budget of each stream's prompt tokens (all of them when the budget covers the
  prompt). Policies that evict while decoding hold each stream at its budget, prompt and generated
  tokens together: nothing is evicted until a stream is full. Prefill-only policies bound the
  compressed prompt; generated tokens are appended (as in the papers and kvpress).
- Scores are per KV head, `[B, H, T]` float32, higher = keep; query heads of a group are reduced
  by `group_reduce` (mean or max). Forced tokens (window, sinks) are kept regardless of score.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import KvjaxError


class PolicyError(KvjaxError, ValueError):
    """A policy was built with an invalid option; the message names the option."""


def static_field(default=dataclasses.MISSING, **kwargs):
    """A dataclass field that is part of the pytree's static structure (changing it recompiles)."""
    return dataclasses.field(default=default, metadata=dict(static=True), **kwargs)


def policy_dataclass(cls):
    """Frozen dataclass + pytree registration (static fields via `static_field`).

    Building one checks its options (`__post_init__`); JAX rebuilding it from leaves (tracers inside
    jit, abstract values while lowering) does not, so the checks can be strict about what users pass.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    meta = tuple(f.name for f in fields if f.metadata.get("static"))

    def flatten(obj):
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data)
        return children, tuple(getattr(obj, n) for n in meta)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for name, value in zip(meta, aux):
            object.__setattr__(obj, name, value)
        for name, value in zip(data, children):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    return cls


class PrefillMode(enum.Enum):
    """How the runtime prefills a prompt for a policy (`Policy.prefill_mode`).

    ONE_SHOT: after each layer's attention, score its tokens and pack the keep-set into the pool.
    CASCADE:  layer budgets depend on every layer (CAKE): after each layer, the allocator re-splits
              the total over the layers seen so far and earlier layers shrink (kvjax.compress.cascade).
    CHUNKED:  the prompt streams through the cache in chunks, evicting as it goes (RoCo).
    """

    ONE_SHOT = "one-shot"
    CASCADE = "cascade"
    CHUNKED = "chunked"


@dataclasses.dataclass(frozen=True)
class PrefillStats:
    """What a scorer may look at for one layer of the prompt (inside jit).

    q               [B, H, G, T, D]  queries (after RoPE), or None
    k, v            [B, H, T, D]     keys (after RoPE) and values of the prompt
    lengths         [B]              valid prompt length (prompts are right-padded to T)
    window_attn     [B, H, G, w, T]  softmax attention of the last w valid queries (None if w=0)
    window_valid    [B, w]           which of those w query rows exist (short prompts)
    colsum          [B, H, G, T]     attention summed over all queries (None unless needed)
    colsq           [B, H, T]        squared group-reduced attention summed over all queries (None unless needed)
    layer           scalar int32     layer index
    rng             PRNG key         for random scorers
    """

    q: Any
    k: Any
    v: Any
    lengths: Any
    window_attn: Any
    window_valid: Any
    colsum: Any
    colsq: Any
    layer: Any
    rng: Any
    model_axis: str | None = None  # inside a mesh program: the axis the heads are split over
    data_axis: str | None = None  # ... and the one the sequences are split over

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def positions(self):
        return jnp.arange(self.num_tokens)

    @property
    def valid(self):
        """[B, T] bool: token exists in the prompt."""
        return self.positions[None, :] < self.lengths[:, None]

    def head_sum(self, x, axis):
        """Sum over `axis` (which includes the KV-head axis 1) across every device's heads."""
        s = jnp.sum(x, axis=axis)
        return s if self.model_axis is None else jax.lax.psum(s, self.model_axis)

    def head_mean(self, x, axis):
        """Mean over `axis` (which includes the KV-head axis 1) across every device's heads."""
        m = jnp.mean(x, axis=axis)
        if self.model_axis is None:
            return m
        return jax.lax.psum(m, self.model_axis) / jax.lax.psum(1, self.model_axis)

    def global_index(self, size: int, axis: str | None):
        """[size] indices of this device's rows (or heads) among all devices' (axis: the mesh axis)."""
        return global_index(size, axis)

    def with_window(self, window: int, scale: float) -> "PrefillStats":
        """These stats with the attention of the last `window` queries filled in (needs q)."""
        from kvjax.models.prompt_attention import window_attention

        if not window:
            return dataclasses.replace(self, window_attn=None, window_valid=None)
        attn, valid = window_attention(self.q, self.k, self.lengths, window, scale)
        return dataclasses.replace(self, window_attn=attn, window_valid=valid)


def global_index(size: int, axis: str | None):
    """[size] indices of this device's rows (or heads) among all devices' (axis: the mesh axis, or None)."""
    i = jnp.arange(size)
    return i if axis is None else i + jax.lax.axis_index(axis) * size


def reduce_group(x, how: str, axis: int = 2):
    """Reduce the GQA group axis (query heads sharing a KV head)."""
    return jnp.max(x, axis=axis) if how == "max" else jnp.mean(x, axis=axis)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise PolicyError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value, allow_zero: bool = False):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise PolicyError(f"{name} must be an int {bound}, got {value!r}")


ALLOWED_BUDGETS = ("an int >= 1 (tokens per KV head), a float in (0, 1] (a ratio of each prompt), or a "
                   "positive int array [L] or [L, H] with the PerLayer allocator")


def check_budget(budget) -> None:
    """A budget is a positive int, a ratio in (0, 1], or a positive int array [L] / [L, H]."""
    if isinstance(budget, jax.core.Tracer):
        return  # a policy built inside a traced function: its value is checked where it is concrete
    if isinstance(budget, (bool, np.bool_)) or not isinstance(
            budget, (int, float, np.integer, np.floating, np.ndarray, list, tuple, jax.Array)):
        raise PolicyError(f"budget={budget!r}: must be {ALLOWED_BUDGETS}")
    if isinstance(budget, (int, np.integer)):
        if budget <= 0:
            raise PolicyError(f"budget={budget!r}: must be {ALLOWED_BUDGETS}")
        return
    if isinstance(budget, (float, np.floating)):
        if not 0.0 < budget <= 1.0:  # also rejects nan
            raise PolicyError(f"budget={budget!r}: a ratio budget must be in (0, 1]")
        return
    try:
        arr = np.asarray(budget)
    except (ValueError, TypeError):
        raise PolicyError(f"budget={budget!r}: must be {ALLOWED_BUDGETS}") from None
    if arr.ndim == 0:
        return check_budget(arr.item())
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
        raise PolicyError(f"budget: an array budget must be integer with shape [L] or [L, H], got "
                          f"{arr.dtype}{list(arr.shape)}")
    if (arr <= 0).any():
        raise PolicyError(f"budget: every entry of an array budget must be >= 1, got a minimum of {arr.min()}")


@dataclasses.dataclass(frozen=True)
class DecodeEviction:
    """Decode-time eviction: keep each stream at its budget while generating.

    every:  evict once every `every` steps (streams may exceed the budget by up to `every`-1 tokens)
    recent: the most recent tokens are never evicted
    sinks:  the first tokens are never evicted
    """

    every: int = 1
    recent: int = 0
    sinks: int = 0


class Scorer:
    """Scores prompt tokens per KV head; optionally keeps a running statistic while decoding."""

    #: last queries whose attention the scorer needs (0: none)
    window: int = 0
    #: how the query heads of a GQA group are reduced: "mean" or "max"
    group_reduce: str = "mean"
    #: decode re-scores a slot from its neighbours up to this many slots away (CAKE's pooling), so
    #: streams that share a region need this many free slots between them
    decode_pool_radius: ClassVar[int] = 0
    needs_colsum: ClassVar[bool] = False
    needs_colsq: ClassVar[bool] = False
    #: one index set per layer (all heads keep the same positions)
    layer_shared: ClassVar[bool] = False
    #: the running statistics follow the attention each token receives (`decode_update`); False: a
    #: token's statistics are fixed when it enters the cache (`new_token_stats`), and decode needs no
    #: attention probabilities
    attention_running: ClassVar[bool] = True

    def prefill_scores(self, stats: PrefillStats):
        """-> [B, H, T] float32, higher = keep."""
        raise NotImplementedError

    def prefill_running(self, stats: PrefillStats):
        """Running statistics stored per kept token: (score [B, H, T], score2 [B, H, T])."""
        z = jnp.zeros(stats.k.shape[:3], jnp.float32)
        return z, z

    def decode_update(self, score, score2, probs, slot_pos, next_pos):
        """Update running statistics of a layer region after one decode step.

        score, score2 [B, S]; probs [B, S] attention of the new query on each slot (group-reduced,
        0 where the slot is empty or belongs to no stream); slot_pos [B, S]; next_pos [B] (the new
        token's position). Returns (score, score2).
        """
        return score, score2

    def new_token_stats(self, k_new, v_new, positions, layer, model_axis):
        """Running statistics of tokens as they enter the cache while decoding (and in chunked extend).

        k_new, v_new [B, H, N, D] (keys after RoPE at `positions`, values); positions [B, N] int;
        layer: the (traced) layer index; model_axis: inside a mesh program, the axis the KV heads are
        split over (`PrefillStats.global_index`). Returns (score, score2) [B, H, N] float32; by
        default zeros (the statistics then come from the attention the token receives).
        """
        z = jnp.zeros(k_new.shape[:3], jnp.float32)
        return z, z

    #: scorers whose running statistics are sums over queries also define
    #: `increments(probs) -> (d_score, d_score2)` (what one query adds), so a chunk of queries
    #: updates them at once (kvjax.chunk_step.absorb_chunk) instead of query by query

    def eviction_key(self, score, score2, slot_pos, seen):
        """[B, S]: lower = evicted first. `seen` [B] = queries so far (tokens processed)."""
        return score
