"""Learning paths and knowledge distillation (Ren, Guo & Sutherland, ICLR 2022).

A *learning path* is the sequence of predictions ``q_t(x) = softmax(f_t(x))`` of one sample
during training.  For hard or mislabelled samples it zig-zags: first towards the true
``p*(y|x)``, then to the (possibly wrong) one-hot label.  Better *supervisory signals*
``p_tar(x)`` for a student are the ones closer to ``p*``; this module trains teachers while
recording paths, builds the signals, and trains students on them.

==============================  =============================================================
:func:`fit`                     mini-batch SGD (momentum) on targets ``(n, k)`` with the loss
                                ``tau^2 KL(p_tar || softmax(z / tau))``; records paths, keeps
                                the early-stopped parameters and the Filter-KD moving average,
                                both at that epoch and at the end
:func:`distill_loss`            that loss, per example (``tau = 1`` and one-hot targets give
                                the usual cross-entropy)
:func:`filter_update`           the Filter-KD update ``q_bar <- (1 - alpha) q_bar + alpha
                                softmax(z / tau)`` of the samples in a batch
:func:`supervisory_signals`     one-hot, label-smoothed, final teacher, early-stopped teacher,
                                Filter-KD (the table at the best epoch, and at the end) and
                                ``p*`` targets from one teacher run
:func:`label_smoothing`,        the simple signals and temperature softmax
:func:`softmax_t`
:func:`flip_labels`             symmetric label noise for data sets that have none
:func:`path_distances`,         ``||q_t - p*||`` along paths and its minimum vs. its end value
:func:`zigzag_stats`
:func:`mean_interval`           mean and the half-width of its 95% t-interval over seeds
==============================  =============================================================

Mini-batches: every epoch draws a fresh permutation of the ``n`` samples and cuts it into
``n // batch_size`` batches; the ``n mod batch_size`` samples left over wait for a later epoch
(PyTorch's ``drop_last=True``, as in the paper's code).  Training runs on the package's one SGD
core, :func:`ntk_tutorial.train.sgd_core`, with this loss, the Filter-KD averages as its
per-batch hook and the paths as its record; each epoch is one ``jax.lax.scan``, so a Python
loop pays dispatch costs only once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
from functools import lru_cache
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .data import label_smoothing, one_hot  # noqa: F401 - part of this module's interface (notebook 05)

Array = jax.Array
SIGNALS = ("one-hot", "label-smoothing", "teacher", "early-stopped", "filter-kd", "filter-kd-end", "p-star")


# ---------------------------------------------------------------------------------------------
# targets and losses
# ---------------------------------------------------------------------------------------------


def softmax_t(logits: Array, tau: float = 1.0) -> Array:
    """``softmax(z / tau)`` over the last axis: the temperature-``tau`` prediction."""
    return jax.nn.softmax(jnp.asarray(logits) / tau, axis=-1)


def flip_labels(y, k: int, rate: float, key: Array) -> tuple[np.ndarray, np.ndarray]:
    """Label noise: ``round(rate * n)`` labels, chosen at random, moved to another class.

    The new class is uniform over the ``k - 1`` others (symmetric label noise).  Returns the noisy
    labels and the boolean mask of flipped samples.
    """
    y = np.asarray(y)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if k < 2:
        raise ValueError(f"flipping labels needs k >= 2 classes, got {k}")
    n = len(y)
    pick_key, shift_key = jax.random.split(key)
    idx = np.asarray(jax.random.permutation(pick_key, n))[: int(round(rate * n))]
    shift = np.asarray(jax.random.randint(shift_key, (len(idx),), 1, k))
    y_noisy = y.copy()
    y_noisy[idx] = (y[idx] + shift) % k
    flipped = np.zeros(n, bool)
    flipped[idx] = True
    return y_noisy, flipped


def distill_loss(logits: Array, p_tar: Array, tau: float = 1.0, scale: float | None = None) -> Array:
    """Per-example ``scale * KL(p_tar || softmax(logits / tau))``, ``scale = tau^2`` by default.

    The ``tau^2`` factor (Hinton et al. 2015) keeps the gradient with respect to the logits,
    ``tau (softmax(z / tau) - p_tar)``, of the same size for every temperature.  Ren, Guo &
    Sutherland's code multiplies by ``2 tau^2``: the same loss with a doubled learning rate.
    With ``tau = 1`` and one-hot ``p_tar`` this is the cross-entropy; for any ``p_tar`` it differs
    from the cross-entropy ``-sum p_tar log q`` by the entropy of ``p_tar``, a constant.

    Args:
      logits: ``(n, k)`` student logits ``z``.
      p_tar: ``(n, k)`` target distributions (rows sum to 1; zeros allowed).
      tau: temperature.
      scale: the factor in front, ``tau ** 2`` when ``None``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    scale = tau**2 if scale is None else scale
    log_q = jax.nn.log_softmax(jnp.asarray(logits) / tau, axis=-1)
    p_tar = jnp.asarray(p_tar)
    return scale * jnp.sum(jax.scipy.special.xlogy(p_tar, p_tar) - p_tar * log_q, axis=-1)


def filter_update(q_bar: Array, seen: Array, idx: Array, probs: Array, alpha: float) -> tuple[Array, Array]:
    """Filter-KD: ``q_bar[i] <- (1 - alpha) q_bar[i] + alpha probs`` for the samples ``idx``.

    A sample's first visit initialises its average (``q_bar[i] <- probs``); ``seen`` marks the
    samples visited so far.  Ren, Guo & Sutherland (2022) use ``alpha = 0.05`` and take ``probs``
    as ``softmax(z / tau)`` of the logits computed for the gradient step (before it).

    Args:
      q_bar: ``(n, k)`` current averages; ``seen``: ``(n,)`` bool.
      idx: ``(b,)`` indices of the batch (distinct); ``probs``: ``(b, k)`` their predictions.
      alpha: the weight of the newest prediction, in ``(0, 1]``.
    Returns:
      the new ``(q_bar, seen)``.
    """
    old = q_bar[idx]
    new = jnp.where(seen[idx][:, None], (1.0 - alpha) * old + alpha * probs, probs)
    return q_bar.at[idx].set(new), seen.at[idx].set(True)


# ---------------------------------------------------------------------------------------------
# training that records paths
# ---------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """What :func:`fit` returns.

    Attributes:
      params: parameters after the last epoch.
      losses: ``(steps,)`` mini-batch loss of every step.
      val_acc: ``(epochs,)`` validation accuracy after each epoch (empty without validation data).
      es_params, es_epoch: parameters after the epoch of best validation accuracy (the first
        such epoch), and that epoch (1-based); the final ones when there is no validation data.
      filtered: ``(n, k)`` Filter-KD averages ``q_bar`` of every training sample at the end.
      filtered_es: the same table as it was after epoch ``es_epoch``, the one Ren, Guo &
        Sutherland's student reads (``ES_OHT_table`` in their ``old_cifar_noisy.py``); equal to
        ``filtered`` without validation data.
      record_steps: ``(T,)`` steps at which ``paths`` were recorded (0 = initialisation).
      paths: ``(T, n_record, k)`` predictions ``softmax(f_t(x))`` on ``record_x`` (``None``
        without ``record_x``).
      kept: ``{epoch: params}`` for the epochs asked for by ``keep_epochs``.
      config: the settings, to store beside results.
    """

    params: Any
    losses: np.ndarray
    val_acc: np.ndarray
    es_params: Any
    es_epoch: int
    filtered: np.ndarray
    record_steps: np.ndarray
    paths: np.ndarray | None
    filtered_es: np.ndarray | None = None
    kept: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _check_targets(targets: Array, n: int, k: int) -> Array:
    targets = jnp.asarray(targets)
    if targets.ndim == 1:
        raise ValueError("targets must be (n, k) distributions; turn labels into rows with one_hot(y, k)")
    if targets.shape != (n, k):
        raise ValueError(f"targets must have shape ({n}, {k}), got {targets.shape}")
    sums = np.asarray(targets.sum(-1))
    if not np.allclose(sums, 1.0, atol=1e-3) or float(targets.min()) < -1e-6:
        raise ValueError("every target row must be a probability distribution (non-negative, sums to 1)")
    return targets


@lru_cache(maxsize=64)
def _kd_loss(tau: float) -> Callable:
    """The per-example loss of :func:`fit` for ``train.sgd_core`` (one function per ``tau``, so
    that the compiled core is reused)."""
    return lambda logits, targets: distill_loss(logits, targets, tau)


@lru_cache(maxsize=64)
def _filter_hook(alpha: float, filter_tau: float) -> Callable:
    """``train.sgd_core``'s per-batch hook of :func:`fit`: the Filter-KD averages of the batch."""
    def hook(aux, idx, logits):
        q_bar, seen = aux
        return filter_update(q_bar, seen, idx, softmax_t(logits, filter_tau), alpha)

    return hook


@lru_cache(maxsize=64)
def _path_record(apply_fn: Callable) -> Callable:
    """``train.sgd_core``'s record of :func:`fit`: the predictions ``q_t`` on ``record_x``."""
    return lambda params, state, record_x: jax.nn.softmax(apply_fn(params, record_x), axis=-1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _epoch_order(epoch_key: Array, n: int, chunks: int, every: int, batch_size: int) -> Array:
    """One epoch's batch order: a permutation of the ``n`` samples, the ``n mod batch_size`` last
    left out, as ``(chunks, every, batch_size)`` indices (compiled once per shape, not per fit)."""
    return jax.random.permutation(epoch_key, n)[: chunks * every * batch_size].reshape(chunks, every, batch_size)


def fit(
    apply_fn: Callable,
    params: Any,
    x: Array,
    targets: Array,
    *,
    key: Array,
    lr: float | optax.Schedule,
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    tau: float = 1.0,
    alpha: float = 0.05,
    filter_tau: float = 1.0,
    x_val: Array | None = None,
    y_val: Array | None = None,
    record_x: Array | None = None,
    record_every: int | None = None,
    keep_epochs: Sequence[int] = (),
    progress: bool = False,
) -> Fit:
    """Train on target distributions by mini-batch SGD; record learning paths on the way.

    Minimises the mean over a batch of :func:`distill_loss` ``(z, p_tar, tau)``: with one-hot
    targets and ``tau = 1`` a teacher trained by cross-entropy, with soft targets a student.
    Along the way it keeps, for every training sample, the Filter-KD moving average of its
    predictions (:func:`filter_update`, with ``alpha`` and ``filter_tau``), the parameters of the
    epoch with the best validation accuracy and a snapshot of the moving averages at that epoch
    (``Fit.filtered_es``), and the predictions on ``record_x`` every ``record_every`` steps.
    A sample that no batch has drawn yet has no average (``n mod batch_size`` samples sit out
    each epoch, so a table read after one epoch, or a few, can have such rows); its row is then
    the prediction ``softmax(z / filter_tau)`` of that table's parameters (the early-stopped
    ones for ``Fit.filtered_es``, the final ones for ``Fit.filtered``).

    Args:
      apply_fn, params: the model (``apply_fn(params, x) -> (n, k)`` logits) and its start.
      x, targets: ``(n, d)`` inputs and ``(n, k)`` target distributions.
      key: PRNG key for the batch order: epoch ``e`` (from 1) visits the samples in the order
        ``jax.random.permutation(jax.random.fold_in(key, e), n)``, cut into batches.
      lr: learning rate (a float or an optax schedule of the step).
      epochs, batch_size: ``epochs * (n // batch_size)`` steps in all.
      momentum: heavy-ball momentum of SGD (0 for plain SGD).
      weight_decay: L2 penalty ``wd/2 ||params||^2`` added to the loss.
      tau: temperature of the loss.
      alpha, filter_tau: the Filter-KD moving average (``alpha = 0.05``, ``tau = 1`` in the paper).
      x_val, y_val: validation inputs and int labels for early stopping.
      record_x: points whose predictions ``q_t`` are recorded (e.g. the training inputs).
      record_every: steps between records; must divide ``n // batch_size`` (default: once
        per epoch).
      keep_epochs: epochs after which to keep a copy of the parameters (0 = the start), for
        kernels along the way; returned in ``Fit.kept``.
      progress: show a tqdm bar over epochs.
    """
    x = jnp.asarray(x)
    n = x.shape[0]
    out = jax.eval_shape(apply_fn, params, x[:1])
    k = out.shape[-1]
    targets = _check_targets(targets, n, k)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and n = {n}, got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val (validation data for early stopping) or neither")
    steps_per_epoch = n // batch_size
    every = steps_per_epoch if record_every is None else int(record_every)
    if every < 1 or steps_per_epoch % every:
        raise ValueError(f"record_every must divide the {steps_per_epoch} steps of an epoch "
                         f"(n // batch_size), got {record_every}")
    chunks = steps_per_epoch // every
    keep = {int(e) for e in keep_epochs}
    if keep and (min(keep) < 0 or max(keep) > epochs):
        raise ValueError(f"keep_epochs must lie in [0, {epochs}], got {sorted(keep)}")
    rec_x = None if record_x is None else jnp.asarray(record_x)

    lr = float(lr) if isinstance(lr, (int, float)) else lr
    # the package's one SGD core (train.sgd_core): this loss, the Filter-KD averages as its
    # per-batch hook, the paths as its record after every `every` steps
    from .train import sgd_core

    core = sgd_core(apply_fn, _kd_loss(float(tau)), lr, float(momentum), float(weight_decay), False, False,
                    hook=_filter_hook(float(alpha), float(filter_tau)),
                    record=_path_record(apply_fn) if rec_x is not None else None)
    predict = jax.jit(apply_fn)
    carry = (params, None, core.opt.init(params), (jnp.zeros((n, k), out.dtype), jnp.zeros(n, bool)))
    def order_of(epoch_key):
        return _epoch_order(epoch_key, n, chunks, every, batch_size)

    unused_key = jax.random.key(0)  # no dropout in fit
    losses, val_acc, paths = [], [], []
    if rec_x is not None:
        paths.append(np.asarray(jax.nn.softmax(predict(params, rec_x), axis=-1)))
    best, es_params, es_epoch, es_table = -1.0, params, epochs, None
    kept = {0: params} if 0 in keep else {}
    it = range(1, epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="epochs", leave=False)
    for epoch in it:
        first = (epoch - 1) * steps_per_epoch + 1
        steps = jnp.arange(first, first + steps_per_epoch).reshape(chunks, every)
        carry, (values, recs) = core.run(carry, x, targets, order_of(jax.random.fold_in(key, epoch)), steps,
                                         unused_key, rec_x)
        losses.append(np.asarray(values).reshape(-1))
        if not np.isfinite(losses[-1][-1]):
            raise FloatingPointError(f"training diverged in epoch {epoch}; lower lr={lr}")
        if rec_x is not None:
            paths.append(np.asarray(recs))
        if epoch in keep:
            kept[epoch] = carry[0]
        if x_val is not None:
            acc = float(jnp.mean(jnp.argmax(predict(carry[0], jnp.asarray(x_val)), -1) == jnp.asarray(y_val)))
            val_acc.append(acc)
            if acc > best:  # JAX arrays are immutable: keeping references is a snapshot
                best, es_params, es_epoch, es_table = acc, carry[0], epoch, carry[3]
    params, _, _, (q_bar, seen) = carry
    if x_val is None:
        es_params, es_table = params, carry[3]

    def table(q_bar, seen, p):
        # np.array copies: np.asarray of a JAX array is a read-only view
        q_bar, unseen = np.array(q_bar), ~np.asarray(seen)
        if unseen.any():  # never drawn into a batch yet: the prediction of that moment
            q_bar[unseen] = np.asarray(softmax_t(predict(p, x[unseen]), filter_tau))
        return q_bar

    q_bar, q_bar_es = table(q_bar, seen, params), table(*es_table, es_params)
    record_steps = np.arange(0, epochs * steps_per_epoch + 1, every) if rec_x is not None else np.zeros(0, int)
    return Fit(
        params=params,
        losses=np.concatenate(losses),
        val_acc=np.asarray(val_acc),
        es_params=es_params,
        es_epoch=int(es_epoch),
        filtered=q_bar,
        filtered_es=q_bar_es,
        record_steps=record_steps,
        paths=np.concatenate([paths[0][None]] + [p.reshape(-1, *p.shape[-2:]) for p in paths[1:]]) if paths else None,
        kept=kept,
        config=dict(lr=lr if isinstance(lr, (int, float)) else "schedule", epochs=epochs,
                    batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, tau=tau,
                    alpha=alpha, filter_tau=filter_tau, steps_per_epoch=steps_per_epoch,
                    record_every=every, key=np.asarray(jax.random.key_data(key)).tolist()),
    )


# ---------------------------------------------------------------------------------------------
# supervisory signals from a teacher run
# ---------------------------------------------------------------------------------------------


def supervisory_signals(
    teacher: Fit,
    apply_fn: Callable,
    x: Array,
    y,
    *,
    tau: float = 1.0,
    eps: float = 0.1,
    p_star: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The targets a student can learn from, each ``(n, k)``, keyed by :data:`SIGNALS`.

    * ``"one-hot"``: ``e_y``; ``"label-smoothing"``: ``(1 - eps) e_y + eps / k``;
    * ``"teacher"``: ``softmax(f_T(x) / tau)`` of the final teacher (knowledge distillation);
    * ``"early-stopped"``: the same at the epoch of best validation accuracy (ESKD);
    * ``"filter-kd"``: the teacher's moving averages ``q_bar`` as they were at its epoch of best
      validation accuracy (Filter-KD as Ren, Guo & Sutherland ran it: ``ES_OHT_table`` in their
      ``old_cifar_noisy.py``);
    * ``"filter-kd-end"``: the same table at the end of training (a contrast);
    * ``"p-star"``: the true posterior, when ``p_star`` is given.

    Without validation data in the teacher's :func:`fit`, ``"early-stopped"`` equals
    ``"teacher"`` and ``"filter-kd"`` equals ``"filter-kd-end"``.
    """
    x = jnp.asarray(x)
    k = teacher.filtered.shape[1]
    out = {
        "one-hot": one_hot(y, k),
        "label-smoothing": label_smoothing(y, k, eps),
        "teacher": np.asarray(softmax_t(apply_fn(teacher.params, x), tau)),
        "early-stopped": np.asarray(softmax_t(apply_fn(teacher.es_params, x), tau)),
        "filter-kd": np.asarray(teacher.filtered if teacher.filtered_es is None else teacher.filtered_es),
        "filter-kd-end": np.asarray(teacher.filtered),
    }
    if p_star is not None:
        out["p-star"] = np.asarray(p_star, np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def path_distances(paths: np.ndarray, p_star: np.ndarray) -> np.ndarray:
    """``||q_t(x_i) - p*(x_i)||_2`` for paths ``(T, n, k)`` and ``p*`` ``(n, k)``: ``(T, n)``."""
    paths, p_star = np.asarray(paths), np.asarray(p_star)
    if paths.ndim != 3 or paths.shape[1:] != p_star.shape:
        raise ValueError(f"paths must be (T, n, k) and p_star (n, k); got {paths.shape} and {p_star.shape}")
    return np.linalg.norm(paths - p_star[None], axis=-1)


def zigzag_stats(paths: np.ndarray, p_star: np.ndarray) -> dict[str, np.ndarray]:
    """Per sample: the closest approach to ``p*`` along the path, where it happens, and the end.

    Returns ``{"min": (n,), "argmin": (n,) index into the path, "final": (n,), "start": (n,)}``.
    A zig-zag shows as ``min`` well below both ``start`` and ``final``.
    """
    d = path_distances(paths, p_star)
    return {"min": d.min(0), "argmin": d.argmin(0), "final": d[-1], "start": d[0]}


def mean_interval(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ``axis`` and the half-width of its 95% Student-t interval over the ``m`` seeds.

    The package's one interval rule, :func:`ntk_tutorial.stats.t_interval` (it replaced the
    normal approximation ``1.96 sd / sqrt(m)``, too narrow for a few seeds); ``sd`` has
    ``ddof = 1``.  Paired comparisons of two signals: :func:`ntk_tutorial.stats.paired`.
    """
    from .stats import t_interval

    values = np.asarray(values, np.float64)
    m = values.shape[axis]
    if m < 2:
        raise ValueError(f"an interval needs at least 2 values along axis {axis}, got {m}")
    return t_interval(values, axis=axis)
