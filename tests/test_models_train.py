import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_tutorial import kernels, models, train
from helpers import mlp, rel_err


def test_parameterisations_define_the_same_function_family():
    """NTK and standard parameterisation: same output variance at init (Monte Carlo)."""
    x = jax.random.normal(jax.random.key(0), (3, 10))
    outs = {}
    for par in ("ntk", "standard"):
        outs[par] = np.stack([
            np.asarray(mlp((10, 256, 4), seed=s, parameterization=par)[0](
                mlp((10, 256, 4), seed=s, parameterization=par)[1], x))
            for s in range(30)
        ])
    assert abs(outs["ntk"].var() / outs["standard"].var() - 1) < 0.25


def test_functional_round_trip_and_dense_description():
    model = models.MLP((6, 5, 2), w_std=1.7, b_std=0.3, rngs=nnx.Rngs(params=jax.random.key(1)))
    apply_fn, params = models.functional(model)
    x = jnp.ones((4, 6))
    np.testing.assert_allclose(apply_fn(params, x), model(x), rtol=1e-6)
    (w, b, cw, cb), _ = apply_fn.layers(params)
    assert w.shape == (6, 5) and cw == pytest.approx(1.7 / np.sqrt(6)) and cb == pytest.approx(0.3)
    assert models.num_params(params) == 6 * 5 + 5 + 5 * 2 + 2
    # same architecture, another seed: equal functional models (compiled code is reused)
    other, _ = models.functional(models.MLP((6, 5, 2), w_std=1.7, b_std=0.3, rngs=nnx.Rngs(7)))
    assert other == apply_fn and hash(other) == hash(apply_fn)


def test_dropout_only_with_a_key():
    apply_fn, params = mlp((6, 64, 3), dropout=0.5)
    x = jnp.ones((2, 6))
    np.testing.assert_array_equal(apply_fn(params, x), apply_fn(params, x))
    a = apply_fn(params, x, jax.random.key(1))
    b = apply_fn(params, x, jax.random.key(2))
    assert not np.allclose(a, b)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="unknown activation 'sigmoidal'"):
        models.MLP((3, 2), activation="sigmoidal", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parameterization"):
        models.MLP((3, 2), parameterization="mup", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="widths"):
        models.MLP((3,), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_one_gd_step_moves_predictions_by_the_entk(loss):
    """f_1(x_o) - f_0(x_o) = -(lr/n) sum_u Theta(x_o, x_u) grad_f loss(x_u) + O(lr^2)."""
    apply_fn, params = mlp((5, 64, 64, 3), seed=2)
    x = jax.random.normal(jax.random.key(3), (8, 5))
    xo = jax.random.normal(jax.random.key(4), (4, 5))
    y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    f0 = apply_fn(params, x)
    g = train.loss_grad_wrt_logits(loss, f0, jax.nn.one_hot(y, 3))
    theta = kernels.entk(apply_fn, params, xo, x)
    errs = []
    for lr in (1e-2, 1e-3):
        res = train.train(apply_fn, params, x, y, lr=lr, steps=1, loss=loss, record_steps=[0, 1], record_x=xo)
        moved = res.predictions[1] - res.predictions[0]
        predicted = -(lr / len(x)) * jnp.einsum("abij,bj->ai", theta, g)
        errs.append(rel_err(moved, predicted))
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 5  # error O(lr): relative error shrinks with lr


def test_training_records_and_reduces_loss():
    apply_fn, params = mlp((5, 32, 3), seed=0, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(5), (20, 5))
    y = jnp.arange(20) % 3
    res = train.train(apply_fn, params, x, y, lr=0.5, steps=50, record_steps=[0, 10, 50],
                      record_x=x[:4], record_kernel="pntk")
    assert res.losses.shape == (50,) and res.losses[-1] < res.losses[0]
    assert res.predictions.shape == (3, 4, 3) and res.kernels.shape == (3, 4, 4)
    np.testing.assert_allclose(res.predictions[-1], apply_fn(res.params, x[:4]), rtol=1e-5)
    acc = train.accuracy(apply_fn, res.params, x, y)
    # against the definition: the fraction of arg-max predictions equal to the labels
    want = float(np.mean(np.argmax(np.asarray(apply_fn(res.params, x)), axis=1) == np.asarray(y)))
    assert acc == pytest.approx(want, abs=1e-6) and acc > 1 / 3  # 50 steps learn more than chance


def test_sgd_is_reproducible_from_its_key_and_records_the_seed():
    apply_fn, params = mlp((5, 16, 2), seed=0, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(6), (30, 5))
    y = (x[:, 0] > 0).astype(jnp.int32)
    run = lambda k: train.train(apply_fn, params, x, y, lr=0.1, epochs=3, batch_size=8,  # noqa: E731
                                momentum=0.9, loss="xent", key=jax.random.key(k))
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses, c.losses)
    assert a.losses.shape == (12,) and a.config["key"] is not None


def test_train_argument_errors():
    apply_fn, params = mlp((5, 8, 2), dtype=jnp.float32)
    x, y = jnp.ones((4, 5)), jnp.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="exactly one of steps= or epochs="):
        train.train(apply_fn, params, x, y, lr=0.1)
    with pytest.raises(ValueError, match="key="):
        train.train(apply_fn, params, x, y, lr=0.1, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="unknown loss"):
        train.train(apply_fn, params, x, y, lr=0.1, steps=1, loss="hinge")
    with pytest.raises(ValueError, match="but y has 3"):
        train.train(apply_fn, params, x, y[:3], lr=0.1, steps=1)
    with pytest.raises(ValueError, match="record_steps"):
        train.train(apply_fn, params, x, y, lr=0.1, steps=2, record_steps=[5])
    with pytest.raises(FloatingPointError, match="lower lr"):
        train.train(apply_fn, params, x * 1e3, y, lr=1e6, steps=100)


def test_stop_loss_stops_early_and_records_the_last_step():
    apply_fn, params = mlp((5, 32, 3), seed=0, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(9), (12, 5))
    y = jnp.arange(12) % 3
    full = train.train(apply_fn, params, x, y, lr=0.5, steps=400)
    target = float(full.losses[50])
    res = train.train(apply_fn, params, x, y, lr=0.5, steps=400, stop_loss=target,
                      record_steps=[0, 400], record_x=x[:2])
    assert len(res.losses) <= 51 and res.losses[-1] <= target and (res.losses[:-1] > target).all()
    assert res.record_steps.tolist() == [0, len(res.losses)]
    np.testing.assert_allclose(res.predictions[-1], apply_fn(res.params, x[:2]), rtol=1e-5)


def test_param_dtype_is_float32_by_default_even_with_x64():
    _, params = models.functional(models.MLP((3, 4, 2), rngs=nnx.Rngs(0)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    _, p64 = models.functional(models.MLP((3, 4, 2), param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(p64))


def test_full_batch_steps_scanned_equal_steps_taken_one_by_one():
    """Full-batch GD runs its steps between records as lax.scans of the shared core; a callback
    makes train() take the same steps one jitted call at a time: the parameters, losses and
    records agree, with momentum, weight decay, dropout and a schedule."""
    apply_fn, params = mlp((5, 16, 3), dropout=0.2)
    x = jax.random.normal(jax.random.key(0), (13, 5))
    y = jnp.arange(13) % 3
    kw = dict(lr=0.3, steps=37, momentum=0.9, weight_decay=1e-3, dropout=True, key=jax.random.key(1),
              lr_schedule="onecycle", record_steps=(0, 5, 37), loss="xent")
    scanned = train.train(apply_fn, params, x, y, **kw)
    taken = []
    stepped = train.train(apply_fn, params, x, y, callback=lambda step, p: taken.append(step), **kw)
    assert taken == list(range(1, 38)) and scanned.losses.shape == (37,)
    np.testing.assert_allclose(scanned.losses, stepped.losses, rtol=1e-10)
    np.testing.assert_allclose(scanned.predictions, stepped.predictions, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(stepped.params)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert train.scan_friendly(apply_fn, params, x)


def test_distillation_trains_on_the_shared_sgd_core():
    """distill.fit has no SGD loop of its own: it runs train.sgd_core (one compiled core for a
    teacher and a student of the same settings)."""
    from ntk_tutorial import distill

    apply_fn, params = mlp((5, 8, 3), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (16, 5))
    targets = distill.one_hot(jnp.arange(16) % 3, 3)
    before = train.sgd_core.cache_info()
    distill.fit(apply_fn, params, x, targets, key=jax.random.key(1), lr=0.1, epochs=2, batch_size=4)
    distill.fit(apply_fn, params, x, targets, key=jax.random.key(2), lr=0.1, epochs=2, batch_size=4)
    after = train.sgd_core.cache_info()
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1


def test_pure_sgd_is_train_with_mini_batches_and_can_be_vmapped():
    """train.sgd (pure, jit/vmap-able) gives train()'s parameters for the same key: the same
    batching (a ragged last batch) and seeding; vmapped over keys it equals each run alone."""
    apply_fn, params = mlp((5, 16, 3))
    x = jax.random.normal(jax.random.key(0), (21, 5))
    y = jax.nn.one_hot(jnp.arange(21) % 3, 3)
    keys = jax.random.split(jax.random.key(3), 3)
    run = jax.jit(lambda p, kk: train.sgd(apply_fn, p, x, y, kk, lr=0.2, epochs=4, batch_size=8, momentum=0.5))
    for kk in keys[:2]:
        want = train.train(apply_fn, params, x, y, lr=0.2, epochs=4, batch_size=8, momentum=0.5, key=kk).params
        for a, b in zip(jax.tree.leaves(run(params, kk)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    batched = jax.jit(jax.vmap(run, in_axes=(None, 0)))(params, keys)
    for i, kk in enumerate(keys):
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(run(params, kk))):
            np.testing.assert_allclose(a[i], b, rtol=1e-10, atol=1e-12)


def test_wrap_around_batches_are_full_and_train_and_sgd_agree_with_a_hand_written_loop():
    """``last_batch="wrap"`` (notebook 03's retraining): every batch holds ``batch_size`` samples,
    the last one filled up with the epoch's first; train() and train.sgd() give the parameters of
    a loop written here from the documented order rule (plain SGD on the mean of 1/2 ||f - y||^2)."""
    apply_fn, params = mlp((5, 16, 3))
    x = jax.random.normal(jax.random.key(0), (21, 5))
    y = jax.nn.one_hot(jnp.arange(21) % 3, 3)
    key, lr, bs, epochs = jax.random.key(4), 0.1, 8, 3
    n, per_epoch = 21, 3  # ceil(21 / 8): batches of 8, 8 and 5 + 3 wrapped

    def loss(p, xb, yb):
        return 0.5 * jnp.mean(jnp.sum((apply_fn(p, xb) - yb) ** 2, axis=-1))

    p = params
    shuffle_key = jax.random.split(key)[0]
    for e in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, e * per_epoch + 1), n))
        order = np.concatenate([order, order[: per_epoch * bs - n]])
        for b in range(per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            assert len(idx) == bs
            g = jax.grad(loss)(p, x[idx], y[idx])
            p = jax.tree.map(lambda a, d: a - lr * d, p, g)
    got_train = train.train(apply_fn, params, x, y, lr=lr, epochs=epochs, batch_size=bs, key=key,
                            last_batch="wrap")
    got_sgd = jax.jit(lambda pp: train.sgd(apply_fn, pp, x, y, key, lr=lr, epochs=epochs, batch_size=bs,
                                           last_batch="wrap"))(params)
    for got in (got_train.params, got_sgd):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert got_train.config["last_batch"] == "wrap" and got_train.losses.shape == (epochs * per_epoch,)
    smaller = train.train(apply_fn, params, x, y, lr=lr, epochs=epochs, batch_size=bs, key=key).params
    assert not np.allclose(jax.tree.leaves(smaller)[0], jax.tree.leaves(p)[0])  # the rule matters
    with pytest.raises(ValueError, match="last_batch must be one of"):
        train.train(apply_fn, params, x, y, lr=lr, epochs=1, batch_size=bs, key=key, last_batch="drop")
