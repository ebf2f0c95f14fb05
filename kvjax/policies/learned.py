"""Learned: keep the tokens a trained scorer (kvjax.learned) expects later queries to attend to.

    scorer = kvjax.train_scorer(params, 40)                 # or a path written by scorer.save(...)
    policy = Learned(scorer, budget=0.25)                  # query-agnostic: no observation window
    policy = AdaKV(Learned("scorers/smollm2-135m", 128))     # head-adaptive budgets on the same scores

Each prompt token is scored from its own pre-RoPE key, value, position and distance to the end of
its prompt (the scorer's features), per (layer, KV head), before any question is seen, so a
prefilled context can answer questions it was not compressed for. The last `window` prompt tokens
and the first `sinks` are always kept. The scorer's weights are pytree leaves (another scorer of
the same shape does not recompile); its metadata is static.

`decode=True` also evicts while decoding: every token that enters the cache (each generated token,
a question fed after a prefilled context, a chunk of `kvjax.perplexity`) is scored once, as it
enters, from the same features (its distance to the end is 0: it is the newest token), and each
stream is held at its budget, prompt and generated tokens together: once a stream is full, every
step drops its lowest-scored token, the first `sinks` and the last `recent` positions protected.
Prompt tokens keep their prefill score, raw (before the per-head log-share normalisation, a
constant shift of each head), so old and new tokens rank on one scale.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.learned.model import score, token_features
from kvjax.learned.store import ScorerError, ScorerMeta, TrainedScorer, check_fits, load_scorer
from kvjax.policies import allocators
from kvjax.policies.base import DecodeEviction, PolicyError, PrefillStats, Scorer, check_positive_int
from kvjax.policies.base import global_index, policy_dataclass, static_field
from kvjax.policies.policy import Parts, Policy


@policy_dataclass
class LearnedScore(Scorer):
    """The trained model's score of each prompt token (kvjax.learned.model.score).

    `share`: the model was trained with the listwise loss, so a head's scores are log-shares of its
    attention up to a constant of that head; they are normalised to log-shares (log-softmax over the
    valid tokens of each head) so that heads compare (Ada-KV trades budget on the scores of every
    head of a layer). Within one head the order, hence the kept set, does not change.
    """

    weights: Any = dataclasses.field(default=None, repr=False)
    features: tuple = static_field(())
    inv_freq: tuple = static_field(())
    share: bool = static_field(False)
    #: a token's score is fixed when it enters the cache; decode reads no attention
    attention_running = False

    def raw_scores(self, stats: PrefillStats):
        """The model's scores of the prompt's tokens, [B, H, T] float32 (not normalised)."""
        feats = token_features(stats.k, stats.v, stats.positions, self.inv_freq, self.features, stats.lengths)
        heads = stats.global_index(stats.k.shape[1], stats.model_axis)
        return score(self.weights, feats, stats.layer, heads)

    def prefill_running(self, stats: PrefillStats):
        """The raw score of each kept prompt token (decode compares it with new tokens' raw scores)."""
        s = jnp.where(stats.valid[:, None, :], self.raw_scores(stats), 0.0)
        return s, jnp.zeros_like(s)

    def new_token_stats(self, k_new, v_new, positions, layer, model_axis):
        """The raw score of tokens entering the cache: their own features at their position, distance 0."""
        feats = token_features(k_new, v_new, positions, self.inv_freq, self.features, newest=True)
        s = score(self.weights, feats, layer, global_index(k_new.shape[1], model_axis))
        return s, jnp.zeros_like(s)

    def prefill_scores(self, stats: PrefillStats):
        s = self.raw_scores(stats)
        if not self.share:
            return s
        valid = stats.valid[:, None, :]
        return jnp.where(valid, jax.nn.log_softmax(jnp.where(valid, s, -1e30), axis=-1), -1e30)


def _load(source) -> TrainedScorer:
    if isinstance(source, TrainedScorer):
        return source
    if not isinstance(source, (str, pathlib.Path)):
        raise PolicyError(f"Learned needs a TrainedScorer (kvjax.train_scorer) or the path of a saved one, got "
                          f"{type(source).__name__}")
    try:
        return load_scorer(source)
    except ScorerError as e:
        raise PolicyError(str(e)) from None


@policy_dataclass
class Learned(Policy):
    """`Learned(path_or_scorer, budget=256, window=32, sinks=4, allocator_=None, decode=False, recent=None)`:
    a trained scorer, uniform budgets by default; `allocator_` takes any layer allocator
    (`Pyramid(...)`, or `PerLayer(b)` with the same array as `budget`), and `AdaKV(Learned(...))`
    makes heads adaptive (prefill only). `decode=True` evicts while decoding (module docstring),
    the last `recent` positions protected (0 <= recent <= window; default: `window`). The source is read once, here:
    afterwards `source` is the scorer's ScorerMeta and `weights` its params."""

    source: Any = static_field(None)
    budget: Any = 256
    window: int = static_field(32)
    sinks: int = static_field(4)
    allocator_: Any = static_field(None)
    weights: Any = dataclasses.field(default=None, repr=False)
    decode: bool = static_field(False)
    recent: Any = static_field(None)

    def __post_init__(self):
        if not (isinstance(self.source, ScorerMeta) and self.weights is not None):
            trained = _load(self.source)
            object.__setattr__(self, "source", trained.meta)
            object.__setattr__(self, "weights", dict(trained.params))
        check_positive_int("window", self.window, allow_zero=True)
        check_positive_int("sinks", self.sinks, allow_zero=True)
        if not isinstance(self.decode, (bool, np.bool_)):
            raise PolicyError(f"decode={self.decode!r}: must be True (evict while decoding) or False (prefill only)")
        if self.recent is not None:
            check_positive_int("recent", self.recent, allow_zero=True)
            if not self.decode:
                raise PolicyError(f"recent={self.recent!r}: the protected recent window of decode-time eviction "
                                  "applies only with decode=True (leave it None otherwise)")
            if self.recent > self.window:
                # the budget checks (here and against each prompt) cover window + sinks: with recent <= window
                # a full stream always has a token to evict
                raise PolicyError(f"recent={self.recent!r}: must be at most window ({self.window}), the recent "
                                  "prompt tokens prefill keeps; raise window to protect more")
        self._validate()

    @property
    def recent_window(self) -> int:
        """The last positions decode-time eviction never drops (`recent`, default `window`)."""
        return self.window if self.recent is None else int(self.recent)

    @property
    def scorer_(self) -> LearnedScore:
        share = self.source.target.get("loss") == "listwise"
        return LearnedScore(self.weights, self.source.features, self.source.inv_freq, share)

    def check_model(self, config) -> None:
        """PolicyError unless the scorer was trained for this model."""
        try:
            check_fits(self.source, config)
        except ScorerError as e:
            raise PolicyError(str(e)) from None
        super().check_model(config)

    def parts(self):
        alloc = allocators.Uniform() if self.allocator_ is None else self.allocator_
        ev = DecodeEviction(every=1, recent=self.recent_window, sinks=self.sinks) if self.decode else None
        return Parts(self.scorer_, alloc, window=self.window, sinks=self.sinks, decode=ev)

    def with_budget(self, budget) -> "Learned":
        """The same scorer under another budget."""
        return dataclasses.replace(self, budget=budget)
