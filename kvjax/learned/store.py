"""A trained scorer as one value, saved with Orbax beside a JSON of what it is and whom it is for.

    scorer = kvjax.train_scorer(params, texts)        # -> TrainedScorer
    scorer.save("scorers/smollm2-135m")                # params (Orbax) + scorer.json + loss.json
    scorer = load_scorer("scorers/smollm2-135m")      # ScorerError if unreadable
    check_fits(scorer, params.config)                 # ScorerError unless made for this model

The identity is the XKV profiles' (`architecture` = the config's model_type, `config_hash` of
kvjax.xkv.budgets), plus the layer and KV-head counts and head size the params' shapes need.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import KvjaxError
from kvjax.learned.model import FEATURES, KINDS, kind_of, num_features
from kvjax.xkv.budgets import config_hash

FORMAT_VERSION = 1
META_FILE, LOSS_FILE, PARAMS_DIR = "scorer.json", "loss.json", "params"


class ScorerError(KvjaxError, ValueError):
    """A learned scorer that cannot be read, or that was trained for another model."""


@dataclasses.dataclass(frozen=True)
class ScorerMeta:
    """What a scorer is: the model it was trained for, its features and its training target.

    model: a name (the checkpoint it was trained on); architecture, config_hash: the model's identity;
    num_layers, num_kv_heads, head_dim; inv_freq: the model's RoPE frequencies [D/2] (to un-rotate
    keys); features: FEATURES used, in order; kind: "linear" or "mlp"; hidden: the MLP's width;
    target: how the targets were made (horizon, reduce, group_reduce, loss, ...); train: the run's
    record (texts, seconds, held-out loss, ...).
    """

    model: str
    architecture: str
    config_hash: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    inv_freq: tuple[float, ...]
    features: tuple[str, ...]
    kind: str
    hidden: int
    target: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    train: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inv_freq"], d["features"] = list(self.inv_freq), list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScorerMeta":
        try:
            meta = cls(model=str(d["model"]), architecture=str(d["architecture"]), config_hash=str(d["config_hash"]),
                       num_layers=int(d["num_layers"]), num_kv_heads=int(d["num_kv_heads"]),
                       head_dim=int(d["head_dim"]), inv_freq=tuple(float(x) for x in d["inv_freq"]),
                       features=tuple(d["features"]), kind=str(d["kind"]), hidden=int(d["hidden"]),
                       target=dict(d.get("target", {})), train=dict(d.get("train", {})),
                       format_version=int(d.get("format_version", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ScorerError(f"malformed scorer metadata: {type(e).__name__}: {e}") from None
        if meta.format_version != FORMAT_VERSION:
            raise ScorerError(f"scorer format version {meta.format_version}; this kvjax reads {FORMAT_VERSION}")
        if meta.kind not in KINDS or not meta.features or set(meta.features) - set(FEATURES):
            raise ScorerError(f"scorer kind {meta.kind!r} / features {meta.features!r}: kinds {KINDS}, features "
                              f"a subset of {FEATURES}")
        return meta

    @property
    def num_features(self) -> int:
        return num_features(self.features, self.head_dim)


def meta_for(config, model: str, features, kind: str, hidden: int, **extra) -> ScorerMeta:
    """The metadata of a scorer for the model `config`."""
    from kvjax.models.llama import rope_inv_freq

    return ScorerMeta(model=model, architecture=config.model_type, config_hash=config_hash(config),
                      num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                      inv_freq=tuple(float(x) for x in rope_inv_freq(config)), features=tuple(features), kind=kind,
                      hidden=hidden, **extra)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedScorer:
    """params: the model's pytree (kvjax.learned.model); meta: ScorerMeta; history: the loss curve
    (a list of {step, train, held_out} dicts)."""

    params: Any
    meta: ScorerMeta
    history: tuple = ()

    def save(self, path) -> pathlib.Path:
        """Write `path`/params (Orbax, float32), `path`/scorer.json and `path`/loss.json."""
        import orbax.checkpoint as ocp

        path = pathlib.Path(path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, dict(self.params)), force=True)
        (path / META_FILE).write_text(json.dumps(self.meta.to_dict(), indent=1) + "\n")
        (path / LOSS_FILE).write_text(json.dumps(list(self.history), indent=1) + "\n")
        return path

    def check(self) -> None:
        """ScorerError unless the params' shapes are what the metadata says."""
        m = self.meta
        lh, f, k = (m.num_layers, m.num_kv_heads), m.num_features, m.hidden
        want = dict(mean=lh + (f,), std=lh + (f,))
        want.update(dict(w=lh + (f,), b=lh) if m.kind == "linear" else
                    dict(w1=lh + (f, k), b1=lh + (k,), w2=lh + (k,), b2=lh))
        got = {n: tuple(np.shape(a)) for n, a in dict(self.params).items()}
        if got != want or kind_of(self.params) != m.kind:
            raise ScorerError(f"scorer params have shapes {got}; its metadata implies {want}")


def abstract_params(meta: ScorerMeta) -> dict:
    """The params' ShapeDtypeStructs (the Orbax restore target)."""
    lh, f, k = (meta.num_layers, meta.num_kv_heads), meta.num_features, meta.hidden
    shapes = dict(mean=lh + (f,), std=lh + (f,))
    shapes.update(dict(w=lh + (f,), b=lh) if meta.kind == "linear" else
                  dict(w1=lh + (f, k), b1=lh + (k,), w2=lh + (k,), b2=lh))
    return {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}


def load_scorer(path) -> TrainedScorer:
    """A scorer saved by TrainedScorer.save (ScorerError if missing or unreadable)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).expanduser().resolve()
    if not (path / META_FILE).is_file() or not (path / PARAMS_DIR).exists():
        raise ScorerError(f"{str(path)!r} is not a saved scorer (needs {META_FILE} and {PARAMS_DIR}/; write one with "
                          "kvjax.train_scorer(...).save(path))")
    try:
        meta = ScorerMeta.from_dict(json.loads((path / META_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise ScorerError(f"{path / META_FILE} is not JSON: {e}") from None
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path / PARAMS_DIR, abstract_params(meta))
    history = json.loads((path / LOSS_FILE).read_text()) if (path / LOSS_FILE).is_file() else []
    scorer = TrainedScorer(dict(params), meta, tuple(history))
    scorer.check()
    return scorer


def check_fits(meta: ScorerMeta, config) -> None:
    """ScorerError unless the scorer was trained for this model (architecture, layers, KV heads, config)."""
    made = dict(architecture=meta.architecture, num_layers=meta.num_layers, num_kv_heads=meta.num_kv_heads,
                head_dim=meta.head_dim, config_hash=meta.config_hash)
    this = dict(architecture=config.model_type, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim, config_hash=config_hash(config))
    diff = {k: (made[k], this[k]) for k in made if made[k] != this[k]}
    if diff:
        parts = ", ".join(f"{k} {a!r} (this model: {b!r})" for k, (a, b) in diff.items())
        raise ScorerError(f"the learned scorer {meta.model!r} was trained for another model: {parts}; train one for "
                          "this model with kvjax.train_scorer")
