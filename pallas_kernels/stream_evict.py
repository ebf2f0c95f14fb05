"""Decode-time eviction of one layer in one kernel: statistics, victim and in-place move.

    stream_evict(start, length, length0, budget [B, H] int32, active, step_due [B] bool, next_pos [B] int32,
                 logits [B, H, G', C] float32, lse [B, H, G] float32,
                 pos [B, P] int32, score, score2 [B, P] float32, k, v [B, P, D], *, update, ...)
        -> (pos, score, score2, k, v, new_length [B, H] int32)

After a decode step appended one token to every active stream, each stream (b, h) (the slots
`[start, start + length)` of sequence b's pools, `length` counting the new token, `length0` not)
looks at its first W offsets (its *view*):

1. probabilities: p[j] = reduce_g exp(logits[b, h, g, offset + j] - lse[b, h, g]) over the group's
   G query heads ("mean" or "max"), 0 past the stream's end (the attention kernel's
   `stream_logits` and `return_lse`; `logits_offset` = the column of offset 0);
   `layer_mean`: p = the mean over the layer's heads of the heads holding offset j (TOVA);
   `pool_kernel` k > 1: p = avg-pool of p with k taps inside the stream, zero padded (CAKE);
2. statistics: the new token's (offset length0, active rows) start at 0; then on active rows
   score = score + p (`update="add"`, H2O) or score = p (`update="set"`, TOVA, CAKE); score2 stays,
   except with `robust` (RoCo): score2 = score2 + p * p;
3. eviction: candidates are the stream's slots with sinks <= pos <= next_pos - recent; a stream
   longer than its budget (rows with step_due & active; never otherwise) with a candidate evicts
   its lowest-score candidate (ties: the lowest offset) by moving its last slot into it (k, v, pos,
   score, score2) and shrinks by one; `robust`: the lowest mean attention mu among the candidates
   outside the n_volatile = max(#candidates - scope, 0) with the largest standard deviation sigma
   (ties: the lower offset is more volatile), mu and sigma over the npos + 1 - pos queries that saw
   the slot (kvjax/policies/roco.py);
4. pos, score and score2 of the stream's slots go back into the pools; other slots are untouched.

The GPU (Triton) kernel runs one program per stream (or per `heads_per_program` streams of a
sequence), grid (B, H / heads_per_program); the pools are whole-array refs aliased in and out
(updated in place), read with masked `pl.ds` loads of W' = next power of two >= W slots. The
statistics never leave registers: a victim's replacement comes from the view by a masked max, not
from memory. Layer-shared probabilities (TOVA) are computed before the kernel, once per sequence
(`layer_mean_probs`, one XLA fusion): each program then reads one row, where reading every head's
logits of its sequence made a TOVA program 8x an H2O program's work (Llama's 8 KV heads). Pooling
(CAKE) exponentiates each offset once: the group's probabilities go to
a scratch row of the program, and the k taps reload it shifted (masked; from L1/L2). RoCo's victim:
up to `ROBUST_WALK` candidates in mean order, each checked by counting the candidates more volatile
than it; if none is outside the volatile set, an exact search (bisection on sigma's bits, then on
the offset among ties). Streams must satisfy start + length <= P and length <= W.
`stream_evict_reference` is the same math in plain jnp over gathered views (the XLA fallback and
the tests' reference; RoCo's volatile set from a stable sort); the order of every floating-point
sum is the kernel's: over the group and the heads in index order, the pooling taps from left to
right.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import _common

_INT_MAX = jnp.iinfo(jnp.int32).max
UPDATES = ("add", "set")


def _i(x):
    """An int32 index (interpret mode's masked loads take no Python ints in `.at`)."""
    return jnp.asarray(x, jnp.int32)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# the math shared by the kernel and the reference (on [..., W'] arrays, j the offsets)


def _layer_mean(per_head, inside_per_head):
    """TOVA: per_head / inside_per_head lists of [..., W'] (each head's p, 0 outside its stream) ->
    the mean over the heads holding each offset (the caller zeroes it outside each stream)."""
    total = jnp.where(inside_per_head[0], per_head[0], 0.0)
    count = inside_per_head[0].astype(jnp.int32)
    for p, ins in zip(per_head[1:], inside_per_head[1:]):
        total = total + jnp.where(ins, p, 0.0)
        count = count + ins.astype(jnp.int32)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def _group_probs(lg, lse, length, *, col0: int, width: int, wp: int, group_reduce: str, shift: int = 0):
    """[B, H, W'] each stream's group-reduced probabilities at offsets j + shift (0 outside
    [0, length) and W), from logits lg [B, H, G', C] padded so that offset 0 sits at column col0
    and every column read exists; length [B, H, 1]."""
    o = jnp.arange(wp) + shift
    ok = (o >= 0) & (o < length) & (o < width)
    cols = lg[..., col0 + shift:col0 + shift + wp]
    return _common.reduce_terms([jnp.where(ok, jnp.exp(cols[:, :, gi] - lse[:, :, gi, None]), 0.0)
                          for gi in range(lse.shape[2])], group_reduce)


def layer_mean_probs(logits, lse, length, *, width: int, logits_offset: int = 0, group_reduce: str = "mean"):
    """TOVA's layer-shared probabilities [B, W']: each head's group-reduced p at offsets j (0 past
    its stream's `length` [B, H] and W), averaged over the heads holding j. Plain jnp: on GPU one
    XLA fusion reads every head's logits once, where a kernel program per stream would read them
    all again for each of its sequence's streams."""
    wp = _pow2(width)
    n = length.astype(jnp.int32)[..., None]
    lg = jnp.pad(logits.astype(jnp.float32), ((0, 0),) * 3 + ((0, wp),))
    ph = _group_probs(lg, lse, n, col0=logits_offset, width=width, wp=wp, group_reduce=group_reduce)
    inside = (jnp.arange(wp) < n) & (jnp.arange(wp) < width)  # [B, H, W']
    return _layer_mean([ph[:, hh] for hh in range(ph.shape[1])], [inside[:, hh] for hh in range(ph.shape[1])])


def _moments(s, s2, pos_w, npos):
    """RoCo's mean and standard deviation of each slot's attention over the queries that saw it
    (kvjax.policies.roco.running_moments with seen = npos + 1)."""
    count = jnp.maximum(npos + 1 - pos_w, 1).astype(jnp.float32)
    mu = s / count
    return mu, jnp.sqrt(jnp.maximum(s2 / count - mu * mu, 0.0))


#: candidates RoCo's kernel tries in mean order before it searches the volatile set exactly
ROBUST_WALK = 2


def _bisect_last(lo, hi, ok):
    """The largest t in [lo, hi] with ok(t), for an ok that holds at lo and for every t up to the
    answer and for none above it: bisection with a data-dependent trip count (log2 of the range)."""
    def step(carry):
        lo, hi = carry
        mid = lo + (hi - lo + 1) // 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

    lo, _ = jax.lax.while_loop(lambda c: c[0] < c[1], step, (lo, hi))
    return lo


def _robust_threshold_victim(j, cand, mu, sigma, n_volatile):
    """RoCo's victim by an exact search of the volatile set (n_volatile >= 1): the n_volatile-th
    largest sigma among the candidates, bisected on its bits between the candidates' smallest and
    largest (sigma >= 0, so the int32 bits order as the values); then, if the slots tied at it are
    not all volatile, the offset below which they are (the lower offset counts as more volatile)."""
    def count(mask):
        return jnp.sum(mask.astype(jnp.int32))

    bits = jnp.maximum(jax.lax.bitcast_convert_type(sigma, jnp.int32), 0)
    lo = jnp.min(jnp.where(cand, bits, _INT_MAX))
    hi = jnp.max(jnp.where(cand, bits, 0))
    thr = _bisect_last(lo, jnp.maximum(hi, lo), lambda t: count(cand & (bits >= t)) >= n_volatile)
    above = cand & (bits > thr)
    tie = cand & (bits == thr)
    need = n_volatile - count(above)
    width = j.shape[-1]
    all_tied = need >= count(tie)
    # cut - 1 = the largest c with fewer than `need` tied slots below it (all tied: cut = W', no search)
    start = jnp.where(all_tied, jnp.int32(width), jnp.int32(0))
    cut = _bisect_last(start, jnp.int32(width), lambda c: count(tie & (j < c)) < need)
    cut = jnp.where(all_tied, width, cut + 1)
    volatile = above | (tie & (j < cut))
    return jax.lax.argmin(jnp.where(cand & ~volatile, mu, jnp.inf), 0, jnp.int32)


def _robust_victim_search(j, cand, mu, sigma, n_volatile, walk: int = ROBUST_WALK):
    """RoCo's victim on one view (the kernel: scalars and [W'] vectors): the candidate with the lowest
    mu (ties: lowest offset) among those at least `n_volatile` candidates are more volatile than
    (sigma larger, or equal at a lower offset). First walks up to `walk` candidates in (mu, offset)
    order until one is not volatile (where a slot's mean and spread go together, the first is);
    if all of those are volatile, searches the volatile set exactly (`_robust_threshold_victim`;
    generate's random-weight states, the same token at every step, often get there)."""
    def more_volatile(v, sv):
        return jnp.sum((cand & ((sigma > sv) | ((sigma == sv) & (j < v)))).astype(jnp.int32))

    def step(carry):
        _, m_prev, v_prev, tries = carry
        after = cand & ((mu > m_prev) | ((mu == m_prev) & (j > v_prev)))
        key = jnp.where(after, mu, jnp.inf)
        v = jax.lax.argmin(key, 0, jnp.int32)
        at = j == v
        m, sv = jnp.max(jnp.where(at, key, -jnp.inf)), jnp.max(jnp.where(at, sigma, -jnp.inf))
        left = m < jnp.inf  # a candidate was left to try
        return left & (more_volatile(v, sv) < n_volatile), m, v, tries + 1

    init = (jnp.sum(cand.astype(jnp.int32)) > 0, jnp.float32(-jnp.inf), jnp.int32(-1), jnp.int32(0))
    unresolved, _, walked, _ = jax.lax.while_loop(lambda c: c[0] & (c[3] < walk), step, init)
    victim = jax.lax.cond(unresolved, lambda: _robust_threshold_victim(j, cand, mu, sigma, n_volatile),
                          lambda: walked)
    return jnp.maximum(victim, 0)


def _robust_key_sorted(cand, mu, sigma, n_volatile):
    """The reference's RoCo key [..., W']: mu on the candidates outside the `n_volatile` [..., 1] most
    volatile ones (stable sort of -sigma: ties, the lower offset is more volatile), +inf elsewhere."""
    order = jnp.argsort(-jnp.where(cand, sigma, -jnp.inf), axis=-1, stable=True)
    first = jnp.arange(cand.shape[-1]) < n_volatile
    idx = tuple(jnp.indices(cand.shape, sparse=True)[:-1]) + (order,)
    volatile = jnp.zeros(cand.shape, bool).at[idx].set(first) & cand
    return jnp.where(cand & ~volatile, mu, jnp.inf)


def _evict_view(j, inside, n, n0, budget, act, due, npos, p, pos_w, s, s2, *, update, recent, sinks,
                robust=False, scope=None):
    """Statistics and victim on a stream view. j [W'] offsets; inside [..., W']; n, n0, budget,
    act, due, npos scalars (or [..., 1]); p the probabilities (0 outside); pos_w (-1 outside), s, s2
    the loaded views; robust (RoCo): score2 accumulates p * p and the victim follows RoCo's rule
    with `scope` candidates in scope. Returns (pos_w, s, s2, over, victim, last) after the swap-remove."""
    blank = ~inside | ((j == n0) & act)
    s, s2 = jnp.where(blank, 0.0, s), jnp.where(blank, 0.0, s2)
    new = s + p if update == "add" else p
    s = jnp.where(inside & act, new, s)
    if robust:
        s2 = jnp.where(inside & act, s2 + p * p, s2)
    protected = (pos_w > npos - recent) | (pos_w < sinks)
    cand = inside & ~protected
    target = jnp.where(due & act, budget, _INT_MAX)
    keep = (lambda x: x[..., None]) if inside.ndim > 1 else (lambda x: x)  # noqa: E731  (scalars in the kernel)
    count = keep(jnp.sum(cand.astype(jnp.int32), axis=-1))
    has = count > 0
    over = (n > target) & has
    if robust:
        mu, sigma = _moments(s, s2, pos_w, npos)
        n_volatile = jnp.maximum(count - scope, 0)
        if inside.ndim > 1:
            victim = keep(jnp.argmin(_robust_key_sorted(cand, mu, sigma, n_volatile), axis=-1).astype(jnp.int32))
        else:
            victim = _robust_victim_search(j, cand, mu, sigma, n_volatile)
    else:
        key = jnp.where(cand, s, jnp.inf)
        victim = keep(jax.lax.argmin(key, key.ndim - 1, jnp.int32))
    last = jnp.maximum(n - 1, 0)
    src = j == last
    here = (j == victim) & over

    def move(a, lowest):
        moved = keep(jnp.max(jnp.where(src, a, lowest), axis=-1))  # the value at `last`, exactly
        return jnp.where(here, moved, a)

    return (move(pos_w, jnp.iinfo(jnp.int32).min), move(s, -jnp.inf), move(s2, -jnp.inf), over, victim, last)


# ---------------------------------------------------------------------------------------------
# GPU (Triton) kernel


def _gpu_kernel(start_ref, len_ref, len0_ref, budget_ref, scope_ref, act_ref, due_ref, npos_ref, logits_ref, lse_ref,
                pos_ref, score_ref, score2_ref, k_ref, v_ref,
                pos_out, score_out, score2_out, k_out, v_out, len_out, pooled_ref, *,
                hb, g, width, wp, col0, update, group_reduce, layer_mean, pool_kernel, recent, sinks, robust,
                interpret):
    j = jax.lax.broadcasted_iota(jnp.int32, (wp,), 0)
    # the logits' column 0 as a traced value: Pallas checks windows with static starts against the
    # array's bounds, and a window of W' lanes may overhang it (masked: nothing is read there)
    col0 = col0 + 0 * pl.program_id(0)
    act = act_ref[0, 0] != 0
    due = due_ref[0, 0] != 0
    npos = npos_ref[0, 0]

    def probs(hh, n_hh):
        """Head hh's group-reduced probabilities at offsets j (0 outside [0, n_hh) and W)."""
        ok = (j < n_hh) & (j < width)
        terms = []
        for gi in range(g):
            lg = pltriton.load(logits_ref.at[_i(0), _i(hh), _i(gi), pl.ds(col0, wp)], mask=ok, other=0.0)
            terms.append(jnp.where(ok, jnp.exp(lg - lse_ref[0, hh, gi]), 0.0))
        return _common.reduce_terms(terms, group_reduce)

    if layer_mean:  # the logits ref holds `layer_mean_probs` [1, 1, 1, W'] (column 0 = offset 0)
        mean = pltriton.load(logits_ref.at[_i(0), _i(0), _i(0), pl.ds(0, wp)])

    for hi in range(hb):
        h = pl.program_id(1) * hb + hi
        start = start_ref[0, h]
        n = len_ref[0, h]
        inside = (j < n) & (j < width)
        if layer_mean:
            p = jnp.where(inside, mean, 0.0)
        elif pool_kernel > 1:
            # the group's probabilities once, through a scratch row (pad columns either side, never
            # read: masked), then the taps as shifted reloads from L1/L2
            pad = pool_kernel // 2
            row = lambda at: pooled_ref.at[_i(0), _i(hi), pl.ds(_i(at), wp)]  # noqa: E731
            pltriton.store(row(pad), probs(h, n), mask=inside)
            if not interpret:
                pltriton.debug_barrier()  # the row's stores are visible to every thread of the program
            p = jnp.zeros((wp,), jnp.float32)
            for d in range(-pad, pool_kernel - pad):
                o = j + d
                ok = (o >= 0) & (o < n) & (o < width)
                p = p + pltriton.load(row(pad + d), mask=ok, other=0.0)
            p = jnp.where(inside, p / pool_kernel, 0.0)
        else:
            p = probs(h, n)

        view = lambda ref: ref.at[_i(0), pl.ds(start, wp)]  # noqa: E731
        pos_w = pltriton.load(view(pos_ref), mask=inside, other=-1)
        s = pltriton.load(view(score_ref), mask=inside, other=0.0)
        s2 = pltriton.load(view(score2_ref), mask=inside, other=0.0)
        pos_w = jnp.where(inside, pos_w, -1)
        pos_w, s, s2, over, victim, last = _evict_view(j, inside, n, len0_ref[0, h], budget_ref[0, h], act, due, npos,
                                                       p, pos_w, s, s2, update=update, recent=recent, sinks=sinks,
                                                       robust=robust, scope=scope_ref[0, h])
        pltriton.store(view(pos_out), pos_w, mask=inside)
        pltriton.store(view(score_out), s.astype(score_out.dtype), mask=inside)
        pltriton.store(view(score2_out), s2.astype(score2_out.dtype), mask=inside)

        @pl.when(over)
        def _():
            src, dst = start + last, start + victim
            k_out[0, pl.ds(dst, 1), :] = k_ref[0, pl.ds(src, 1), :]
            v_out[0, pl.ds(dst, 1), :] = v_ref[0, pl.ds(src, 1), :]

        len_out[0, hi] = n - over.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("update", "group_reduce", "layer_mean", "pool_kernel", "recent",
                                             "sinks", "robust", "width", "logits_offset", "interpret", "num_warps",
                                             "heads_per_program"))
def _stream_evict_pallas(start, length, length0, budget, scope, active, step_due, next_pos, logits, lse, pos, score,
                         score2, k, v, *, update, group_reduce, layer_mean, pool_kernel, recent, sinks, robust, width,
                         logits_offset, interpret, num_warps, heads_per_program):
    b, h = start.shape
    hb = heads_per_program
    g = lse.shape[2]
    p, d = k.shape[1], k.shape[2]
    wp = _pow2(width)
    col0 = logits_offset
    pad = pool_kernel // 2 if pool_kernel > 1 else 0
    wpad = wp + 2 * pad if pool_kernel > 1 else 1  # the pooling scratch rows (unused without pooling)
    if layer_mean:  # computed once per sequence, outside (see layer_mean_probs)
        logits = layer_mean_probs(logits, lse, length, width=width, logits_offset=logits_offset,
                                  group_reduce=group_reduce)[:, None, None, :]
        col0 = 0
    kernel = functools.partial(_gpu_kernel, hb=hb, g=g, width=width, wp=wp, col0=col0, update=update,
                               group_reduce=group_reduce, layer_mean=layer_mean, pool_kernel=pool_kernel,
                               recent=recent, sinks=sinks, robust=robust, interpret=interpret)
    row = pl.BlockSpec((1, h), lambda i, j: (i, 0))
    one = pl.BlockSpec((1, 1), lambda i, j: (i, 0))
    per_seq = lambda shape: pl.BlockSpec((1,) + shape, lambda i, j: (i,) + (0,) * len(shape))  # noqa: E731
    in_specs = [row, row, row, row, row, one, one, one, per_seq(logits.shape[1:]), per_seq(lse.shape[1:]),
                per_seq((p,)), per_seq((p,)), per_seq((p,)), per_seq((p, d)), per_seq((p, d))]
    out_specs = [per_seq((p,)), per_seq((p,)), per_seq((p,)), per_seq((p, d)), per_seq((p, d)),
                 pl.BlockSpec((1, hb), lambda i, j: (i, j)), pl.BlockSpec((1, hb, wpad), lambda i, j: (i, j, 0))]
    out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (pos, score, score2, k, v)] + [
        jax.ShapeDtypeStruct((b, h), jnp.int32), jax.ShapeDtypeStruct((b, h, wpad), jnp.float32)]
    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    col = lambda a: i32(a).reshape(b, 1)  # noqa: E731
    return pl.pallas_call(  # the results but the scratch rows
        kernel,
        grid=(b, h // hb),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={10: 0, 11: 1, 12: 2, 13: 3, 14: 4},
        interpret=interpret,
        name="stream_evict_gpu",
        **_common.triton_kwargs(interpret, num_warps),
    )(i32(start), i32(length), i32(length0), i32(budget), i32(scope), col(active), col(step_due), col(next_pos),
      logits.astype(jnp.float32), lse.astype(jnp.float32), i32(pos), score, score2, k, v)[:6]


# ---------------------------------------------------------------------------------------------
# the plain-jnp reference


def stream_evict_reference(start, length, length0, budget, active, step_due, next_pos, logits, lse, pos, score,
                           score2, k, v, *, update: str, group_reduce: str = "mean", layer_mean: bool = False,
                           pool_kernel: int = 1, recent: int = 0, sinks: int = 0, width: int | None = None,
                           logits_offset: int = 0, robust: bool = False, scope=None):
    """The kernel's math on gathered views [B, H, W'] (XLA: gathers, a select per statistic, scatters;
    RoCo's volatile set from a sort). Arguments and results as `stream_evict`."""
    b, h = start.shape
    pool_size = pos.shape[1]
    width = logits.shape[-1] - logits_offset if width is None else width
    wp = _pow2(width)
    j = jnp.arange(wp)
    n, n0, bud = (a.astype(jnp.int32)[..., None] for a in (length, length0, budget))
    act, due = active[:, None, None], step_due[:, None, None]
    npos = next_pos.astype(jnp.int32)[:, None, None]
    pad = pool_kernel // 2 if pool_kernel > 1 else 0
    lg = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, 0), (0, 0), (pad, pad + wp)))

    def probs(length_, shift=0):  # [B, H, W'] at offsets j + shift
        return _group_probs(lg, lse, length_, col0=logits_offset + pad, width=width, wp=wp,
                            group_reduce=group_reduce, shift=shift)

    inside = (j < n) & (j < width)
    if layer_mean:
        p = jnp.where(inside, layer_mean_probs(logits, lse, length, width=width, logits_offset=logits_offset,
                                               group_reduce=group_reduce)[:, None], 0.0)
    elif pool_kernel > 1:
        p = jnp.zeros((b, h, wp), jnp.float32)
        for d in range(-pad, pool_kernel - pad):
            p = p + probs(n, d)
        p = jnp.where(inside, p / pool_kernel, 0.0)
    else:
        p = probs(n)
    idx = jnp.minimum(start[..., None] + j, pool_size - 1)
    rows = jnp.arange(b)[:, None, None]
    pos_w = jnp.where(inside, pos[rows, idx], -1)
    s = jnp.where(inside, score[rows, idx], 0.0)
    s2 = jnp.where(inside, score2[rows, idx], 0.0)
    pos_w, s, s2, over, victim, last = _evict_view(j, inside, n, n0, bud, act, due, npos, p, pos_w, s, s2,
                                                   update=update, recent=recent, sinks=sinks, robust=robust,
                                                   scope=None if scope is None else scope.astype(jnp.int32)[..., None])
    dest = jnp.where(inside, idx, pool_size + jnp.arange(h * wp).reshape(1, h, wp))  # distinct, dropped
    put = lambda a, w: a.at[rows, dest].set(w.astype(a.dtype), mode="drop", unique_indices=True)  # noqa: E731
    over, victim, last = over[..., 0], victim[..., 0], last[..., 0]
    r2 = jnp.arange(b)[:, None]
    src, dst = start + last, jnp.where(over, start + victim, pool_size)  # pool_size: dropped

    def move(a):
        return a.at[r2, dst].set(a[r2, jnp.minimum(src, pool_size - 1)], mode="drop")

    return (put(pos, pos_w), put(score, s), put(score2, s2), move(k), move(v),
            (length - over.astype(length.dtype)).astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# public entry point


def stream_evict(start, length, length0, budget, active, step_due, next_pos, logits, lse, pos, score, score2, k, v,
                 *, update: str, group_reduce: str = "mean", layer_mean: bool = False, pool_kernel: int = 1,
                 recent: int = 0, sinks: int = 0, width: int | None = None, logits_offset: int = 0,
                 robust: bool = False, scope=None, implementation: str = "pallas", interpret=False,
                 num_warps: int | None = None, heads_per_program: int = 1):
    """One layer's decode-time eviction (see module docstring). `implementation="pallas"`: the GPU
    (Triton) kernel (`interpret=True` runs it on CPU); "xla": `stream_evict_reference`.
    logits [B, H, G', C] with offset j of stream (b, h) at column `logits_offset + j` (C >=
    logits_offset + W; rows past G = lse.shape[2] ignored); width W defaults to C - logits_offset.
    heads_per_program: streams per kernel program (a divisor of H; grid (B, H / it)).
    robust (RoCo, with update="add"): score2 accumulates p * p and the victim is RoCo's, with scope
    [B, H] int32 the candidates in scope per stream (`kvjax.policies.roco.scope_size`).
    Returns (pos, score, score2, k, v, length [B, H] int32); the pools are updated in place on GPU."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if group_reduce not in ("mean", "max"):
        raise ValueError(f"group_reduce must be 'mean' or 'max', got {group_reduce!r}")
    if layer_mean and (pool_kernel > 1 or update != "set"):
        raise ValueError("layer_mean goes with update='set' and no pooling (TOVA)")
    if robust and (update != "add" or layer_mean or pool_kernel > 1 or scope is None):
        raise ValueError("robust (RoCo) goes with update='add', no layer mean, no pooling and a scope [B, H]")
    width = logits.shape[-1] - logits_offset if width is None else width
    kw = dict(update=update, group_reduce=group_reduce, layer_mean=layer_mean, pool_kernel=pool_kernel,
              recent=recent, sinks=sinks, width=width, logits_offset=logits_offset, robust=robust)
    if implementation == "xla":
        return stream_evict_reference(start, length, length0, budget, active, step_due, next_pos, logits, lse, pos,
                                      score, score2, k, v, scope=scope, **kw)
    scope = budget if scope is None else scope  # read only with robust: no array made for it
    args = (start, length, length0, budget, scope, active, step_due, next_pos, logits, lse, pos, score, score2, k, v)
    if implementation != "pallas":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    if heads_per_program < 1 or start.shape[1] % heads_per_program:
        raise ValueError(f"heads_per_program must divide H = {start.shape[1]}, got {heads_per_program}")
    return tuple(_stream_evict_pallas(*args, **kw, interpret=interpret, num_warps=num_warps,
                                      heads_per_program=heads_per_program))
