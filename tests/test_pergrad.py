"""Per-example gradients from one batched backward pass (``ntk_tutorial.kernels.pergrad``, issue 17).

The reference is independent of the module: ``vmap`` of ``jax.grad`` of each example's own
output, the textbook definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_tutorial import models
from ntk_tutorial.kernels import pergrad


def _rngs(seed=0):
    return nnx.Rngs(params=jax.random.key(seed))


def _model(name):
    if name == "cnn":
        return models.CNN((8, 8, 3), 5, channels=6, depth=2, rngs=_rngs())
    if name == "wrn":
        return models.WideResNet((8, 8, 3), 5, blocks=1, widen=1, rngs=_rngs())
    if name == "lookahead-wrn":
        return models.LookaheadWRN((8, 8, 3), 5, stages=2, widen=1, rngs=_rngs())
    if name == "resnet18":
        return models.ResNet18((8, 8, 3), 5, width=4, rngs=_rngs())
    return models.MLP((8 * 8 * 3, 16, 5), rngs=_rngs())


def _fn_aux(name):
    apply_fn, params, stats = models.split(_model(name))
    if stats is None:
        return apply_fn, params, None
    # perturbed running statistics, so that the batch-norm scale and shift matter
    stats = jax.tree.map(lambda s: s + 0.3 * jnp.abs(jax.random.normal(jax.random.key(3), s.shape)), stats)
    return apply_fn, params, stats


def _reference(fn, params, x, aux, cot):
    def one(xi, ci):
        def out(p):
            return (fn(p, xi[None]) if aux is None else fn(p, xi[None], aux))[0]

        return jax.grad(lambda p: jnp.vdot(ci, out(p)))(params)

    return jax.jit(jax.vmap(one))(x, cot)


def _structured(fn, params, x, aux, cot):
    return jax.jit(lambda p, xx, a, c: pergrad.per_example_grads(fn, p, xx, a, c))(params, x, aux, cot)


@pytest.mark.parametrize("name", ["cnn", "wrn", "lookahead-wrn", "resnet18", "mlp"])
def test_one_backward_pass_equals_vmap_grad(name):
    fn, params, aux = _fn_aux(name)
    x = jax.random.normal(jax.random.key(1), (7, 8 * 8 * 3))
    assert pergrad.analyse(fn, params, x, aux).boundaries >= 2  # at least a weight and a bias
    cot = jax.random.normal(jax.random.key(2), (7, 5))
    got = _structured(fn, params, x, aux, cot)
    want = _reference(fn, params, x, aux, cot)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        scale = float(jnp.max(jnp.abs(w))) + 1e-12
        assert float(jnp.max(jnp.abs(g - w))) / scale < 1e-5


def test_several_cotangents_at_once_give_the_jacobian():
    fn, params, aux = _fn_aux("wrn")
    x = jax.random.normal(jax.random.key(1), (4, 8 * 8 * 3))
    eye = jnp.broadcast_to(jnp.eye(5)[:, None, :], (5, 4, 5))  # logit i of every example
    got = _structured(fn, params, x, aux, eye)
    ref = jax.jit(jax.vmap(lambda c: _reference(fn, params, x, aux, c)))(eye)
    for i in range(5):
        want = jax.tree.map(lambda r: r[i], ref)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g[i]), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_functions_that_mix_examples_are_refused_with_the_reason():
    apply_fn, params = models.functional(_model("mlp"))
    x = jnp.ones((3, 8 * 8 * 3))
    with pytest.raises(pergrad.Unsupported, match="example axis"):
        pergrad.analyse(lambda p, xx: apply_fn(p, xx - xx.mean(0)), params, x)
    with pytest.raises(pergrad.Unsupported, match="'rev' on the examples"):
        pergrad.analyse(lambda p, xx: apply_fn(p, xx[::-1]), params, x)
    # a reduction over the batch (what batch norm in training mode does): examples interact
    with pytest.raises(pergrad.Unsupported, match="example axis"):
        pergrad.analyse(lambda p, xx: apply_fn(p, xx) - apply_fn(p, xx).mean(0), params, x)
