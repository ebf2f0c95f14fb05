"""`train_scorer`: fit a learned eviction scorer to the attention a model's own tokens receive later.

    scorer = kvjax.train_scorer(params, 40, out="scorers/smollm2")   # 40 texts (kvjax.learned.texts)
    policy = kvjax.policies.Learned(scorer, budget=0.25)

1. Each text runs through the model once with the full cache (kvjax.learned.targets): per layer the
   scorer's features of every token [H, T, F] and the target, the attention it receives from later
   queries. Texts are split (seeded) into training and held-out ones.
2. Per (layer, KV head), a linear map or a 2-layer MLP (kvjax.learned.model) is fitted with optax's
   Adam on mini-batches of whole texts (seeded order). Loss "mse": squared error against
   log(target + 1e-6); "listwise": per (text, layer, head), cross-entropy between softmax(scores)
   and the targets normalised to sum to 1 (the top of the ranking is what eviction keeps).
   Keys with fewer than `min_future` counted queries are left out of the loss (their target is cut
   short). `min_distance` and `last` choose which later queries count (kvjax.learned.targets): with
   last=64, min_distance=64 the target is the attention a token draws from the text's last 64
   queries when it lies before them: a query-agnostic student of SnapKV's observation window.
3. The held-out loss is measured every `eval_every` steps; the best params by held-out loss are kept.
   The loss curve is returned in the scorer (`history`) and saved beside it as loss.json.
   Ctrl-C stops training and keeps the best params so far.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import bad_input
from kvjax.io.checkpoint import Params
from kvjax.learned import model as M
from kvjax.learned.store import TrainedScorer, meta_for
from kvjax.learned.targets import REDUCES, future_count, text_features_and_targets
from kvjax.learned.texts import default_texts
from kvjax.validate import is_int

LOSSES = ("mse", "listwise")
_EPS = 1e-6


def _token_lists(params: Params, texts, n_tokens: int, seed: int) -> list[np.ndarray]:
    if is_int(texts):
        if texts < 2:
            raise bad_input("texts", texts, "a list of texts (str or token ids), or a number of texts >= 2")
        if params.tokenizer is None:
            rng = np.random.default_rng(seed)
            return [rng.integers(0, params.config.vocab_size, n_tokens).astype(np.int32) for _ in range(texts)]
        texts = default_texts(params.tokenizer, int(texts), n_tokens, seed)
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or len(texts) < 2:
        raise bad_input("texts", texts, "a list of at least 2 texts (str or token ids), or a number of texts >= 2")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if params.tokenizer is None:
                raise bad_input(f"texts[{i}]", t, "token ids: this checkpoint has no tokenizer")
            t = params.tokenizer.encode(t)
        ids = np.asarray(t).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer) or ids.size < 2 or ids.min() < 0 or ids.max() >= params.config.vocab_size:
            raise bad_input(f"texts[{i}]", t, f"a str or >= 2 token ids in [0, {params.config.vocab_size})")
        out.append(ids[:n_tokens].astype(np.int32))
    return out


def _check(kind, features, hidden, horizon, reduce, group_reduce, loss, steps, batch, held_out, lr, min_future):
    if kind not in M.KINDS:
        raise bad_input("kind", kind, f"one of {M.KINDS}")
    if isinstance(features, str) or not features or not set(features) <= set(M.FEATURES) or \
            len(set(features)) != len(features):
        raise bad_input("features", features, f"a non-empty tuple of distinct names from {M.FEATURES}")
    for name, v in (("hidden", hidden), ("steps", steps), ("batch", batch)):
        if not is_int(v) or v < 1:
            raise bad_input(name, v, "an int >= 1")
    if horizon is not None and (not is_int(horizon) or horizon < 1):
        raise bad_input("horizon", horizon, "None (every later query) or an int >= 1")
    if not is_int(min_future) or min_future < 1:
        raise bad_input("min_future", min_future, "an int >= 1")
    for name, v in (("reduce", reduce), ("group_reduce", group_reduce)):
        if v not in REDUCES:
            raise bad_input(name, v, f"one of {REDUCES}")
    if loss not in LOSSES:
        raise bad_input("loss", loss, f"one of {LOSSES}")
    if not isinstance(held_out, float) or not 0.0 < held_out < 1.0:
        raise bad_input("held_out", held_out, "a float in (0, 1): the share of texts held out")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1:
        raise bad_input("lr", lr, "a learning rate in (0, 1)")


def _loss(params, feats, logt, mask, loss: str):
    """feats [N, L, H, T, F] (any float), logt [N, L, H, T] log targets, mask [N, T] -> scalar."""
    s = M.score_all(params, feats.astype(jnp.float32))
    m = jnp.broadcast_to(mask[:, None, None, :], s.shape)
    if loss == "mse":
        return jnp.sum(jnp.where(m, (s - logt) ** 2, 0.0)) / jnp.maximum(m.sum(), 1)
    p = jnp.where(m, jnp.exp(logt) - _EPS, 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    logq = jax.nn.log_softmax(jnp.where(m, s, -1e30), axis=-1)
    return -jnp.sum(jnp.where(m, p * logq, 0.0)) / (s.shape[0] * s.shape[1] * s.shape[2])


def train_scorer(params: Params, texts=40, *, n_tokens: int = 2048, kind: str = "mlp", hidden: int = 16,
                 features=M.FEATURES, horizon: int | None = None, reduce: str = "max", group_reduce: str = "max",
                 loss: str = "listwise", steps: int = 300, batch: int = 2, lr: float = 3e-3, held_out: float = 0.2,
                 min_future: int = 64, min_distance: int = 1, last: int | None = None, eval_every: int = 25,
                 max_seconds: float | None = None, seed: int = 0,
                 out=None, progress: bool | None = None, model_name: str | None = None) -> TrainedScorer:
    """Train a learned eviction scorer for `params`' model (module docstring). `texts`: a list of str
    or token-id arrays, or a number of texts drawn by kvjax.learned.texts.default_texts (seeded); each is cut to
    `n_tokens`. Returns a TrainedScorer (saved to `out` when given); its `meta.train` records the
    texts, the split, the seconds spent and the best held-out loss."""
    import optax
    from tqdm import tqdm

    features = tuple(features) if isinstance(features, (list, tuple)) else features
    _check(kind, features, hidden, horizon, reduce, group_reduce, loss, steps, batch, held_out, lr, min_future)
    for name, v in (("min_distance", min_distance), ("last", last)):
        if (v is not None or name == "min_distance") and (not is_int(v) or v < 1):
            raise bad_input(name, v, "an int >= 1" + (" or None" if name == "last" else ""))
    if not isinstance(params, Params):
        raise bad_input("params", params, "kvjax Params (kvjax.load(...))")
    t0 = time.perf_counter()
    seqs = _token_lists(params, texts, n_tokens, seed)
    config = params.config
    t_pad = -(-max(len(s) for s in seqs) // 64) * 64
    feats, logts, masks = [], [], []
    disable = None if progress is None else not progress
    for ids in tqdm(seqs, desc="targets", unit="text", disable=disable):
        tok = np.zeros((1, t_pad), np.int32)
        tok[0, : len(ids)] = ids
        n = jnp.asarray([len(ids)], jnp.int32)
        f, tgt = text_features_and_targets(params.weights, jnp.asarray(tok), n, config=config, features=features,
                                           horizon=horizon, reduce=reduce, group_reduce=group_reduce,
                                           min_distance=min_distance, last=last)
        feats.append(np.asarray(f[:, 0], np.float16))
        logts.append(np.log(np.asarray(tgt[:, 0], np.float32) + _EPS))
        count = future_count(n, t_pad, horizon, min_distance, last)[0]
        masks.append(np.asarray(count >= max(1, min(min_future, len(ids) - min_distance))))
    target_s = time.perf_counter() - t0
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_hold = min(max(1, round(held_out * len(seqs))), len(seqs) - 1)
    hold, train = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    F, LT, MK = (jnp.asarray(np.stack(a)) for a in (feats, logts, masks))
    del feats, logts, masks
    # feature standardisation from the training texts' scored tokens, per (layer, head, feature), a text at a time
    n_w, s1, s2 = 0.0, 0.0, 0.0
    for i in train:
        w = np.asarray(MK[i], np.float64)[None, None, :, None]
        x = np.asarray(F[i], np.float64)  # [L, H, T, F]
        n_w, s1, s2 = n_w + w.sum(), s1 + (x * w).sum(2), s2 + (x * x * w).sum(2)
    mean = s1 / n_w
    std = np.sqrt(np.maximum(s2 / n_w - mean**2, 0.0)) + 1e-3
    del x, w
    num_feats = F.shape[-1]
    p = M.init_params(jax.random.key(seed), kind, config.num_layers, config.num_kv_heads, num_feats, hidden,
                      mean, std)
    frozen = {"mean", "std"}
    opt = optax.masked(optax.adam(lr), {k: k not in frozen for k in p})
    opt_state = opt.init(p)

    @jax.jit
    def step(p, opt_state, data, idx):
        val, g = jax.value_and_grad(_loss)(p, *(a[idx] for a in data), loss)
        g = {k: (jnp.zeros_like(v) if k in frozen else v) for k, v in g.items()}
        upd, opt_state = opt.update(g, opt_state, p)
        return optax.apply_updates(p, upd), opt_state, val

    @jax.jit
    def evaluate(p, data, idx):
        return _loss(p, *(a[idx] for a in data), loss)

    data = (F, LT, MK)

    def held_loss(p):
        return float(np.mean([float(evaluate(p, data, jnp.asarray([i]))) for i in hold]))

    rng = np.random.default_rng(seed + 1)
    history, best, best_loss, run_loss = [], p, held_loss(p), []
    history.append(dict(step=0, train=None, held_out=best_loss))
    t1 = time.perf_counter()
    bar = tqdm(total=steps, desc="training scorer", unit="step", disable=disable)
    done = 0
    try:
        for i in range(1, steps + 1):
            idx = jnp.asarray(rng.choice(train, size=min(batch, len(train)), replace=False))
            p, opt_state, val = step(p, opt_state, data, idx)
            run_loss.append(float(val))
            done = i
            bar.update(1)
            if i % eval_every == 0 or i == steps:
                h = held_loss(p)
                history.append(dict(step=i, train=float(np.mean(run_loss)), held_out=h))
                run_loss = []
                bar.set_postfix(held_out=f"{h:.4f}")
                if h < best_loss:
                    best, best_loss = p, h
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
    train_info = dict(texts=len(seqs), train_texts=train.tolist(), held_out_texts=hold.tolist(), n_tokens=n_tokens,
                      steps=done, batch=batch, lr=lr, seed=seed, target_seconds=round(target_s, 1),
                      train_seconds=round(time.perf_counter() - t1, 1),
                      total_seconds=round(time.perf_counter() - t0, 1), best_held_out=best_loss,
                      initial_held_out=history[0]["held_out"])
    target = dict(horizon=horizon, reduce=reduce, group_reduce=group_reduce, loss=loss, min_future=min_future,
                  min_distance=min_distance, last=last)
    meta = meta_for(config, model_name or str(params.source or "unnamed"), features, kind, hidden, target=target,
                    train=train_info)
    scorer = TrainedScorer({k: jnp.asarray(v) for k, v in best.items()}, meta, tuple(history))
    if out is not None:
        scorer.save(out)
    return scorer
