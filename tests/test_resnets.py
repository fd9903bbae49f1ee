"""The paper's image models (issue 8): wide ResNets and ResNet18 with batch norm.

References are independent of the code under test: published parameter counts, flax nnx's own
training-mode forward pass and gradient (``nnx.grad`` on the module), hand-computed batch
statistics, and per-example gradients flattened with ``ravel_pytree``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from ntk_tutorial import kernels, models, train
from ntk_tutorial.active import run as R
from ntk_tutorial.active import strategies as S


def rngs(seed=0):
    return nnx.Rngs(params=jax.random.key(seed))


def small_wrn(seed=0, **kw):
    kw = {"blocks": 1, "widen": 1, **kw}
    return models.WideResNet((8, 8, 3), 4, rngs=rngs(seed), **kw)


def images(n, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, 8 * 8 * 3))


def test_parameter_counts_match_the_published_architectures():
    def count(make):  # shapes only: nothing is allocated
        abstract = nnx.eval_shape(make)
        return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))))

    # ResNet18 for CIFAR-10 (3x3 stem, no max-pool): 11,173,962 parameters, as usually reported
    assert count(lambda: models.ResNet18((32, 32, 3), 10, rngs=rngs())) == 11_173_962
    # Zagoruyko & Komodakis 2016, Table 1/4: WRN-16-8 has 11.0M, WRN-28-10 36.5M parameters
    assert round(count(lambda: models.WideResNet((32, 32, 3), 10, blocks=2, widen=8, rngs=rngs())) / 1e6, 1) == 11.0
    assert round(count(lambda: models.WideResNet((32, 32, 3), 10, blocks=4, widen=10, rngs=rngs())) / 1e6, 1) == 36.5


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="image_shape"):
        models.WideResNet((32, 32), 10, rngs=rngs())
    apply_fn, params, state = models.split(small_wrn())
    with pytest.raises(ValueError, match="expects images"):
        apply_fn(params, jnp.zeros((2, 5, 5, 3)), state)
    # a network with batch norm needs its state, and says how to get it
    with pytest.raises(ValueError, match="pass its state"):
        apply_fn(params, jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="models.split"):
        models.functional(small_wrn())


def test_apply_fn_freezes_batch_norm_and_the_kernel_is_the_gradient_gram_matrix():
    model = small_wrn()
    apply_fn, params, state = models.split(model)
    x = images(6)
    # frozen batch norm: each example's output does not depend on the rest of the batch
    np.testing.assert_allclose(apply_fn(params, x, state)[:2], apply_fn(params, x[:2], state), rtol=1e-5,
                               atol=1e-6)
    # training mode normalises with the batch: it does
    out_all, _ = apply_fn.train_apply(params, state, x)
    out_two, _ = apply_fn.train_apply(params, state, x[:2])
    assert np.abs(np.asarray(out_all[:2] - out_two)).max() > 1e-3

    # after training (non-trivial running statistics), the kernel of the trained network against
    # per-example gradients of sum_j f_j / sqrt(k) through a module trained with nnx's own API
    y = jnp.arange(6) % 4
    res = train.train(apply_fn, params, x, y, lr=0.05, steps=2, state=state)
    native = small_wrn()

    def loss(m):
        return 0.5 * jnp.mean(jnp.sum((m(x, train=True) - jax.nn.one_hot(y, 4)) ** 2, axis=-1))

    for _ in range(2):
        grads = nnx.grad(loss)(native)
        nnx.update(native, jax.tree.map(lambda p, g: p - 0.05 * g, nnx.state(native, nnx.Param), grads))
    assert np.abs(np.asarray(nnx.state(native, nnx.BatchStat)["bn"]["mean"][...])).max() > 1e-3
    graphdef, state = nnx.split(native)

    def summed(full_state, xi):
        m = nnx.merge(graphdef, full_state)
        return m(xi[None]).sum() / jnp.sqrt(4.0)

    grad = jax.jit(jax.grad(summed))
    grads = [ravel_pytree(nnx.to_pure_dict(nnx.state(
        nnx.merge(graphdef, grad(state, xi)), nnx.Param)))[0] for xi in x]
    g = np.stack([np.asarray(v) for v in grads])
    np.testing.assert_allclose(kernels.pntk(apply_fn, res.params, x, state=res.state), g @ g.T, rtol=2e-4,
                               atol=1e-4)


def test_one_step_updates_running_statistics_like_a_hand_computed_average():
    model = small_wrn()
    apply_fn, params, state = models.split(model)
    x, y = images(16), jnp.arange(16) % 4
    res = train.train(apply_fn, params, x, y, lr=0.1, steps=1, state=state)
    # the first batch norm sees the stem's output: running mean <- 0.9 * 0 + 0.1 * batch mean
    stem = model.stem(x.reshape(16, 8, 8, 3))
    expected_mean = 0.1 * np.asarray(stem.mean(axis=(0, 1, 2)))
    expected_var = 0.9 * 1.0 + 0.1 * np.asarray(stem.var(axis=(0, 1, 2)))
    got = res.state["layers"][0]["bn1"]
    np.testing.assert_allclose(got["mean"], expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["var"], expected_var, rtol=1e-4, atol=1e-6)
    # the state passed in is unchanged (plain data: training returns a new one)
    np.testing.assert_allclose(state["layers"][0]["bn1"]["mean"], 0.0)


def test_gradient_descent_matches_nnx_native_training():
    lr, steps = 0.05, 3
    x, y = images(12), jnp.arange(12) % 4
    targets = jax.nn.one_hot(y, 4)
    apply_fn, params, state = models.split(small_wrn(seed=3))
    res = train.train(apply_fn, params, x, y, lr=lr, steps=steps, state=state)

    model = small_wrn(seed=3)  # the same initialisation, trained with flax's own API

    def loss(m):
        return 0.5 * jnp.mean(jnp.sum((m(x, train=True) - targets) ** 2, axis=-1))

    for _ in range(steps):
        grads = nnx.grad(loss)(model)  # the forward pass also updates the running statistics
        new = jax.tree.map(lambda p, g: p - lr * g, nnx.state(model, nnx.Param), grads)
        nnx.update(model, new)
    ref_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ref_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply_fn(res.params, x, res.state), model(x), rtol=1e-4, atol=1e-5)


def test_new_statistics_and_repeated_training_reuse_compiled_functions():
    apply_fn, params, state = models.split(small_wrn())
    x, y = images(8), jnp.arange(8) % 4
    first = train.train(apply_fn, params, x, y, lr=0.05, steps=2, state=state)
    models.eval_fn(apply_fn)(first.params, x, first.state)
    steps_before = train.sgd_core.cache_info()
    evals_before = models._jit.cache_info()
    kernels.pntk(apply_fn, first.params, x, state=first.state)
    kernels_before = kernels._features_fn.cache_info()
    # another network of the same architecture (a new seed), then new statistics
    other, other_params, other_state = models.split(small_wrn(seed=7))
    assert other == apply_fn and hash(other) == hash(apply_fn) and other is not apply_fn
    second = train.train(other, other_params, x, y, lr=0.05, steps=2, state=other_state)
    models.eval_fn(other)(second.params, x, second.state)
    kernels.pntk(other, second.params, x, state=second.state)
    assert train.sgd_core.cache_info().misses == steps_before.misses
    assert train.sgd_core.cache_info().hits > steps_before.hits
    assert models._jit.cache_info().misses == evals_before.misses
    assert kernels._features_fn.cache_info().misses == kernels_before.misses


def test_penultimate_features_and_badge_embeddings_of_a_resnet():
    model = models.ResNet18((8, 8, 3), 4, width=4, rngs=rngs(2))
    apply_fn, params, state = models.split(model)
    x = images(5)
    h = S.penultimate_features(apply_fn, params, x, state)
    np.testing.assert_allclose(h, model.features(x), rtol=1e-4, atol=1e-5)
    ctx = S.Context(apply_fn, params, x[:0], np.zeros(0, int), np.asarray(x), 4, state=state)
    emb = S.gradient_embeddings(ctx)

    # reference: gradient of the cross-entropy at the predicted label w.r.t. the readout weights
    def xent(kernel, xi):
        logits = model.features(xi[None]) @ kernel + model.head.bias[...]
        return -jax.nn.log_softmax(logits)[0, jnp.argmax(logits[0])]

    ref = np.stack([np.asarray(jax.grad(xent)(model.head.kernel[...], xi)).T.reshape(-1) for xi in x])
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-6)


TINY_WRN = dict(dataset="digits", model="wrn", stages=1, widen=1, init=12, query=4, subset=24, epochs=2,
                batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4, normalize="none")


@pytest.mark.parametrize("strategy", ["mlmoc", "badge"])
def test_al_runner_with_a_wide_resnet_resumes_exactly(tmp_path, strategy):
    cfg = R.config_from_preset(None, **TINY_WRN, strategy=strategy, cycles=2)
    whole = R.run_experiment(cfg, tmp_path / "whole")
    R.run_experiment(R.config_from_preset(None, **TINY_WRN, strategy=strategy, cycles=1), tmp_path / "split")
    split = R.run_experiment(cfg, tmp_path / "split")
    assert [r["n_labelled"] for r in whole] == [12, 16]
    for a, b in zip(whole, split):
        assert a["queried"] == b["queried"] and a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
    # each cycle's file holds the batch-norm statistics beside the parameters
    apply_fn, params, state = R.build_model(cfg, 64, 10, (8, 8, 1))
    saved_params, saved_stats = R._load_params(tmp_path / "whole" / f"{strategy}_seed0.cycle001.npz",
                                               R._saved(params, state))
    assert jax.tree.structure(saved_stats) == jax.tree.structure(state)
    assert np.abs(np.asarray(saved_stats["bn"]["mean"])).max() > 0  # trained, not the initial zeros


# ---------------------------------------------------------------------------------------------
# the released code's wide ResNet (the look-ahead paper's MNIST / SVHN / CIFAR-10 network)
# ---------------------------------------------------------------------------------------------


def released_wrn_parameters(stages, depth, k, c_in=1, classes=10):
    """Parameter count of the released Wide_ResNet(num_layers=stages, depth, widen_factor=k),
    counted from its definition (convs with bias, BN scale and shift, the linear readout)."""
    conv = lambda a, b, s: a * b * s * s + b  # noqa: E731
    n = (depth - 4) // 6
    total, c = conv(c_in, 16 * k, 3), 16 * k
    for stage in range(stages):
        out = (32, 64, 128)[stage] * k
        for b in range(n):
            total += 2 * c + conv(c, out, 3) + 2 * out + conv(out, out, 3)
            if b == 0 and (stage > 0 or c != out):
                total += conv(c, out, 1)
            c = out
    return total + 2 * c + c * classes + classes


@pytest.mark.parametrize("stages,depth,k", [(1, 10, 1), (1, 10, 20), (2, 10, 10), (2, 16, 2), (3, 10, 1)])
def test_lookahead_wrn_has_the_released_structure(stages, depth, k):
    model = models.LookaheadWRN((28, 28, 1), 10, stages=stages, depth=depth, widen=k, rngs=rngs())
    _, params, _ = models.split(model)
    assert models.num_params(params) == released_wrn_parameters(stages, depth, k)
    assert params["head"]["kernel"].shape == ((32, 64, 128)[stages - 1] * k, 10)
    # stride 2 on the second conv of the first block of the later stages: 28 -> 14 -> 7
    assert _through(model, jnp.zeros((1, 28, 28, 1))).shape[1:] == ({1: 28, 2: 14, 3: 7}[stages],) * 2 + (
        (32, 64, 128)[stages - 1] * k,)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.LookaheadWRN((28, 28, 1), 10, depth=12, rngs=rngs())


def _through(model, x):
    h = model.stem(x)
    for layer in model.layers:
        h = layer(h, False)
    return h


def test_population_stats_are_the_batch_statistics_of_the_inputs():
    """Recomputed running statistics equal the mean and (biased) variance of each batch norm's
    input over the training set, computed by hand from the module's own layers."""
    model = models.LookaheadWRN((8, 8, 1), 4, widen=1, rngs=rngs(3))
    apply_fn, params, state = models.split(model)
    x = jax.random.normal(jax.random.key(1), (16, 64), jnp.float32)
    stats = apply_fn.population_stats(params, state, x)
    img = x.reshape(16, 8, 8, 1)
    h = model.stem(img)
    block = model.layers[0]
    np.testing.assert_allclose(stats["layers"][0]["bn1"]["mean"], h.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["layers"][0]["bn1"]["var"], h.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # in training mode the block normalises with the batch statistics: its output feeds the last BN
    out = block(h, True)
    np.testing.assert_allclose(stats["bn"]["mean"], out.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    # averaged over batches: the mean of the batches' statistics
    halves = [apply_fn.population_stats(params, state, x[:8]), apply_fn.population_stats(params, state, x[8:])]
    both = apply_fn.population_stats(params, state, x, batch_size=8)
    np.testing.assert_allclose(both["bn"]["var"], (halves[0]["bn"]["var"] + halves[1]["bn"]["var"]) / 2, rtol=1e-5)


def test_training_with_recomputed_statistics_fits_in_evaluation_mode():
    """With recompute_stats the network in evaluation mode is the one training fitted: its
    training loss in evaluation mode equals the training-mode loss of the full batch."""
    model = models.LookaheadWRN((8, 8, 1), 4, widen=1, rngs=rngs(0))
    apply_fn, params, state = models.split(model)
    x = jax.random.normal(jax.random.key(2), (24, 64))
    y = jnp.arange(24) % 4
    res = train.train(apply_fn, params, x, y, lr=0.2, epochs=60, momentum=0.9, recompute_stats=True,
                      state=state)
    train_mode, _ = apply_fn.train_apply(res.params, res.state, x)
    eval_mode = apply_fn(res.params, x, res.state)
    np.testing.assert_allclose(eval_mode, train_mode, rtol=1e-4, atol=1e-5)
