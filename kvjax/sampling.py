"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import bad_input


def check_options(temperature, top_k, top_p, vocab_size: int | None = None) -> None:
    """InputError unless temperature is finite and >= 0, top_k a positive int (at most the
    vocabulary) or None, and top_p in (0, 1] or None."""
    number = (int, float, np.integer, np.floating)
    if isinstance(temperature, bool) or not isinstance(temperature, number) or not math.isfinite(temperature) \
            or temperature < 0:
        raise bad_input("temperature", temperature, "a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
                              or (vocab_size is not None and top_k > vocab_size)):
        raise bad_input("top_k", top_k, "a positive int" + (f" <= {vocab_size}" if vocab_size else "") + ", or None")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, number) or not 0.0 < top_p <= 1.0):
        raise bad_input("top_p", top_p, "a number in (0, 1], or None")  # (not 0 < nan <= 1 either)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 = greedy. top_k / top_p restrict the candidates before sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __post_init__(self):
        check_options(self.temperature, self.top_k, self.top_p)

    def __call__(self, logits, rng):
        """logits [B, V] float32 -> tokens [B] int32."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            before = jnp.cumsum(probs, axis=-1) - probs
            cutoff_idx = jnp.sum(before < self.top_p, axis=-1, keepdims=True) - 1
            cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
