"""Training loops that record how predictions (and the kernel) move: learning paths.

Losses, per example and averaged over the batch:

* ``"mse"``: ``(1/2) ||f(x) - y||^2`` with ``y`` one-hot (int labels are converted) or real
  targets.  Full-batch gradient descent with rate ``eta`` on the mean over ``n`` examples
  follows, to first order, ``f <- f - (eta / n) Theta(X, X) (f - Y)``.
* ``"xent"``: softmax cross-entropy with int labels or target distributions ``(n, k)``
  (soft targets are what distillation trains on); ``grad_f = softmax(f) - p_target``.

``train`` returns the final parameters, the loss at every step and, at the requested steps,
the predictions on chosen points and optionally a kernel: the raw material of the learning-path
and lazy-training notebooks.

One training core serves the package: :func:`sgd_core` (a jitted step and a ``lax.scan`` of
steps, with a loss, a per-batch hook and a record) runs :func:`train`, :func:`sgd` (the same
rule as a pure, jit- and vmap-able function, for retraining many networks at once) and
:func:`ntk_tutorial.distill.fit` (its Filter-KD averages are the hook, its paths the record).
Batching and seeding (``train`` and ``sgd``): epoch ``e`` visits the samples in the order
``permutation(fold_in(split(key)[0], first step of the epoch), n)``, cut into ``ceil(n / b)``
batches, the last one smaller; dropout at step ``t`` draws ``fold_in(split(key)[1], t)``.
Full-batch steps between records run as scans; mini-batch steps in :func:`train` one jitted call
at a time (a ragged last batch, callbacks and stopping rules need the host, and XLA:CPU runs
convolutions inside a scan far slower: :func:`scan_friendly`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import kernels as _kernels

Array = jax.Array
LOSSES = ("mse", "xent")
LR_SCHEDULES = ("constant", "onecycle", "cosine")


def _schedule(lr: float, name: str, total: int):
    """The learning rate of each step (see ``train``'s ``lr_schedule``)."""
    if name == "constant":
        return lr
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(max(int(total), 1), lr, pct_start=0.3, div_factor=25.0,
                                              final_div_factor=1e4)
    return optax.cosine_decay_schedule(lr, max(int(total), 1))


def _targets(y, k: int, loss: str) -> Array:
    y = jnp.asarray(y)
    if y.ndim == 1:
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError("1-D targets must be int class labels; pass (n, k) arrays for real targets")
        return jax.nn.one_hot(y, k)
    if y.ndim != 2 or y.shape[1] != k:
        raise ValueError(f"targets must be (n,) labels or (n, {k}) arrays, got shape {y.shape}")
    return y


def loss_fn(name: str) -> Callable[[Array, Array], Array]:
    """Per-example loss ``(logits (n, k), targets (n, k)) -> (n,)``."""
    if name == "mse":
        return lambda f, t: 0.5 * jnp.sum((f - t) ** 2, axis=-1)
    if name == "xent":
        return lambda f, t: -jnp.sum(t * jax.nn.log_softmax(f), axis=-1)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def loss_grad_wrt_logits(name: str, logits: Array, targets: Array) -> Array:
    """``d loss / d f`` per example: ``f - y`` (mse) or ``softmax(f) - p_target`` (xent)."""
    if name == "mse":
        return logits - targets
    if name == "xent":
        return jax.nn.softmax(logits) - targets
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def _check_finite(losses: list, step: int, lr: float) -> None:
    last = float(losses[-1])
    if not np.isfinite(last):
        raise FloatingPointError(f"training diverged by step {step} (loss {last}); lower lr={lr}")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: parameters after the last step.
      losses: ``(steps,)`` training loss of each step (full batch for GD, the mini-batch for SGD).
      record_steps: steps at which ``predictions``/``kernels`` were recorded (0 = before training).
      predictions: ``(len(record_steps), n_record, k)`` logits on ``record_x``, or ``None``.
      kernels: ``(len(record_steps), ...)`` kernels on ``record_x``, or ``None``.
      config: the settings, seed included, to store beside results.
      state: the network's state after training: the updated batch-norm running statistics
        (pass them, not the old ones, to predictions and kernels); ``None`` without batch norm.
    """

    params: Any
    losses: np.ndarray
    record_steps: np.ndarray
    predictions: np.ndarray | None = None
    kernels: np.ndarray | None = None
    config: dict = field(default_factory=dict)
    state: Any = None


MAX_SCAN = 1024  # the longest lax.scan of full-batch steps between records (power-of-two pieces)

_KERNEL_FNS = {
    "entk": _kernels.entk,
    "pntk": _kernels.pntk,
    "trace": _kernels.trace_ntk,
    "single": _kernels.single_logit_ntk,
}


def train(
    apply_fn: Callable,
    params: Any,
    x: Array,
    y: Array,
    *,
    lr: float,
    steps: int | None = None,
    epochs: int | None = None,
    loss: str = "mse",
    batch_size: int | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    key: Array | None = None,
    dropout: bool = False,
    record_steps: Iterable[int] = (),
    record_x: Array | None = None,
    record_kernel: str | Callable | None = None,
    callback: Callable[[int, Any], None] | None = None,
    stop_loss: float | None = None,
    progress: bool = False,
    recompute_stats: bool = False,
    lr_schedule: str = "constant",
    state: Any = None,
    last_batch: str = "smaller",
) -> TrainResult:
    """Train ``apply_fn``'s parameters by full-batch GD or mini-batch SGD with optax.

    Models with batch norm (a :class:`~ntk_tutorial.models.Model` with ``state``, e.g. the wide
    ResNets of :mod:`ntk_tutorial.models`) train in training mode, normalising with each batch's
    statistics and updating the running ones; the result's ``state`` holds the final statistics.

    Args:
      apply_fn, params: the model (``apply_fn(params, x) -> (n, k)``) and its start point.
      state: the batch-norm running statistics of a :class:`~ntk_tutorial.models.Model`
        (``models.split``); ``None`` for a network without.
      x, y: training inputs and targets (int labels or ``(n, k)`` arrays).
      lr: learning rate.
      steps / epochs: how long; give one.  An epoch is ``ceil(n / batch_size)`` steps.
      loss: ``"mse"`` or ``"xent"``.
      batch_size: ``None`` for full-batch gradient descent, else SGD on shuffled mini-batches
        (needs ``key``).
      momentum: heavy-ball momentum (0 = plain GD/SGD).
      weight_decay: L2 penalty ``wd/2 ||params||^2`` added to the loss.
      key: PRNG key for shuffling and dropout.
      last_batch: when ``batch_size`` does not divide ``n``: ``"smaller"`` (default; the epoch's
        last batch holds the ``n mod batch_size`` left over, as PyTorch's loader without
        ``drop_last``) or ``"wrap"`` (it is filled up with the epoch's first samples, so every
        batch has ``batch_size`` examples and every sample is visited each epoch).
      dropout: pass a fresh ``dropout_key`` to ``apply_fn`` at each step (models with dropout).
      record_steps: steps at which to record (0 = before the first update, ``steps`` = after
        the last).
      record_x: points whose logits are recorded (default: the training inputs).
      record_kernel: ``"entk"``, ``"pntk"``, ``"trace"``, ``"single"`` or a callable
        ``(apply_fn, params, x) -> kernel`` recorded on ``record_x`` at the same steps.
      callback: ``callback(step, params)`` called after every step.
      stop_loss: stop as soon as the step's training loss is at or below this value (to train
        several networks "to the same loss"); the last step is then also recorded when
        ``record_steps`` asks for steps that were not reached.
      progress: show a tqdm bar.
      lr_schedule: ``"constant"`` (default), ``"onecycle"`` (PyTorch's ``OneCycleLR`` defaults:
        from ``lr / 25`` up to ``lr`` over the first 30% of the steps, then cosine annealing to
        ``lr / 25e4``; ``lr`` is the peak) or ``"cosine"`` (cosine decay from ``lr`` to 0), over
        the steps of this call.
      recompute_stats: batch-norm models only: after the last step, replace the running
        statistics by the statistics of the training inputs under the final parameters
        (:meth:`~ntk_tutorial.models.Model.population_stats`, in batches of
        ``batch_size``), so that the network in evaluation mode is the one training fitted.
    """
    from .models import Model, call, eval_fn

    x = jnp.asarray(x)
    n = x.shape[0]
    stats = state  # batch-norm running statistics, if any
    bn = stats is not None
    if bn and not isinstance(apply_fn, Model):
        raise ValueError("state= is for networks with batch norm (apply_fn, params, state = "
                         "models.split(nnx_model)); a plain apply_fn(params, x) has no state")
    k = jax.eval_shape(lambda p, xb: call(apply_fn, p, xb, stats), params, x[:1]).shape[-1]
    targets = _targets(y, k, loss)
    if targets.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {targets.shape[0]}")
    loss_fn(loss)  # validates the name early
    _check_last_batch(last_batch)
    if batch_size is not None and key is None:
        raise ValueError("mini-batch SGD shuffles: pass key=jax.random.key(seed)")
    if dropout and key is None:
        raise ValueError("dropout needs key=jax.random.key(seed)")
    steps_per_epoch = 1 if batch_size is None else -(-n // int(batch_size))
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    total = int(steps if steps is not None else epochs * steps_per_epoch)

    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    core = sgd_core(apply_fn, loss, float(lr), float(momentum), float(weight_decay), bool(dropout), bn,
                    lr_schedule, total if lr_schedule != "constant" else 1)
    opt_state = core.opt.init(params)

    rec_steps = sorted({int(s) for s in record_steps})
    if rec_steps and (rec_steps[0] < 0 or rec_steps[-1] > total):
        raise ValueError(f"record_steps must lie in [0, {total}], got {rec_steps[0]}..{rec_steps[-1]}")
    rec_x = x if record_x is None else jnp.asarray(record_x)
    kernel_fn = _KERNEL_FNS.get(record_kernel, record_kernel) if isinstance(record_kernel, str) else record_kernel
    if isinstance(record_kernel, str) and record_kernel not in _KERNEL_FNS:
        raise ValueError(f"record_kernel must be one of {sorted(_KERNEL_FNS)} or a callable")
    preds, kerns = [], []

    def record(p):
        preds.append(np.asarray(eval_fn(apply_fn)(p, rec_x, stats)))
        if kernel_fn is not None:
            kerns.append(np.asarray(kernel_fn(apply_fn, p, rec_x) if stats is None
                                    else kernel_fn(apply_fn, p, rec_x, state=stats)))

    if 0 in rec_steps:
        record(params)
    losses, scanned = [], []
    order = None
    shuffle_key, dropout_key = jax.random.split(key) if key is not None else (None, None)
    it = range(1, total + 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="training", leave=False)
    if batch_size is None and callback is None and stop_loss is None and scan_friendly(apply_fn, params, x, stats):
        # full-batch GD: the steps between records run as lax.scans of power-of-two lengths (a
        # handful of compiled lengths), on the same core as every other step
        carry = (params, stats, opt_state, None)
        dkey = dropout_key if dropout else jax.random.key(0)
        step = 0
        bar = it if progress else None
        for stop in [s for s in rec_steps if s > 0] + ([total] if not rec_steps or rec_steps[-1] < total else []):
            while step < stop:
                length = min(1 << ((stop - step).bit_length() - 1), MAX_SCAN)
                steps_now = jnp.arange(step + 1, step + length + 1)[None]
                carry, (values, _) = core.run(carry, x, targets, None, steps_now, dkey, None)
                scanned.append(values.reshape(-1))
                step += length
                _check_finite([values.reshape(-1)[-1]], step, lr)
                if bar is not None:
                    bar.update(length)
            if stop in rec_steps:
                record(carry[0])
        params, stats, opt_state, _ = carry
        if bar is not None:
            bar.close()
        it = ()
    for step in it:
        dkey = jax.random.fold_in(dropout_key, step) if dropout else None
        idx = None
        if batch_size is not None:
            pos = (step - 1) % steps_per_epoch
            if pos == 0:
                order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, step), n))
            idx = order[pos * batch_size : (pos + 1) * batch_size]
            if last_batch == "wrap" and len(idx) < batch_size:
                idx = np.concatenate([idx, order[: batch_size - len(idx)]])
        (params, stats, opt_state, _), value = core.step((params, stats, opt_state, None), x, targets, idx, dkey)
        losses.append(value)
        if step % 100 == 0 or step == total:
            _check_finite(losses, step, lr)
        if callback is not None:
            callback(step, params)
        if step in rec_steps:
            record(params)
        if stop_loss is not None and float(value) <= stop_loss:
            if rec_steps and rec_steps[-1] > step:
                rec_steps = [s for s in rec_steps if s <= step]
                if rec_steps[-1] != step:
                    rec_steps.append(step)
                    record(params)
            break
    if scanned:
        losses = np.asarray(jnp.concatenate(scanned))
    else:
        losses = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
    if recompute_stats and bn:
        stats = apply_fn.population_stats(params, stats, x, batch_size)
    config = dict(lr=lr, steps=len(losses), stop_loss=stop_loss, loss=loss, batch_size=batch_size, momentum=momentum,
                  weight_decay=weight_decay, dropout=dropout, recompute_stats=recompute_stats,
                  lr_schedule=lr_schedule, last_batch=last_batch,
                  key=None if key is None else np.asarray(jax.random.key_data(key)).tolist())
    return TrainResult(
        params=params,
        losses=losses,
        record_steps=np.asarray(rec_steps, int),
        predictions=np.stack(preds) if preds else None,
        kernels=np.stack(kerns) if kerns else None,
        config=config,
        state=stats,
    )


def scan_friendly(apply_fn: Callable, params: Any, x: Array, state: Any = None) -> bool:
    """Whether a ``lax.scan`` of training steps pays here.  Not on the CPU for networks with
    convolutions: XLA:CPU ran one step of the WRN of notebook 04 in 16 s inside a scan against
    0.1-0.4 s as a jitted call of its own (measured on this project's 2-core machine), so
    :func:`train` runs such steps one call at a time."""
    if jax.devices()[0].platform != "cpu":
        return True
    from .models import call

    jaxpr = jax.make_jaxpr(lambda p, xb: call(apply_fn, p, xb, state))(params, x[:1])

    def has_conv(jx) -> bool:
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None and has_conv(getattr(inner, "jaxpr", inner)):
                    return True
        return False

    return not has_conv(jaxpr.jaxpr)


class SGDCore(NamedTuple):
    """The jitted pieces of one SGD setting (:func:`sgd_core`).

    ``carry = (params, state, opt_state, aux)``: the batch-norm state (``None`` without batch
    norm), the optimiser's state and what the ``hook`` keeps (``None`` without one).

    * ``step(carry, x, targets, idx, dropout_key) -> (carry, loss)``: one update on the batch
      ``x[idx], targets[idx]`` (``idx=None``: the full batch);
    * ``run(carry, x, targets, idx, steps, dropout_key, record_x) -> (carry, (losses, records))``:
      ``lax.scan`` over ``idx`` of shape ``(chunks, steps_per_chunk, batch)`` (``None`` with
      ``steps`` of shape ``(chunks, steps_per_chunk)``: full-batch steps), with the step numbers
      ``steps`` (dropout draws ``fold_in(dropout_key, step)``); after each chunk
      ``record(params, state, record_x)`` (``None`` without ``record``);
    * ``opt``: the optax optimiser (``opt.init(params)`` starts ``opt_state``).
    """

    step: Callable
    run: Callable
    opt: Any


@lru_cache(maxsize=64)
def sgd_core(apply_fn: Callable, loss: str | Callable, lr: float | Callable, momentum: float,
             weight_decay: float, dropout: bool, bn: bool, lr_schedule: str = "constant", total: int = 1,
             hook: Callable | None = None, record: Callable | None = None) -> SGDCore:
    """The one SGD core of the package: :func:`train` and :func:`ntk_tutorial.distill.fit` both
    run on it.  Compiled once per setting and reused (active learning trains the same network
    every cycle; distillation a teacher and its students).

    Args:
      apply_fn: the model; with ``bn`` a :class:`~ntk_tutorial.models.Model` trained in training
        mode (``train_apply``), else ``apply_fn(params, x[, dropout_key])``.
      loss: ``"mse"``, ``"xent"`` or a per-example loss ``(logits, targets) -> (n,)``.
      lr, lr_schedule, total: a float rate with the schedule of :func:`train` over ``total``
        steps, or an optax schedule.
      momentum: heavy-ball momentum (0: plain SGD); weight_decay: L2 penalty
        ``wd/2 ||params||^2`` in the loss (coupled to the gradient, as PyTorch's SGD).
      dropout: pass a dropout key to the model.
      hook: ``hook(aux, idx, logits) -> aux`` after each step's forward pass (``logits`` without
        gradient): what a training loop keeps per batch (distillation's Filter-KD averages).
      record: ``record(params, state, record_x) -> array`` after each chunk of ``run``.
    """
    from .models import call

    per_example = loss if callable(loss) else loss_fn(loss)
    rate = _schedule(lr, lr_schedule, total) if isinstance(lr, float) else lr
    opt = optax.sgd(rate, momentum=momentum or None)

    def objective(p, bs, xb, tb, dkey):
        if bn:
            out, bs = apply_fn.train_apply(p, bs, xb, dkey if dropout else None)
        else:
            out = call(apply_fn, p, xb, None, dkey if dropout else None)
        value = per_example(out, tb).mean()
        if weight_decay:
            value = value + 0.5 * weight_decay * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))
        return value, (bs, out)

    def one(carry, xs, ts, idx, dkey):
        p, bs, s, aux = carry
        xb, tb = (xs, ts) if idx is None else (xs[idx], ts[idx])
        (value, (bs, out)), grads = jax.value_and_grad(objective, has_aux=True)(p, bs, xb, tb, dkey)
        if hook is not None:
            aux = hook(aux, idx, jax.lax.stop_gradient(out))
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), bs, s, aux), value

    @jax.jit
    def run(carry, xs, ts, idx, steps, dropout_key, record_x):
        def body(carry, inp):
            i, t = inp
            return one(carry, xs, ts, i, jax.random.fold_in(dropout_key, t) if dropout else None)

        def chunk(carry, inp):
            carry, values = jax.lax.scan(body, carry, inp)
            rec = record(carry[0], carry[1], record_x) if record is not None else None
            return carry, (values, rec)

        return jax.lax.scan(chunk, carry, (idx, steps))

    return SGDCore(jax.jit(one), run, opt)


def sgd(apply_fn: Callable, params: Any, x: Array, y: Array, key: Array, *, lr: float, epochs: int,
        batch_size: int, loss: str = "mse", momentum: float = 0.0, last_batch: str = "smaller") -> Any:
    """Mini-batch SGD as a pure function of its arguments: the trained parameters, nothing else
    (no records, no checks), so it can be jitted and ``vmap``-ed over data and keys (a network
    retrained per look-ahead candidate, say, as in notebook 03).  The same core
    (:func:`sgd_core`) and the same batching and seeding rule as :func:`train` with
    ``batch_size``, ``key`` and ``last_batch``: epoch ``e`` (from 0) visits the samples in the
    order ``permutation(fold_in(split(key)[0], e * s + 1), n)``, cut into ``s = ceil(n /
    batch_size)`` batches, the last one smaller (``last_batch="smaller"``) or filled up with
    that order's first samples (``"wrap"``); ``train`` gives the same parameters.  ``epochs``,
    ``batch_size``, ``loss``, ``last_batch`` and the rates are static."""
    _check_last_batch(last_batch)
    x = jnp.asarray(x)
    n = x.shape[0]
    k = jax.eval_shape(apply_fn, params, x[:1]).shape[-1]
    targets = _targets(y, k, loss)
    full, rest = divmod(n, int(batch_size))
    per_epoch = full + (rest > 0)
    core = sgd_core(apply_fn, loss, float(lr), float(momentum), 0.0, False, False)
    shuffle_key = jax.random.split(key)[0]
    unused = jax.random.key(0)

    def epoch(carry, e):
        first = e * per_epoch + 1
        order = jax.random.permutation(jax.random.fold_in(shuffle_key, first), n)
        if rest and last_batch == "wrap":  # every batch full: one scan over all of them
            order = jnp.concatenate([order, order[: batch_size - rest]])
            steps = (first + jnp.arange(per_epoch))[None]
            carry, _ = core.run(carry, x, targets, order.reshape(1, per_epoch, batch_size), steps, unused, None)
            return carry, None
        if full:
            steps = (first + jnp.arange(full))[None]
            carry, _ = core.run(carry, x, targets, order[: full * batch_size].reshape(1, full, batch_size), steps,
                                unused, None)
        if rest:
            carry, _ = core.step(carry, x, targets, order[full * batch_size:], None)
        return carry, None

    carry, _ = jax.lax.scan(epoch, (params, None, core.opt.init(params), None), jnp.arange(int(epochs)))
    return carry[0]


LAST_BATCH = ("smaller", "wrap")


def _check_last_batch(last_batch: str) -> None:
    if last_batch not in LAST_BATCH:
        raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")


def predict(apply_fn: Callable, params: Any, x: Array, *, state: Any = None, batch_size: int = 4096) -> Array:
    """Logits on ``x`` in batches (keeps memory bounded for large test sets)."""
    from .models import eval_fn

    x = jnp.asarray(x)
    f = eval_fn(apply_fn)
    return jnp.concatenate([f(params, x[i : i + batch_size], state)
                            for i in range(0, x.shape[0], batch_size)])


def accuracy(apply_fn: Callable, params: Any, x: Array, y: Array, *, state: Any = None) -> float:
    """Fraction of ``x`` whose argmax logit equals the int label ``y``."""
    return float(jnp.mean(jnp.argmax(predict(apply_fn, params, x, state=state), -1) == jnp.asarray(y)))
