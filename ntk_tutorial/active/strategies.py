"""Active-learning query strategies behind one signature.

Every strategy is a function ``strategy(ctx, budget, key) -> np.ndarray`` returning ``budget``
distinct indices into ``ctx.x_pool`` (the candidate subset S already drawn from the unlabelled
pool).  ``key`` is a ``jax.random.key`` or an int; results are deterministic for a fixed key.
Adding a strategy is one function and one line in :data:`STRATEGIES`.

Score-based strategies (entropy, margin, BALD, MLMOC and its variants) query the top-``budget``
scores, with no diversity term; ties are broken at random (from ``key``).

=================  ==========================================================================
``random``         uniform without replacement
``entropy``        max entropy of the softmax prediction
``margin``         smallest gap between the two largest softmax probabilities
``bald``           mutual information between prediction and weights, MC dropout, T samples
``badge``          k-means++ seeding on last-layer gradient embeddings ``(p - e_yhat) (x) h``
``coreset``        greedy k-center on penultimate features (centres start at the labelled set)
``mlmoc``          Eq. 13 of Mohamadi, Bae & Sutherland 2022: ``sum_{x in S} ||Delta f(x)||_2``
                   for the pseudo-label ``argmax f_L(x')``, through :func:`lookahead.posterior_change`
``mlmoc-flips``    the released code's objective: how many pool predictions flip their arg-max
``emoc``           expectation of the MLMOC score over ``y' ~ softmax(f_L(x'))``
=================  ==========================================================================

The MLMOC family computes the kernel (``ctx.kernel``: ``"pntk"`` default, ``"entk"``,
``"trace"``) at the trained parameters on ``L u S`` once, fits the retraining proxy on ``L``
(:func:`lookahead.fit_proxy`, ``f_train`` = the network) and scores every candidate of S with
the change summed over S (S is both the candidate set and the set summed over, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels as _kernels
from .. import lookahead
from ..models import eval_fn

KERNELS: dict[str, Callable] = {
    "pntk": _kernels.pntk,
    "entk": _kernels.entk,
    "trace": _kernels.trace_ntk,
}


@dataclass
class Context:
    """Everything a strategy may look at.

    Attributes:
      apply_fn, params: the trained network (``apply_fn(params, x[, dropout_key]) -> logits``).
      x_labelled, y_labelled: the labelled set ``L`` (``(n, d)`` inputs, ``(n,)`` int labels).
      x_pool: ``(m, d)`` the candidates S (a random subset of the unlabelled pool).
      num_classes: ``k``.
      logits: ``(m, k)`` network outputs on ``x_pool`` (computed when ``None``).
      labelled_logits: ``(n, k)`` outputs on ``x_labelled`` (computed when ``None``).
      kernel: ``"pntk"``, ``"entk"`` or ``"trace"`` (MLMOC family).
      ridge: ridge of the retraining proxy (MLMOC family).
      mc_samples: dropout samples T for BALD.
    """

    apply_fn: Any
    params: Any
    x_labelled: np.ndarray
    y_labelled: np.ndarray
    x_pool: np.ndarray
    num_classes: int
    logits: np.ndarray | None = None
    labelled_logits: np.ndarray | None = None
    kernel: str = "pntk"
    ridge: float = 0.0
    mc_samples: int = 20
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.logits is None:
            self.logits = _logits(self.apply_fn, self.params, self.x_pool)
        if self.labelled_logits is None:
            self.labelled_logits = _logits(self.apply_fn, self.params, self.x_labelled)
        self.logits = np.asarray(self.logits, np.float64)
        self.labelled_logits = np.asarray(self.labelled_logits, np.float64)
        self.y_labelled = np.asarray(self.y_labelled, np.int64)

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


# examples per forward pass when scoring a pool with a convolutional net (bounds its
# activations); an MLP takes the pool in one pass
EVAL_BATCH = 1024


def _eval_batch(apply_fn) -> int | None:
    return None if getattr(apply_fn, "is_dense", False) else EVAL_BATCH


def _batched(fn, x, batch: int | None = EVAL_BATCH) -> np.ndarray:
    x = np.asarray(x)
    if batch is None or len(x) <= batch:
        return np.asarray(fn(jnp.asarray(x)), np.float64)
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch])), np.float64)
                           for i in range(0, len(x), batch)])


def _logits(apply_fn, params, x) -> np.ndarray:
    if len(x) == 0:
        k = jax.eval_shape(apply_fn, params, jnp.zeros((1,) + tuple(np.shape(x)[1:]))).shape[-1]
        return np.zeros((0, k))
    f = eval_fn(apply_fn)
    return _batched(lambda xb: f(params, xb), x, _eval_batch(apply_fn))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    """``-sum p log p`` along the last axis (``0 log 0 = 0``)."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def rng_from_key(key: Any) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (or an int)."""
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    data = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64)
    return np.random.default_rng([int(v) for v in data])


def _check_budget(budget: int, m: int) -> int:
    budget = int(budget)
    if not 0 <= budget <= m:
        raise ValueError(f"budget must be between 0 and the {m} candidates, got {budget}")
    return budget


def top_b(scores: np.ndarray, budget: int, key: Any) -> np.ndarray:
    """Indices of the ``budget`` largest scores; ties broken at random from ``key``."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    budget = _check_budget(budget, scores.size)
    tiebreak = rng_from_key(key).random(scores.size)
    order = np.lexsort((tiebreak, -scores))
    return order[:budget].astype(np.int64)


def penultimate_features(apply_fn, params, x) -> np.ndarray:
    """``(n, h)`` inputs of the readout layer (``h`` in the BADGE embedding, the core-set space).

    Any :func:`ntk_tutorial.models.functional` model with a ``features`` method (MLP, CNN, the
    wide ResNets, ResNet18; batch norm frozen)."""
    if not getattr(apply_fn, "has_features", False):
        raise NotImplementedError(
            "penultimate features need a model from ntk_tutorial.models (functional(model) of an "
            "MLP, CNN, WideResNet or ResNet18); BADGE and core-set use them")
    f = eval_fn(apply_fn, "features")
    return _batched(lambda xb: f(params, xb), x, _eval_batch(apply_fn))


def gradient_embeddings(ctx: Context) -> np.ndarray:
    """BADGE embeddings: gradient of the cross-entropy at the predicted label w.r.t. the last
    layer's weights, ``w_scale (p - e_yhat) (x) h``, ``(m, k h)``."""
    h = penultimate_features(ctx.apply_fn, ctx.params, ctx.x_pool)
    scale = getattr(ctx.apply_fn, "readout_scale", 1.0)
    p = ctx.probs
    g = p - np.eye(p.shape[1])[np.argmax(p, axis=1)]
    return scale * (g[:, :, None] * h[:, None, :]).reshape(len(p), -1)


def kmeans_pp_seeding(emb: np.ndarray, budget: int, key: Any) -> np.ndarray:
    """k-means++ seeding (BADGE): the first centre is the largest-norm point, each next one
    is drawn with probability proportional to its squared distance to the chosen centres."""
    emb = np.asarray(emb, np.float64)
    budget = _check_budget(budget, len(emb))
    rng = rng_from_key(key)
    if budget == 0:
        return np.zeros(0, np.int64)
    chosen = [int(np.argmax(np.sum(emb**2, axis=1)))]
    d2 = np.sum((emb - emb[chosen[0]]) ** 2, axis=1)
    while len(chosen) < budget:
        d2[chosen] = 0.0
        total = d2.sum()
        if total <= 0:  # all remaining points coincide with centres: pick uniformly
            rest = np.setdiff1d(np.arange(len(emb)), chosen)
            nxt = int(rng.choice(rest))
        else:
            nxt = int(rng.choice(len(emb), p=d2 / total))
        chosen.append(nxt)
        d2 = np.minimum(d2, np.sum((emb - emb[nxt]) ** 2, axis=1))
    return np.asarray(chosen, np.int64)


def k_center_greedy(pool: np.ndarray, centres: np.ndarray, budget: int) -> np.ndarray:
    """Greedy k-center (Sener & Savarese 2018): repeatedly take the pool point farthest from
    its nearest centre (the labelled points, then the points taken so far)."""
    pool = np.asarray(pool, np.float64)
    budget = _check_budget(budget, len(pool))
    if len(centres):
        c = np.asarray(centres, np.float64)
        d2 = ((pool**2).sum(1)[:, None] - 2 * pool @ c.T + (c**2).sum(1)[None]).min(axis=1)
        d2 = np.maximum(d2, 0.0)
    else:
        d2 = np.full(len(pool), np.inf)
    chosen = []
    for _ in range(budget):
        if chosen:
            d2[chosen] = -1.0
        nxt = int(np.argmax(d2))
        chosen.append(nxt)
        d2 = np.minimum(d2, np.sum((pool - pool[nxt]) ** 2, axis=1))
    return np.asarray(chosen, np.int64)


# ---------------------------------------------------------------------------------------------
# MLMOC family
# ---------------------------------------------------------------------------------------------


def lookahead_setup(ctx: Context):
    """Kernel on ``L u S`` at the trained parameters and the proxy fitted on ``L``.

    Returns ``(proxy, k_pool_train, k_pool_pool)``; cached on the context.
    """
    if "lookahead" in ctx.cache:
        return ctx.cache["lookahead"]
    if ctx.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {ctx.kernel!r}; choose one of {sorted(KERNELS)}")
    n = len(ctx.x_labelled)
    x_all = jnp.asarray(np.concatenate([ctx.x_labelled, ctx.x_pool]))
    k_all = np.asarray(KERNELS[ctx.kernel](ctx.apply_fn, ctx.params, x_all), np.float64)
    k_ll, k_sl, k_ss = k_all[:n, :n], k_all[n:, :n], k_all[n:, n:]
    y_l = np.eye(ctx.num_classes)[ctx.y_labelled]
    proxy = lookahead.fit_proxy(k_ll, y_l, ctx.labelled_logits, ridge=ctx.ridge)
    ctx.cache["lookahead"] = (proxy, k_sl, k_ss)
    return ctx.cache["lookahead"]


def mlmoc_scores(ctx: Context, reduce: str = "l2") -> np.ndarray:
    """Per-candidate MLMOC score with the pseudo-label ``argmax f_L(x')`` (``reduce``: ``"l2"``
    Eq. 13, ``"flips"`` the released code's count)."""
    proxy, k_sl, k_ss = lookahead_setup(ctx)
    return np.asarray(lookahead.posterior_change(
        proxy, k_sl, k_ss, ctx.logits, lookahead.pseudo_labels(ctx.logits), reduce=reduce),
        np.float64)


def emoc_scores(ctx: Context) -> np.ndarray:
    """``E_{y' ~ softmax(f_L(x'))} sum_{x in S} ||Delta f(x)||_2``: one pass per class."""
    proxy, k_sl, k_ss = lookahead_setup(ctx)
    p = ctx.probs
    m, k = p.shape
    if proxy.scalar:
        # scalar kernel: ||Delta(x; x')|| = |C(x, x')| ||y' - f_lin(x')|| / |C(x', x') + shift|, so
        # the label enters only through ||y' - f_lin(x')||: one pass over the pool with a unit
        # residual gives the rest, then the expectation over y' is a (m, k) sum (k times cheaper)
        f_lin = proxy.predict(k_sl, ctx.logits)
        unit = np.zeros((m, k))
        unit[:, 0] = 1.0
        geometry = np.asarray(lookahead.posterior_change(proxy, k_sl, k_ss, ctx.logits, f_lin + unit,
                                                         reduce="l2"), np.float64)
        residual = np.linalg.norm(np.eye(k)[None, :, :] - f_lin[:, None, :], axis=2)  # (m, k)
        return geometry * np.sum(p * residual, axis=1)
    total = np.zeros(m)
    for c in range(k):
        y = np.zeros((m, k))
        y[:, c] = 1.0
        total += p[:, c] * lookahead.posterior_change(proxy, k_sl, k_ss, ctx.logits, y, reduce="l2")
    return total


# ---------------------------------------------------------------------------------------------
# the strategies
# ---------------------------------------------------------------------------------------------


def random_strategy(ctx: Context, budget: int, key: Any) -> np.ndarray:
    m = len(ctx.x_pool)
    return rng_from_key(key).choice(m, _check_budget(budget, m), replace=False).astype(np.int64)


def entropy_scores(ctx: Context) -> np.ndarray:
    return entropy(ctx.probs)


def margin_scores(ctx: Context) -> np.ndarray:
    """Negative margin ``-(p_1 - p_2)``: the smallest margins score highest."""
    p = np.sort(ctx.probs, axis=1)
    return -(p[:, -1] - p[:, -2])


def bald_scores(ctx: Context, key: Any) -> np.ndarray:
    """``H(mean_t p_t) - mean_t H(p_t)`` over ``ctx.mc_samples`` dropout masks (zeros when the
    model has no dropout: every sample is the same network)."""
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    f = eval_fn(ctx.apply_fn)
    probs = np.stack([softmax(_batched(lambda xb: f(ctx.params, xb, jax.random.fold_in(key, t)), ctx.x_pool,
                                     _eval_batch(ctx.apply_fn)))
                      for t in range(int(ctx.mc_samples))])
    return entropy(probs.mean(0)) - entropy(probs).mean(0)


def _scored(score_fn: Callable[[Context], np.ndarray]):
    def strategy(ctx: Context, budget: int, key: Any) -> np.ndarray:
        return top_b(score_fn(ctx), budget, key)

    strategy.__name__ = f"top_b_{score_fn.__name__}"
    strategy.__doc__ = f"Top-``budget`` of :func:`{score_fn.__name__}`."
    strategy.scores = score_fn
    return strategy


def bald_strategy(ctx: Context, budget: int, key: Any) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    k_drop, k_tie = jax.random.split(key)
    return top_b(bald_scores(ctx, k_drop), budget, k_tie)


def badge_strategy(ctx: Context, budget: int, key: Any) -> np.ndarray:
    return kmeans_pp_seeding(gradient_embeddings(ctx), budget, key)


def coreset_strategy(ctx: Context, budget: int, key: Any) -> np.ndarray:
    pool = penultimate_features(ctx.apply_fn, ctx.params, ctx.x_pool)
    lab = penultimate_features(ctx.apply_fn, ctx.params, ctx.x_labelled)
    return k_center_greedy(pool, lab, budget)


STRATEGIES: dict[str, Callable[[Context, int, Any], np.ndarray]] = {
    "random": random_strategy,
    "entropy": _scored(entropy_scores),
    "margin": _scored(margin_scores),
    "bald": bald_strategy,
    "badge": badge_strategy,
    "coreset": coreset_strategy,
    "mlmoc": _scored(lambda ctx: mlmoc_scores(ctx, "l2")),
    "mlmoc-flips": _scored(lambda ctx: mlmoc_scores(ctx, "flips")),
    "emoc": _scored(emoc_scores),
}

# strategies whose scores come from the retraining proxy (usable in sequential mode)
LOOKAHEAD = {"mlmoc": "l2", "mlmoc-flips": "flips", "emoc": "emoc"}


def get(name: str) -> Callable[[Context, int, Any], np.ndarray]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None


def select(name: str, ctx: Context, budget: int, key: Any) -> np.ndarray:
    """Run strategy ``name`` and check its answer: ``budget`` distinct indices into the pool."""
    idx = np.asarray(get(name)(ctx, budget, key), np.int64)
    m = len(ctx.x_pool)
    if idx.shape != (budget,) or len(set(idx.tolist())) != budget or (budget and (idx.min() < 0 or idx.max() >= m)):
        raise RuntimeError(f"strategy {name!r} returned {idx!r}, not {budget} distinct indices into {m}")
    return idx


# ---------------------------------------------------------------------------------------------
# sequential look-ahead (labels added through the proxy, no SGD)
# ---------------------------------------------------------------------------------------------


def proxy_scores(proxy, k_pool_train, k_pool_pool, f_pool, objective: str) -> np.ndarray:
    """Look-ahead scores of every pool point for a proxy (``objective``: l2, flips or emoc)."""
    if objective in ("l2", "flips"):
        return np.asarray(lookahead.posterior_change(
            proxy, k_pool_train, k_pool_pool, f_pool, lookahead.pseudo_labels(f_pool),
            reduce=objective), np.float64)
    if objective == "emoc":
        p = softmax(f_pool)
        m, k = p.shape
        total = np.zeros(m)
        for c in range(k):
            y = np.zeros((m, k))
            y[:, c] = 1.0
            total += p[:, c] * lookahead.posterior_change(proxy, k_pool_train, k_pool_pool, f_pool, y,
                                                          reduce="l2")
        return total
    raise ValueError(f"unknown look-ahead objective {objective!r}")
