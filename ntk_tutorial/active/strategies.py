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
                   for the pseudo-label of x', through :func:`lookahead.posterior_change`
``mlmoc-flips``    the released code's objective: how many pool predictions flip their arg-max
``emoc``           expectation of the MLMOC score over ``y' ~ p(. | x')``
=================  ==========================================================================

The MLMOC family computes the kernel (``ctx.kernel``: ``"pntk"`` default, ``"entk"``,
``"trace"``) at the trained parameters on ``L u S`` once, fits the retraining proxy on ``L``
(:func:`lookahead.fit_proxy`, ``f_train`` = the network) and scores every candidate of S with
the change summed over S (S is both the candidate set and the set summed over, as in the paper).

Two settings say what the change is measured from and which retraining it approximates:

* ``ctx.relative_to``: ``"network"`` (default): ``f_L+ - f_L``, the change from the trained
  network (Eq. 13's wording; the released code's batch mode counts flips against the network's
  arg-max); ``"proxy"``: ``f_L+ - f_lin_L``, the change of the linearised model (the released
  code's sequential mode).  The pseudo-label of a candidate is the arg-max of that reference.
* ``ctx.proxy`` (:data:`PROXIES`): ``"linearised"`` (default; the network linearised at
  ``theta_L`` and retrained to convergence, Eq. 11), ``"infinite-ntk"`` (kernel regression with
  the analytic infinite-width NTK of the MLP), ``"gp"`` (the NNGP posterior mean) or
  ``"one-step-sgd"`` (one SGD step of rate ``ctx.lr`` on the candidate alone): the proxies of
  Fig. 1b of the paper.

Probabilities (entropy, margin, BALD, BADGE, EMOC's expectation) are the softmax of the outputs,
or with ``ctx.probabilities="simplex"`` their Euclidean projection onto the probability simplex
(:func:`simplex_projection`), which is what the released code uses for a network trained with
the square loss: the softmax of such outputs is nearly uniform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels as _kernels
from .. import lookahead
from ..data import one_hot
from ..models import Model, call, eval_fn, has_features

KERNELS: dict[str, Callable] = {
    "pntk": _kernels.pntk,
    "entk": _kernels.entk,
    "trace": _kernels.trace_ntk,
}
# approximations of retraining inside the look-ahead strategies (Fig. 1b of the paper)
PROXIES = ("linearised", "infinite-ntk", "gp", "one-step-sgd")
REFERENCES = ("network", "proxy")
PROBABILITIES = ("softmax", "simplex")


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
      relative_to: ``"network"`` or ``"proxy"``: what the look-ahead change is measured from
        (see the module docstring).
      proxy: the approximation of retraining, one of :data:`PROXIES`.
      probabilities: ``"softmax"`` or ``"simplex"`` (see the module docstring).
      lr: step of the ``"one-step-sgd"`` proxy.
      state: the network's batch-norm running statistics (``None`` without batch norm).
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
    relative_to: str = "network"
    proxy: str = "linearised"
    probabilities: str = "softmax"
    lr: float = 1.0
    state: Any = None
    cache: dict = field(default_factory=dict, repr=False)
    timings: dict = field(default_factory=dict, repr=False)  # seconds spent on kernels ("kernel_s")

    def __post_init__(self):
        for name, allowed in (("relative_to", REFERENCES), ("proxy", PROXIES),
                              ("probabilities", PROBABILITIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.logits is None:
            self.logits = _logits(self.apply_fn, self.params, self.x_pool, self.state)
        if self.labelled_logits is None:
            self.labelled_logits = _logits(self.apply_fn, self.params, self.x_labelled, self.state)
        self.logits = np.asarray(self.logits, np.float64)
        self.labelled_logits = np.asarray(self.labelled_logits, np.float64)
        self.y_labelled = np.asarray(self.y_labelled, np.int64)

    @property
    def probs(self) -> np.ndarray:
        """``(m, k)`` class probabilities of the candidates (``self.probabilities``)."""
        return probabilities(self.logits, self.probabilities)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


# examples per forward pass when scoring a pool with a convolutional net (bounds its
# activations); an MLP takes the pool in one pass
EVAL_BATCH = 1024


def _eval_batch(apply_fn) -> int | None:
    return None if isinstance(apply_fn, _kernels.DenseMLP) else EVAL_BATCH


def _batched(fn, x, batch: int | None = EVAL_BATCH) -> np.ndarray:
    x = np.asarray(x)
    if batch is None or len(x) <= batch:
        return np.asarray(fn(jnp.asarray(x)), np.float64)
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch])), np.float64)
                           for i in range(0, len(x), batch)])


def _logits(apply_fn, params, x, state=None) -> np.ndarray:
    if len(x) == 0:
        k = jax.eval_shape(lambda p, xb: call(apply_fn, p, xb, state), params,
                           jnp.zeros((1,) + tuple(np.shape(x)[1:]))).shape[-1]
        return np.zeros((0, k))
    f = eval_fn(apply_fn)
    return _batched(lambda xb: f(params, xb, state), x, _eval_batch(apply_fn))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def simplex_projection(y: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``y`` onto the probability simplex.

    ``argmin_p ||p - y||_2`` subject to ``p >= 0, sum p = 1`` (Wang & Carreira-Perpinan 2013,
    arXiv:1309.1541; the released look-ahead code's ``project_into_probability_simplex``): with
    ``u`` the row sorted in decreasing order, ``rho = max{j : u_j + (1 - sum_{i<=j} u_i) / j > 0}``
    and ``lambda = (1 - sum_{i<=rho} u_i) / rho``, ``p = max(y + lambda, 0)``.  The outputs of
    a network trained on one-hot targets with the square loss already lie near the simplex's
    corners; this keeps them there, where a softmax would make them nearly uniform.
    """
    y = np.asarray(y, np.float64)
    k = y.shape[-1]
    u = -np.sort(-y, axis=-1)
    css = np.cumsum(u, axis=-1)
    j = np.arange(1, k + 1)
    rho = np.sum(u + (1.0 - css) / j > 0, axis=-1, keepdims=True)  # the condition holds for j <= rho
    lam = (1.0 - np.take_along_axis(css, rho - 1, axis=-1)) / rho
    return np.maximum(y + lam, 0.0)


def probabilities(logits: np.ndarray, how: str = "softmax") -> np.ndarray:
    """Class probabilities from network outputs: ``"softmax"`` or ``"simplex"`` (projection)."""
    if how == "softmax":
        return softmax(logits)
    if how == "simplex":
        return simplex_projection(logits)
    raise ValueError(f"probabilities must be one of {PROBABILITIES}, got {how!r}")


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


def penultimate_features(apply_fn, params, x, state=None) -> np.ndarray:
    """``(n, h)`` inputs of the readout layer (``h`` in the BADGE embedding, the core-set space).

    Any model of :mod:`ntk_tutorial.models` with a ``features`` method (MLP, CNN, the wide
    ResNets, ResNet18; batch norm frozen, with its ``state``)."""
    if not has_features(apply_fn):
        raise NotImplementedError(
            "penultimate features need a model from ntk_tutorial.models (models.split of an "
            "MLP, CNN, WideResNet or ResNet18); BADGE and core-set use them")
    f = eval_fn(apply_fn, "features")
    return _batched(lambda xb: f(params, xb, state), x, _eval_batch(apply_fn))


def gradient_embeddings(ctx: Context) -> np.ndarray:
    """BADGE embeddings: gradient of the cross-entropy at the predicted label w.r.t. the last
    layer's weights, ``w_scale (p - e_yhat) (x) h``, ``(m, k h)``."""
    h = penultimate_features(ctx.apply_fn, ctx.params, ctx.x_pool, ctx.state)
    scale = ctx.apply_fn.readout_scale if isinstance(ctx.apply_fn, (Model, _kernels.DenseMLP)) else 1.0
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


@dataclass(frozen=True)
class Lookahead:
    """What the look-ahead strategies share, computed once per round (:func:`lookahead_setup`).

    Attributes:
      proxy: :func:`lookahead.fit_proxy` on ``L`` (``None`` for ``"one-step-sgd"``).
      k_pool_train, k_pool_pool: kernel between S and L, and on S (the proxy's kernel).
      f_pool: the outputs the proxy starts from on S (the network's; zeros for kernel
        regression with an infinite-width kernel).
      network: the network's outputs on S.
      prediction: the proxy's prediction on S before any label is added (``f_lin_L``).
    """

    proxy: Any
    k_pool_train: np.ndarray
    k_pool_pool: np.ndarray
    f_pool: np.ndarray
    network: np.ndarray
    prediction: np.ndarray


def _mlp_architecture(ctx: Context) -> dict:
    """depth, activation, w_std, b_std of an NTK-parameterised MLP (for the infinite kernels)."""
    apply_fn = ctx.apply_fn
    if not isinstance(apply_fn, _kernels.DenseMLP):
        raise ValueError(f"proxy {ctx.proxy!r} uses the infinite-width kernel of the MLP "
                         "architecture: use model='mlp' (the infinite kernels of conv nets are not built in)")
    layers = apply_fn.layers(ctx.params)
    w, _, cw, cb = layers[0]
    if cw == 1.0 and cb == 1.0:
        raise ValueError(f"proxy {ctx.proxy!r} needs an MLP in NTK parameterisation (the default)")
    return dict(depth=len(layers) - 1, activation=apply_fn.activation,
                w_std=float(cw * np.sqrt(w.shape[0])), b_std=float(cb))


def lookahead_setup(ctx: Context) -> Lookahead:
    """Kernel on ``L u S`` and the proxy fitted on ``L``, for ``ctx.proxy``; cached on the context.

    ``"linearised"``: ``ctx.kernel`` at the trained parameters, the proxy regressing the residuals
    ``Y - f_L(X)`` (Eq. 11).  ``"infinite-ntk"`` / ``"gp"``: the analytic infinite-width NTK /
    NNGP kernel of the MLP, kernel regression on the labels (the mean of an infinitely wide
    ensemble trained on L / the Gaussian-process posterior mean).  ``"one-step-sgd"``: the
    network's kernel on S only.
    """
    if "lookahead" in ctx.cache:
        return ctx.cache["lookahead"]
    start = time.perf_counter()
    setup = _lookahead_setup(ctx)
    ctx.timings["kernel_s"] = ctx.timings.get("kernel_s", 0.0) + time.perf_counter() - start
    ctx.cache["lookahead"] = setup
    return setup


# the kinds of ntk_tutorial.kernels (its plan_kernel / kernel_memory) behind KERNELS
KERNEL_KINDS = {"pntk": "pntk", "entk": "entk", "trace": "trace"}


def lookahead_memory(apply_fn: Any, params: Any, n: int, m: int, x_shape: tuple, x_dtype: Any,
                     num_classes: int, *, kernel: str = "pntk", proxy: str = "linearised",
                     sequential: bool = False, state: Any = None) -> int:
    """Estimated peak bytes of one look-ahead query round on ``n`` labelled points and ``m``
    candidates (per-example input shape ``x_shape``): the kernel on ``L u S`` (its route's peak,
    :func:`kernels.plan_kernel`), its float64 copy made while it is alive, then the float64 copy
    plus the look-ahead algebra (:func:`lookahead.fit_proxy_bytes`,
    :func:`lookahead.posterior_change_bytes`, or with ``sequential`` the ``M x M`` pool
    posterior, :func:`lookahead.pool_posterior_bytes`).  Nothing is computed."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}")
    k, n, m = int(num_classes), int(n), int(m)
    infinite = proxy in ("infinite-ntk", "gp")
    scalar = kernel != "entk" or infinite
    total = m if proxy == "one-step-sgd" else n + m
    if infinite:
        out = out64 = 8 * total * total
        kernel_peak = _kernels._INFINITE_PEAK * out64
    else:
        x = jax.ShapeDtypeStruct((max(total, 1),) + tuple(x_shape), x_dtype)
        plan = _kernels.plan_kernel(KERNEL_KINDS[kernel], apply_fn, params, x, state=state)
        kernel_peak, out = plan.peak_bytes, plan.output_bytes
        out64 = out * 8 // plan.itemsize
    size_n = n * (1 if scalar else k)
    proxy_state = 8 * 2 * size_n * size_n  # the Proxy keeps the kernel matrix and its factor
    if proxy == "one-step-sgd":
        algebra = 3 * out64
    elif sequential:
        algebra = max(lookahead.fit_proxy_bytes(n, k, scalar),
                      proxy_state + lookahead.pool_posterior_bytes(n, m, k, scalar))
    else:
        algebra = max(lookahead.fit_proxy_bytes(n, k, scalar),
                      proxy_state + lookahead.posterior_change_bytes(n, m, k, scalar))
    return int(max(kernel_peak, out + out64, out64 + algebra))


def check_lookahead_memory(apply_fn: Any, params: Any, n: int, m: int, x_shape: tuple, x_dtype: Any,
                           num_classes: int, *, kernel: str = "pntk", proxy: str = "linearised",
                           sequential: bool = False, state: Any = None) -> None:
    """Raise :class:`kernels.KernelTooLargeError` before a look-ahead round that would not fit
    (:func:`lookahead_memory`), saying what to change."""
    need = lookahead_memory(apply_fn, params, n, m, x_shape, x_dtype, num_classes, kernel=kernel,
                            proxy=proxy, sequential=sequential, state=state)
    what = (f"a look-ahead query round ({'sequential, ' if sequential else ''}kernel {kernel!r}, "
            f"proxy {proxy!r}) on {n} labelled + {m} candidate points (the kernel, its float64 copy "
            "and the look-ahead algebra)")
    advice = ("use --kernel pntk (k^2 times smaller than the eNTK), " if kernel == "entk" else "use ")
    _kernels.check_memory(need, what, advice + "a smaller --subset of candidates, or fewer labels; ")


def copies_of(x_pool: Any, x_labelled: Any) -> np.ndarray:
    """``(m,)`` True where a pool point is an exact copy of one of ``x_labelled`` (same values,
    compared as the bytes of the rows in their common dtype)."""
    x_pool, x_labelled = np.asarray(x_pool), np.asarray(x_labelled)
    m = len(x_pool)
    if not m or not len(x_labelled):
        return np.zeros(m, bool)
    dtype = np.result_type(x_pool.dtype, x_labelled.dtype)
    a = np.ascontiguousarray(x_pool.reshape(m, -1), dtype=dtype)
    b = np.ascontiguousarray(x_labelled.reshape(len(x_labelled), -1), dtype=dtype)
    if a.shape[1] != b.shape[1]:
        return np.zeros(m, bool)
    row = np.dtype((np.void, a.dtype.itemsize * a.shape[1]))
    return np.isin(a.view(row).ravel(), b.view(row).ravel())


def _known(ctx: Context) -> np.ndarray:
    """Candidates that are exact copies of labelled points (cached on the context)."""
    if "known" not in ctx.cache:
        ctx.cache["known"] = copies_of(ctx.x_pool, ctx.x_labelled)
    return ctx.cache["known"]


def _unknown_only(ctx: Context, scores: np.ndarray) -> np.ndarray:
    """Look-ahead scores with exact copies of labelled points at ``-inf``: their Schur complement
    is zero, so labelling one changes nothing (its label is known); "nothing to learn here", not
    "infinitely informative", and never worth a second label while other candidates remain."""
    known = _known(ctx)
    if np.any(known):
        scores = np.array(scores, np.float64)
        scores[known] = -np.inf
    return scores


def _lookahead_setup(ctx: Context) -> Lookahead:
    if ctx.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {ctx.kernel!r}; choose one of {sorted(KERNELS)}")
    n = len(ctx.x_labelled)
    x_dtype = np.result_type(np.asarray(ctx.x_labelled).dtype, np.asarray(ctx.x_pool).dtype)
    check_lookahead_memory(ctx.apply_fn, ctx.params, n, len(ctx.x_pool), np.shape(ctx.x_pool)[1:], x_dtype,
                           ctx.num_classes, kernel=ctx.kernel, proxy=ctx.proxy, state=ctx.state)
    y_l = one_hot(ctx.y_labelled, ctx.num_classes).astype(np.float64)
    if ctx.proxy == "one-step-sgd":
        k_ss = np.asarray(KERNELS[ctx.kernel](ctx.apply_fn, ctx.params, jnp.asarray(ctx.x_pool), state=ctx.state),
                          np.float64)
        return Lookahead(None, np.zeros((len(ctx.x_pool), 0)), k_ss, ctx.logits, ctx.logits, ctx.logits)
    x_all = jnp.asarray(np.concatenate([ctx.x_labelled, ctx.x_pool]))
    if ctx.proxy == "linearised":
        k_all = np.asarray(KERNELS[ctx.kernel](ctx.apply_fn, ctx.params, x_all, state=ctx.state), np.float64)
        f_train, f_pool = ctx.labelled_logits, ctx.logits
    else:
        arch = _mlp_architecture(ctx)
        fn = _kernels.infinite_ntk if ctx.proxy == "infinite-ntk" else _kernels.infinite_nngp
        with jax.enable_x64(True):
            k_all = np.asarray(fn(jnp.asarray(x_all, jnp.float64), **arch), np.float64)
        f_train, f_pool = None, np.zeros_like(ctx.logits)
    k_ll, k_sl, k_ss = k_all[:n, :n], k_all[n:, :n], k_all[n:, n:]
    proxy = lookahead.fit_proxy(k_ll, y_l, f_train, ridge=ctx.ridge)
    return Lookahead(proxy, k_sl, k_ss, f_pool, ctx.logits, proxy.predict(k_sl, f_pool))


def reference_outputs(ctx: Context) -> np.ndarray:
    """``(m, k)``: what the look-ahead change is measured from (``ctx.relative_to``)."""
    setup = lookahead_setup(ctx)
    return setup.network if ctx.relative_to == "network" else setup.prediction


def _one_step_change(setup: Lookahead, y_cand: np.ndarray, lr: float, reduce: str | None):
    """One SGD step of rate ``lr`` on the candidate alone (square loss):
    ``Delta(x; x') = lr Theta(x, x') (y' - f_L(x'))``, measured from the network."""
    r = y_cand - setup.network  # (m, k)
    reduce_fn = None if reduce is None else lookahead.REDUCTIONS[reduce]
    k_ss = setup.k_pool_pool
    if reduce_fn is not None and k_ss.ndim == 2:
        fast = lookahead._scalar_reduce(reduce_fn, np.ascontiguousarray(lr * k_ss), r, setup.network,
                                        setup.network, np.zeros_like(r))
        if fast is not None:
            return fast
    if k_ss.ndim == 2:
        change = lr * k_ss[:, :, None] * r[:, None, :]  # (cand, pool, k): Theta symmetric
    else:
        change = lr * np.einsum("cxij,cj->cxi", k_ss.transpose(1, 0, 2, 3), r)
    return change if reduce_fn is None else reduce_fn(change, setup.network)


def lookahead_change(ctx: Context, y_candidates: np.ndarray, reduce: str | None = "l2") -> np.ndarray:
    """The look-ahead change of every candidate with its label ``y_candidates`` ``(m, k)``,
    reduced (``"l2"``, ``"flips"``) or whole (``None``), for ``ctx.proxy`` and ``ctx.relative_to``."""
    setup = lookahead_setup(ctx)
    if ctx.proxy == "one-step-sgd":
        return _one_step_change(setup, y_candidates, ctx.lr, reduce)
    return np.asarray(lookahead.posterior_change(
        setup.proxy, setup.k_pool_train, setup.k_pool_pool, setup.f_pool, y_candidates,
        relative_to=ctx.relative_to, network=setup.network, reduce=reduce), np.float64)


def mlmoc_scores(ctx: Context, reduce: str = "l2") -> np.ndarray:
    """Per-candidate MLMOC score with the pseudo-label ``argmax`` of the reference
    (``reduce``: ``"l2"`` Eq. 13, ``"flips"`` the released code's count)."""
    return _unknown_only(ctx, lookahead_change(ctx, lookahead.pseudo_labels(reference_outputs(ctx)), reduce))


def emoc_expectation(change: Callable[[np.ndarray], np.ndarray], p: np.ndarray, mean: np.ndarray,
                     one_pass: bool) -> np.ndarray:
    """``E_{y' ~ p(. | x')} change(y')``: EMOC's expectation of an L2 look-ahead change over the
    candidate's labels, for batch (:func:`emoc_scores`) and sequential (:func:`posterior_scores`)
    querying alike.

    ``change(Y)`` maps ``(m, k)`` candidate labels to the ``(m,)`` L2 changes; ``p`` is ``(m, k)``.
    With ``one_pass`` (a scalar kernel, the change measured from the proxy whose predictions on the
    candidates are ``mean``) ``||Delta(x; x')|| = |C(x, x')| ||y' - mean(x')|| / |C(x', x') + shift|``:
    the label enters only through ``||y' - mean(x')||``, so one pass with a unit residual gives the
    rest and the expectation is an ``(m, k)`` sum (``k`` times cheaper); otherwise one pass per class.
    """
    m, k = p.shape
    if one_pass:
        unit = np.zeros((m, k))
        unit[:, 0] = 1.0
        geometry = change(mean + unit)
        residual = np.linalg.norm(np.eye(k)[None, :, :] - mean[:, None, :], axis=2)  # (m, k)
        return geometry * np.sum(p * residual, axis=1)
    total = np.zeros(m)
    for c in range(k):
        y = np.zeros((m, k))
        y[:, c] = 1.0
        total += p[:, c] * change(y)
    return total


def emoc_scores(ctx: Context) -> np.ndarray:
    """``E_{y' ~ p(. | x')} sum_{x in S} ||Delta f(x)||_2`` (``p``: ``ctx.probs``)."""
    setup = lookahead_setup(ctx)
    one_pass = setup.proxy is not None and setup.proxy.scalar and ctx.relative_to == "proxy"
    return _unknown_only(ctx, emoc_expectation(lambda y: lookahead_change(ctx, y, "l2"), ctx.probs,
                                               setup.prediction, one_pass))


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
    probs = np.stack([softmax(_batched(lambda xb: f(ctx.params, xb, ctx.state, jax.random.fold_in(key, t)), ctx.x_pool,
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
    pool = penultimate_features(ctx.apply_fn, ctx.params, ctx.x_pool, ctx.state)
    lab = penultimate_features(ctx.apply_fn, ctx.params, ctx.x_labelled, ctx.state)
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


def posterior_scores(post: lookahead.PoolPosterior, objective: str, *, network: np.ndarray | None = None,
                     relative_to: str = "proxy", probabilities_how: str = "softmax") -> np.ndarray:
    """Look-ahead scores of every pool point from the current :class:`lookahead.PoolPosterior`
    (``objective``: ``"l2"``, ``"flips"`` or ``"emoc"``).

    The reference is the current proxy (``relative_to="proxy"``, the released code's sequential
    mode) or the network's outputs ``network``; the pseudo-label is the reference's arg-max;
    EMOC's probabilities come from the reference."""
    reference = post.mean if relative_to == "proxy" else network
    if reference is None:
        raise ValueError("relative_to='network' needs the network's outputs on the pool")
    if objective in ("l2", "flips"):
        return np.asarray(lookahead.covariance_change(post, lookahead.pseudo_labels(reference),
                                                      reference=reference, reduce=objective), np.float64)
    if objective == "emoc":
        return emoc_expectation(
            lambda y: np.asarray(lookahead.covariance_change(post, y, reference=reference, reduce="l2"), np.float64),
            probabilities(reference, probabilities_how), post.mean, post.scalar and relative_to == "proxy")
    raise ValueError(f"unknown look-ahead objective {objective!r}")
