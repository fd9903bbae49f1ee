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


def test_the_per_layer_rule_reads_each_layer_and_its_structured_form_is_the_kernel():
    """The per-layer FLOP rule (``Analysis.layers``): every boundary is one layer with its
    parameter count; a convolution's positions, fan-in and fan-out are read from its shapes; and
    the structured form the rule prices (Gram matrices of input patches and of back-propagated
    vectors over positions, multiplied elementwise and summed) gives the same kernel entry as the
    dot product of the two examples' weight gradients, computed here by ``jax.grad``."""
    cin, cout, hw = 3, 4, 5
    w = jax.random.normal(jax.random.key(0), (3, 3, cin, cout))
    v = jax.random.normal(jax.random.key(1), (hw * hw * cout,))

    def fn(p, x):
        y = jax.lax.conv_general_dilated(x.reshape(-1, hw, hw, cin), p["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (jnp.tanh(y).reshape(x.shape[0], -1) @ p["v"])[:, None]

    params = {"w": w, "v": v}
    x = jax.random.normal(jax.random.key(2), (2, hw * hw * cin))
    found = pergrad.analyse(fn, params, x)
    conv = [layer for layer in found.layers if layer.op == "conv_general_dilated"]
    assert len(found.layers) == found.boundaries == 2 and len(conv) == 1
    assert (conv[0].params, conv[0].positions, conv[0].fan_in, conv[0].fan_out) == (9 * cin * cout, hw * hw,
                                                                                     9 * cin, cout)
    dense = next(layer for layer in found.layers if layer.op == "dot_general")
    assert (dense.params, dense.positions, dense.fan_in, dense.fan_out) == (hw * hw * cout, 1, hw * hw * cout, 1)
    g = found.gram_flops("pntk")
    assert g["jacobian"] == 2.0 * (w.size + v.size) and g["layers"] == 2
    # the gradient form: <dW_a, dW_b> from jax.grad of each example's output
    grads = [jax.grad(lambda p, xi=xi: fn(p, xi[None])[0, 0])(params)["w"] for xi in x]
    direct = float(jnp.vdot(grads[0], grads[1]))
    # the structured form: patches (P, 9 cin) and back-propagated vectors (P, cout) per example
    patches = jax.lax.conv_general_dilated_patches(x.reshape(-1, hw, hw, cin), (3, 3), (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    patches = patches.reshape(2, hw * hw, -1)  # features ordered (cin, kh, kw)
    pre = jax.lax.conv_general_dilated(x.reshape(-1, hw, hw, cin), w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    delta = ((1 - jnp.tanh(pre) ** 2) * v.reshape(hw, hw, cout)).reshape(2, hw * hw, cout)
    structured = float(jnp.sum((patches[0] @ patches[1].T) * (delta[0] @ delta[1].T)))
    np.testing.assert_allclose(structured, direct, rtol=1e-5)
    jac, st = conv[0].flops()
    assert jac == 2.0 * 9 * cin * cout and st == 2.0 * (hw * hw) ** 2 * (9 * cin + cout) + (hw * hw) ** 2
