"""Checks at the public boundary, before anything compiles: each raises `kvjax.errors.InputError` (or
`PolicyError`) naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from kvjax.errors import bad_input
from kvjax.models import ModelConfig
from kvjax.policies.base import PolicyError
from kvjax.policies.policy import Full, Policy

IMPLEMENTATIONS = ("pallas", "xla")


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(name: str, value, *, most: int | None = None) -> int:
    if not is_int(value) or value < 1 or (most is not None and value > most):
        allowed = "a positive int" + (f" <= {most}" if most is not None else "")
        raise bad_input(name, value, allowed)
    return int(value)


def policy(value, config: ModelConfig) -> Policy:
    """The policy to use (None: the full cache), checked against the model."""
    if value is None:
        return Full()
    if not isinstance(value, Policy):
        raise bad_input("policy", value, "a kvjax.policies.Policy such as SnapKV(budget=128), or None for the full "
                        "cache (policies.make('snapkv', budget=128) builds one from a name)")
    value.check_model(config)
    return value


def window_fits(pol: Policy, lengths: Sequence[int], new_tokens: int = 0) -> None:
    """A ratio budget must leave each prompt at least the tokens the policy always keeps (its window
    and sinks, or the whole prompt when shorter): otherwise the window would be cut silently. A
    policy that evicts while decoding must also be able to evict once a stream is full (prompt +
    `new_tokens` above its budget): the budget must exceed the recent and sink tokens it never
    evicts, or the stream would grow past its budget."""
    budget = pol.budget
    if pol.keeps_everything or not isinstance(budget, (float, np.floating)):
        return
    forced = pol.protected_window + pol.protected_sinks
    ev = pol.decode_eviction
    for i, n in enumerate(lengths):
        keep = max(int(round(budget * n)), 1)
        need = min(int(n), forced)
        if keep < need:
            raise PolicyError(
                f"budget={budget!r} keeps {keep} of prompt {i}'s {n} tokens, fewer than the {need} that "
                f"{type(pol).__name__} always keeps (window {pol.protected_window} + sinks {pol.protected_sinks}): "
                f"use a budget >= {math.ceil(need / n * 1000) / 1000} or a smaller window")
        held = ev.recent + ev.sinks if ev is not None else 0
        if ev is not None and keep < n + new_tokens and keep < held:
            raise PolicyError(
                f"budget={budget!r} holds {keep} tokens per stream for prompt {i} ({n} tokens), but "
                f"{type(pol).__name__} never evicts its {ev.recent} most recent and {ev.sinks} first tokens, so "
                f"with {new_tokens} new tokens a stream would grow past its budget: give prompts of at least "
                f"{math.ceil(held / budget)} tokens, a token budget >= {held}, or a smaller recent window")


def stop(value, vocab_size: int) -> tuple:
    """Stop strings and token ids: a list of non-empty str and ints in the vocabulary."""
    if value is None:
        return ()
    if isinstance(value, (str, int, np.integer)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise bad_input("stop", value, "a list of stop strings and/or token ids")
    for s in value:
        if isinstance(s, str):
            if not s:
                raise bad_input("stop", value, "non-empty strings and token ids (an empty stop string)")
        elif not is_int(s) or not 0 <= s < vocab_size:
            raise bad_input("stop", value, f"strings and token ids in [0, {vocab_size})")
    return tuple(value)


def default_implementation() -> str:
    """The decode implementation when `implementation=None`."""
    # the Pallas decode kernel reads only each stream's used slots: 1.2-5.8x faster than the XLA
    # region path on an H100 (docs/PERFORMANCE.md), for every policy (those that evict while
    # decoding take the per-stream logits it stores); XLA elsewhere (no kernel on CPU), and on a GPU
    # whose JAX no longer ships the Pallas Triton backend (deprecated in JAX 0.12)
    from kvjax.pallas_kernels._common import triton_available

    return "pallas" if jax.default_backend() == "gpu" and triton_available() else "xla"


def implementation(value) -> str | None:
    if value is not None and value not in IMPLEMENTATIONS:
        raise bad_input("implementation", value, f"one of {IMPLEMENTATIONS}, or None for the backend's default")
    if value == "pallas" and jax.default_backend() == "gpu":
        from kvjax.pallas_kernels._common import triton_available

        if not triton_available():
            raise bad_input("implementation", value, "'xla' or None on this GPU: this JAX has no Pallas Triton "
                            "backend (jax.experimental.pallas.triton), which kvjax's GPU kernels lower through")
    return value


def seed(value) -> int:
    if not is_int(value) or value < 0:
        raise bad_input("seed", value, "an int >= 0")
    return int(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise bad_input(name, value, "True or False")
    return bool(value)
