"""ntk_tutorial.distill (and plotting.simplex) against independent references.

References: a direct NumPy loop for Filter-KD's moving average, a hand-written SGD-with-momentum
loop (plain jax.grad of a hand-written loss, no optax) for ``fit``, the KL formula written out in
NumPy for the distillation loss, the barycentric formula for simplex coordinates.  Everything runs
in float64 (conftest.py); tolerances are stated where they are used.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tutorial import distill
from ntk_tutorial.plotting import SIMPLEX_CORNERS, moving_average, simplex, simplex_xy
from helpers import mlp


def _random_distributions(rng, n, k, zeros=False):
    p = rng.dirichlet(np.ones(k), size=n)
    if zeros:  # some exact zeros, as in one-hot rows
        p[rng.random((n, k)) < 0.3] = 0.0
        p[p.sum(1) == 0, 0] = 1.0
        p /= p.sum(1, keepdims=True)
    return p


# ---------------------------------------------------------------------------------------------
# the distillation loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_distill_loss_is_tau_squared_kl(tau):
    rng = np.random.default_rng(0)
    z = 3 * rng.standard_normal((7, 5))
    p = _random_distributions(rng, 7, 5, zeros=True)
    zs = z / tau
    log_q = zs - zs.max(1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - log_q), 0.0).sum(1)
    np.testing.assert_allclose(distill.distill_loss(z, p, tau), tau**2 * kl, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(distill.distill_loss(z, p, tau, scale=2 * tau**2), 2 * tau**2 * kl, rtol=1e-12)
    # gradient with respect to the logits: tau (softmax(z / tau) - p)
    grad = jax.grad(lambda zz: distill.distill_loss(zz, p, tau).sum())(jnp.asarray(z))
    q = np.exp(log_q)
    np.testing.assert_allclose(grad, tau * (q - p), rtol=1e-10, atol=1e-12)


def test_distill_loss_with_one_hot_targets_is_cross_entropy():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 6)
    ce = -(z[np.arange(6), y] - np.log(np.exp(z).sum(1)))
    np.testing.assert_allclose(distill.distill_loss(z, distill.one_hot(y, 4)), ce, rtol=1e-12)
    assert float(distill.distill_loss(z, np.asarray(jax.nn.softmax(z))).max()) < 1e-12  # KL(q || q) = 0
    with pytest.raises(ValueError, match="tau must be positive"):
        distill.distill_loss(z, distill.one_hot(y, 4), tau=0.0)


def test_simple_signals():
    y = np.array([0, 2, 1])
    np.testing.assert_array_equal(distill.one_hot(y, 3), np.eye(3)[y])
    ls = distill.label_smoothing(y, 3, 0.3)
    np.testing.assert_allclose(ls, 0.7 * np.eye(3)[y] + 0.1, rtol=1e-6)
    np.testing.assert_allclose(distill.softmax_t(np.array([[0.0, np.log(3.0)]]), 1.0), [[0.25, 0.75]])
    np.testing.assert_allclose(distill.softmax_t(np.array([[0.0, 2 * np.log(3.0)]]), 2.0), [[0.25, 0.75]])
    with pytest.raises(ValueError, match="ints in"):
        distill.one_hot(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="eps"):
        distill.label_smoothing(y, 3, 1.5)


# ---------------------------------------------------------------------------------------------
# Filter-KD
# ---------------------------------------------------------------------------------------------


def _filter_reference(n, k, batches, probs, alpha):
    """The Filter-KD rule written as a plain loop over samples."""
    q_bar, seen = np.zeros((n, k)), np.zeros(n, bool)
    for idx, pr in zip(batches, probs):
        for i, p in zip(idx, pr):
            q_bar[i] = (1 - alpha) * q_bar[i] + alpha * p if seen[i] else p
            seen[i] = True
    return q_bar, seen


def test_filter_update_matches_a_direct_loop():
    rng = np.random.default_rng(2)
    n, k, alpha = 12, 3, 0.3
    batches = [rng.choice(n - 2, size=4, replace=False) for _ in range(9)]  # the last 2 never drawn
    probs = [_random_distributions(rng, 4, k) for _ in batches]
    q_bar, seen = jnp.zeros((n, k)), jnp.zeros(n, bool)
    for idx, pr in zip(batches, probs):
        q_bar, seen = distill.filter_update(q_bar, seen, jnp.asarray(idx), jnp.asarray(pr), alpha)
    ref_q, ref_seen = _filter_reference(n, k, batches, probs, alpha)
    np.testing.assert_array_equal(seen, ref_seen)
    np.testing.assert_allclose(q_bar, ref_q, rtol=1e-12, atol=1e-15)
    assert not ref_seen[-2:].any() and ref_seen.sum() > n // 2
    np.testing.assert_array_equal(q_bar[-2:], 0.0)


def _reference_fit(apply_fn, params, x, targets, key, *, lr, momentum, epochs, batch_size, tau, alpha, filter_tau):
    """SGD with heavy-ball momentum by hand; batch order as documented in distill.fit."""
    n = x.shape[0]
    steps = n // batch_size

    def loss(p, xb, tb):  # tau^2 KL written out again
        log_q = jax.nn.log_softmax(apply_fn(p, xb) / tau)
        return tau**2 * jnp.mean(jnp.sum(jnp.where(tb > 0, tb * (jnp.log(jnp.where(tb > 0, tb, 1.0)) - log_q), 0.0), 1))

    @jax.jit
    def step(p, velocity, xb, tb):
        velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, jax.grad(loss)(p, xb, tb))
        return jax.tree.map(lambda w, v: w - lr * v, p, velocity), velocity

    predict = jax.jit(lambda p, xb: jax.nn.softmax(apply_fn(p, xb) / filter_tau, axis=-1))
    velocity = jax.tree.map(jnp.zeros_like, params)
    batches, probs = [], []
    for epoch in range(1, epochs + 1):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            batches.append(idx)
            probs.append(np.asarray(predict(params, x[idx])))  # before the step
            params, velocity = step(params, velocity, x[idx], targets[idx])
    return params, batches, probs


def test_fit_matches_a_hand_written_sgd_loop_and_filter():
    apply_fn, params = mlp((4, 16, 16, 3), seed=3)
    rng = np.random.default_rng(3)
    n, batch, epochs = 22, 5, 4  # 4 steps per epoch, 2 samples left out of each epoch
    x = jnp.asarray(rng.standard_normal((n, 4)))
    targets = jnp.asarray(_random_distributions(rng, n, 3, zeros=True))
    key = jax.random.key(11)
    kw = dict(lr=0.1, momentum=0.9, epochs=epochs, batch_size=batch, tau=2.0, alpha=0.25, filter_tau=1.5)
    fit = distill.fit(apply_fn, params, x, targets, key=key, **kw)
    ref_params, batches, probs = _reference_fit(apply_fn, params, x, targets, key, **kw)
    for a, b in zip(jax.tree.leaves(fit.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    ref_q, ref_seen = _filter_reference(n, 3, batches, probs, 0.25)
    assert ref_seen.all()
    np.testing.assert_allclose(fit.filtered, ref_q, rtol=1e-9, atol=1e-12)
    assert fit.losses.shape == (epochs * (n // batch),)


def test_never_visited_samples_and_the_early_stopped_table():
    """One epoch of 22 samples in batches of 5 leaves 2 samples undrawn; their rows are the
    predictions of the moment.  (The old code raised "assignment destination is read-only".)

    Validation labels equal to the network's own predictions after epoch 1 make epoch 1 the best
    one of a 4-epoch run, so its table ``filtered_es`` must be the one-epoch run's table."""
    apply_fn, params = mlp((4, 16, 3), seed=12)
    rng = np.random.default_rng(12)
    n, batch = 22, 5
    x = jnp.asarray(rng.standard_normal((n, 4)))
    targets = jnp.asarray(_random_distributions(rng, n, 3))
    key = jax.random.key(4)
    kw = dict(lr=0.3, momentum=0.9, batch_size=batch, tau=1.0, alpha=0.25, filter_tau=2.0)
    one = distill.fit(apply_fn, params, x, targets, key=key, epochs=1, **kw)
    _, batches, probs = _reference_fit(apply_fn, params, x, targets, key, epochs=1, **kw)
    ref_q, ref_seen = _filter_reference(n, 3, batches, probs, 0.25)
    assert (~ref_seen).sum() == n % batch
    np.testing.assert_allclose(one.filtered[ref_seen], ref_q[ref_seen], rtol=1e-9, atol=1e-12)
    unseen = np.flatnonzero(~ref_seen)
    np.testing.assert_allclose(one.filtered[unseen], jax.nn.softmax(apply_fn(one.params, x[unseen]) / 2.0),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(one.filtered_es, one.filtered)  # no validation data: the end table
    one.filtered[0] = 0.0  # a writable copy

    x_val = jnp.asarray(rng.standard_normal((30, 4)))
    y_val = np.asarray(jnp.argmax(apply_fn(one.params, x_val), -1))  # 100% after epoch 1
    four = distill.fit(apply_fn, params, x, targets, key=key, epochs=4, x_val=x_val, y_val=y_val, **kw)
    assert four.es_epoch == 1 and four.val_acc[0] == 1.0
    assert np.all(four.val_acc[1:] < 1.0)  # the later epochs differ, so the two tables must too
    np.testing.assert_allclose(four.filtered_es[ref_seen], ref_q[ref_seen], rtol=1e-9, atol=1e-12)
    # the undrawn rows come from the early-stopped parameters, not the final ones
    np.testing.assert_allclose(four.filtered_es[unseen], jax.nn.softmax(apply_fn(four.es_params, x[unseen]) / 2.0),
                               rtol=1e-9, atol=1e-12)
    _, batches4, probs4 = _reference_fit(apply_fn, params, x, targets, key, epochs=4, **kw)
    ref_q4, ref_seen4 = _filter_reference(n, 3, batches4, probs4, 0.25)
    np.testing.assert_allclose(four.filtered[ref_seen4], ref_q4[ref_seen4], rtol=1e-9, atol=1e-12)
    assert np.abs(four.filtered - four.filtered_es).max() > 0.01


@pytest.fixture(scope="module")
def small_run():
    """A teacher on a small 3-class problem, with validation data, paths and kept parameters."""
    apply_fn, params = mlp((2, 32, 3), seed=5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 2))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    x_val, y_val = rng.standard_normal((30, 2)), rng.integers(0, 3, 30)  # noisy validation labels
    fit = distill.fit(apply_fn, params, x, distill.one_hot(y, 3), key=jax.random.key(1), lr=0.2, epochs=6,
                      batch_size=8, x_val=x_val, y_val=y_val, record_x=x[:7], record_every=5,
                      keep_epochs=(0, 2, 6))
    return dict(apply_fn=apply_fn, params=params, x=x, y=y, x_val=x_val, y_val=y_val, fit=fit)


def test_paths_kept_params_and_early_stopping_agree(small_run):
    apply_fn, params, x, y, fit = (small_run[k] for k in ("apply_fn", "params", "x", "y", "fit"))
    x_val, y_val = small_run["x_val"], small_run["y_val"]
    assert fit.paths.shape == (6 + 1, 7, 3) and list(fit.record_steps) == [0, 5, 10, 15, 20, 25, 30]
    for epoch in (0, 2, 6):
        q = jax.nn.softmax(apply_fn(fit.kept[epoch], x[:7]), axis=-1)
        np.testing.assert_allclose(fit.paths[epoch], q, rtol=1e-10)  # one record per epoch here
    np.testing.assert_allclose(fit.paths[-1], jax.nn.softmax(apply_fn(fit.params, x[:7])), rtol=1e-10)
    assert fit.es_epoch == int(np.argmax(fit.val_acc)) + 1  # the first epoch with the best accuracy
    acc = np.mean(np.argmax(apply_fn(fit.es_params, x_val), -1) == y_val)
    assert acc == pytest.approx(fit.val_acc.max())
    # finer records: every step
    fine = distill.fit(apply_fn, params, x, distill.one_hot(y, 3), key=jax.random.key(1), lr=0.2, epochs=2,
                       batch_size=8, record_x=x[:2], record_every=1)
    assert fine.paths.shape == (2 * 5 + 1, 2, 3)
    np.testing.assert_allclose(fine.paths[5], fit.paths[1][:2], rtol=1e-10)  # same run, same point in time


def test_supervisory_signals(small_run):
    apply_fn, x, y, fit = (small_run[k] for k in ("apply_fn", "x", "y", "fit"))
    p_star = _random_distributions(np.random.default_rng(6), len(y), 3)
    sig = distill.supervisory_signals(fit, apply_fn, x, y, tau=2.0, eps=0.2, p_star=p_star)
    assert list(sig) == list(distill.SIGNALS)
    np.testing.assert_allclose(sig["teacher"], jax.nn.softmax(apply_fn(fit.params, x) / 2.0), rtol=1e-10)
    np.testing.assert_allclose(sig["early-stopped"], jax.nn.softmax(apply_fn(fit.es_params, x) / 2.0), rtol=1e-10)
    assert fit.es_epoch < 6  # so that the early-stopped teacher differs from the final one here
    assert not np.allclose(sig["early-stopped"], sig["teacher"])
    np.testing.assert_allclose(sig["filter-kd"], fit.filtered_es)  # the table at the best epoch
    np.testing.assert_allclose(sig["filter-kd-end"], fit.filtered)
    assert not np.allclose(sig["filter-kd"], sig["filter-kd-end"])
    np.testing.assert_allclose(sig["label-smoothing"], 0.8 * np.eye(3)[y] + 0.2 / 3, rtol=1e-6)
    np.testing.assert_allclose(sig["p-star"], p_star, rtol=1e-6)
    for p in sig.values():
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    assert "p-star" not in distill.supervisory_signals(fit, apply_fn, x, y)


def test_fit_argument_errors():
    apply_fn, params = mlp((2, 4, 3), seed=7)
    x = np.zeros((10, 2))
    good = distill.one_hot(np.zeros(10, int), 3)
    kw = dict(key=jax.random.key(0), lr=0.1, epochs=1, batch_size=5)
    with pytest.raises(ValueError, match="one_hot"):
        distill.fit(apply_fn, params, x, np.zeros(10, int), **kw)
    with pytest.raises(ValueError, match="probability distribution"):
        distill.fit(apply_fn, params, x, 2 * good, **kw)
    with pytest.raises(ValueError, match="record_every must divide"):
        distill.fit(apply_fn, params, x, good, record_x=x, record_every=3, **kw)
    with pytest.raises(ValueError, match="x_val and y_val"):
        distill.fit(apply_fn, params, x, good, x_val=x, **kw)
    with pytest.raises(ValueError, match="keep_epochs"):
        distill.fit(apply_fn, params, x, good, keep_epochs=(2,), **kw)


# ---------------------------------------------------------------------------------------------
# label noise and statistics
# ---------------------------------------------------------------------------------------------


def test_flip_labels():
    y = np.random.default_rng(8).integers(0, 4, 20_000)
    y_noisy, flipped = distill.flip_labels(y, 4, 0.3, jax.random.key(3))
    assert flipped.sum() == 6000
    np.testing.assert_array_equal(flipped, y_noisy != y)  # every flip changes the class
    shifts = np.bincount((y_noisy - y)[flipped] % 4, minlength=4)
    assert shifts[0] == 0 and np.all(np.abs(shifts[1:] / 2000 - 1) < 0.08)  # uniform over other classes
    again, _ = distill.flip_labels(y, 4, 0.3, jax.random.key(3))
    np.testing.assert_array_equal(again, y_noisy)
    assert not distill.flip_labels(y, 4, 0.0, jax.random.key(3))[1].any()
    with pytest.raises(ValueError, match="rate"):
        distill.flip_labels(y, 4, 1.0, jax.random.key(3))


def test_path_statistics():
    p_star = np.array([[0.6, 0.3, 0.1], [1.0, 0.0, 0.0]])
    paths = np.array([
        [[1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]],
        [[0.6, 0.3, 0.1], [0.8, 0.1, 0.1]],
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
    ])
    d = distill.path_distances(paths, p_star)
    np.testing.assert_allclose(d[1], [0.0, np.sqrt(0.06)])
    z = distill.zigzag_stats(paths, p_star)
    np.testing.assert_allclose(z["min"], [0.0, 0.0])
    np.testing.assert_array_equal(z["argmin"], [1, 2])
    np.testing.assert_allclose(z["final"], [np.sqrt(0.36 + 0.09 + 0.81), 0.0])
    np.testing.assert_allclose(z["start"], np.linalg.norm(paths[0] - p_star, axis=1))
    with pytest.raises(ValueError, match="paths must be"):
        distill.path_distances(paths[0], p_star)


def test_mean_interval():
    v = np.array([[0.1, 0.4], [0.3, 0.4], [0.2, 0.7]])  # 3 seeds, 2 settings
    mean, half = distill.mean_interval(v)
    np.testing.assert_allclose(mean, [0.2, 0.5])
    sd = np.sqrt(np.array([(0.01 + 0.01 + 0.0) / 2, (0.01 + 0.01 + 0.04) / 2]))  # ddof = 1
    np.testing.assert_allclose(half, 4.302652729749462 * sd / np.sqrt(3))  # t quantile 0.975, 2 degrees of freedom
    with pytest.raises(ValueError, match="at least 2"):
        distill.mean_interval(v[:1])


# ---------------------------------------------------------------------------------------------
# the simplex plot
# ---------------------------------------------------------------------------------------------


def test_simplex_coordinates():
    np.testing.assert_allclose(simplex_xy(np.eye(3)), SIMPLEX_CORNERS)
    np.testing.assert_allclose(simplex_xy([1 / 3, 1 / 3, 1 / 3]), [0.5, np.sqrt(3) / 6], atol=1e-15)
    np.testing.assert_allclose(simplex_xy([0.5, 0.5, 0.0]), [0.5, 0.0])
    rng = np.random.default_rng(9)
    p, q = _random_distributions(rng, 50, 3), _random_distributions(rng, 50, 3)
    # a similarity: distances shrink by exactly 1/sqrt(2)
    np.testing.assert_allclose(np.linalg.norm(simplex_xy(p) - simplex_xy(q), axis=1),
                               np.linalg.norm(p - q, axis=1) / np.sqrt(2), rtol=1e-12)
    with pytest.raises(ValueError, match="3 classes"):
        simplex_xy(np.ones((2, 4)) / 4)


def test_simplex_draws_the_paths_where_they_are():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(10)
    paths = np.stack([_random_distributions(rng, 9, 3) for _ in range(2)])  # (2 paths, 9 times, 3)
    ax = simplex(paths, p_star=paths[:, -1], labels=[0, 2], grid=False)
    lines = [line for line in ax.lines if len(line.get_xdata()) == 9]
    assert len(lines) == 4  # a line and dots per path
    for i in range(2):
        np.testing.assert_allclose(np.c_[lines[2 * i].get_xdata(), lines[2 * i].get_ydata()], simplex_xy(paths[i]))
    # with smoothing, the line is the moving average of the records
    ax2 = simplex(paths[0], smooth=3, grid=False)
    line = [ln for ln in ax2.lines if len(ln.get_xdata()) == 9][0]
    np.testing.assert_allclose(np.c_[line.get_xdata(), line.get_ydata()], simplex_xy(moving_average(paths[0], 3)))
    with pytest.raises(ValueError, match="paths must be"):
        simplex(np.ones((2, 2, 2, 3)) / 3)
    plt.close("all")


def test_moving_average_against_a_loop():
    v = np.random.default_rng(11).standard_normal((10, 3))
    for w in (1, 2, 3, 4, 5):
        lo, hi = (w - 1) // 2, w // 2
        ref = np.array([np.mean([v[min(max(t + s, 0), 9)] for s in range(-lo, hi + 1)], axis=0) for t in range(10)])
        np.testing.assert_allclose(moving_average(v, w), ref, rtol=1e-12)
