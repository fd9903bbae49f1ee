import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntk_tutorial import kernels, models
from helpers import mlp, reference_entk, rel_err

X1 = jax.random.normal(jax.random.key(1), (6, 5), dtype=jnp.float64)
X2 = jax.random.normal(jax.random.key(2), (4, 5), dtype=jnp.float64)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.lists(st.integers(1, 24), min_size=0, max_size=3),
    k=st.integers(1, 5),
    activation=st.sampled_from(["relu", "erf", "tanh", "gelu"]),
    parameterization=st.sampled_from(["ntk", "standard"]),
    seed=st.integers(0, 2**16),
)
def test_entk_and_pntk_match_jacrev_reference_on_random_mlps(hidden, k, activation,
                                                            parameterization, seed):
    apply_fn, params = mlp((5, *hidden, k), seed=seed, activation=activation,
                           parameterization=parameterization)
    ref = reference_entk(apply_fn, params, X1, X2)
    for method in ("dense", "jacobian"):
        theta = kernels.entk(apply_fn, params, X1, X2, method=method)
        assert theta.shape == (6, 4, k, k)
        assert rel_err(theta, ref) < 1e-10
    assert rel_err(kernels.pntk(apply_fn, params, X1, X2), ref.sum(axis=(2, 3)) / k) < 1e-10


@pytest.mark.parametrize("method", ["dense", "jacobian"])
@pytest.mark.parametrize("activation,parameterization", [("relu", "ntk"), ("erf", "standard")])
def test_scalar_kernels_match_jacrev_reference(method, activation, parameterization):
    k = 4
    apply_fn, params = mlp((5, 12, 9, k), seed=3, activation=activation,
                           parameterization=parameterization)
    ref = reference_entk(apply_fn, params, X1, X2)
    assert rel_err(kernels.pntk(apply_fn, params, X1, X2, method=method),
                   ref.sum(axis=(2, 3)) / k) < 1e-10
    assert rel_err(kernels.trace_ntk(apply_fn, params, X1, X2, method=method),
                   jnp.trace(ref, axis1=2, axis2=3) / k) < 1e-10
    assert rel_err(kernels.single_logit_ntk(apply_fn, params, X1, X2, method=method),
                   ref[:, :, 0, 0]) < 1e-10


def test_dense_fast_path_matches_generic_in_float32():
    apply_fn, params = mlp((20, 64, 64, 7), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(3), (30, 20), dtype=jnp.float32)
    for fn in (kernels.entk, kernels.pntk, kernels.trace_ntk, kernels.single_logit_ntk):
        fast = fn(apply_fn, params, x, method="dense")
        slow = fn(apply_fn, params, x, method="jacobian")
        assert fast.dtype == jnp.float32
        assert rel_err(fast, slow) < 1e-5, fn.__name__


def test_auto_chooses_dense_for_mlp_and_jacobian_otherwise():
    apply_fn, _ = mlp((5, 8, 3))
    assert kernels._choose_method(apply_fn, "auto") == "dense"
    assert kernels._choose_method(lambda p, x: x, "auto") == "jacobian"
    with pytest.raises(ValueError, match="dense layers"):
        kernels.entk(lambda p, x: x @ p, jnp.ones((5, 3)), X1, method="dense")


def test_cnn_and_handwritten_function_use_generic_path():
    cnn = models.CNN((4, 4, 2), num_classes=3, channels=4, depth=1, rngs=nnx.Rngs(0))
    apply_fn, params = models.functional(cnn)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(4), (5, 32), dtype=jnp.float64)
    assert rel_err(kernels.entk(apply_fn, params, x), reference_entk(apply_fn, params, x)) < 1e-10

    def hand(p, x):  # a two-layer tanh net with dict parameters
        return jnp.tanh(x @ p["a"]) @ p["b"]

    p = {"a": jax.random.normal(jax.random.key(5), (5, 9)), "b": jax.random.normal(jax.random.key(6), (9, 2))}
    assert rel_err(kernels.pntk(hand, p, X1, X2), reference_entk(hand, p, X1, X2).sum((2, 3)) / 2) < 1e-10


@pytest.mark.parametrize("method", ["dense", "jacobian"])
@pytest.mark.parametrize("batch_size", [1, 2, 5, 100])
def test_block_size_does_not_change_the_result(method, batch_size):
    apply_fn, params = mlp((5, 16, 16, 3))
    x = jax.random.normal(jax.random.key(7), (11, 5), dtype=jnp.float64)
    full = kernels.entk(apply_fn, params, x, method=method)
    blocked = kernels.entk(apply_fn, params, x, batch_size=batch_size, method=method)
    np.testing.assert_allclose(blocked, full, rtol=1e-12, atol=1e-12)
    cross = kernels.pntk(apply_fn, params, x, X2, batch_size=batch_size, method=method)
    np.testing.assert_allclose(cross, kernels.pntk(apply_fn, params, x, X2), rtol=1e-12, atol=1e-12)


def test_symmetric_and_positive_semidefinite():
    apply_fn, params = mlp((5, 32, 32, 4))
    x = jax.random.normal(jax.random.key(8), (9, 5), dtype=jnp.float64)
    m = kernels.as_matrix(kernels.entk(apply_fn, params, x))
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    eig = np.linalg.eigvalsh(np.asarray(m))
    assert eig.min() > -1e-10 * eig.max()
    for fn in (kernels.pntk, kernels.trace_ntk, kernels.single_logit_ntk):
        km = np.asarray(fn(apply_fn, params, x))
        np.testing.assert_allclose(km, km.T, atol=1e-12)
        assert np.linalg.eigvalsh(km).min() > -1e-10 * np.abs(km).max()


def test_as_matrix_layout():
    theta = jnp.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    m = kernels.as_matrix(theta)
    assert m.shape == (4, 6)
    assert m[1 * 2 + 1, 2 * 2 + 0] == theta[1, 2, 1, 0]


# --- infinite width -------------------------------------------------------------------------


def _mc_average(activation, depth, width, seeds, w_std, b_std, x1, x2):
    ntks, outs1, outs2 = [], [], []
    for s in range(seeds):
        apply_fn, params = mlp((x1.shape[1],) + (width,) * depth + (8,), seed=s, activation=activation,
                               w_std=w_std, b_std=b_std)
        ntks.append(kernels.trace_ntk(apply_fn, params, x1, x2))
        outs1.append(apply_fn(params, x1))
        outs2.append(apply_fn(params, x2))
    o1, o2 = jnp.stack(outs1), jnp.stack(outs2)  # (seeds, n, k)
    nngp = jnp.einsum("sak,sbk->ab", o1, o2) / (o1.shape[0] * o1.shape[2])
    return jnp.mean(jnp.stack(ntks), 0), nngp


@pytest.mark.parametrize("activation,depth,w_std,b_std", [("relu", 2, math.sqrt(2), 0.1),
                                                          ("erf", 1, 1.3, 0.2),
                                                          ("relu", 3, 1.2, 0.0)])
def test_infinite_kernels_match_monte_carlo_of_wide_networks(activation, depth, w_std, b_std):
    x1, x2 = X1[:4], X2[:3]
    mc_ntk, mc_nngp = _mc_average(activation, depth, 1024, 40, w_std, b_std, x1, x2)
    ntk = kernels.infinite_ntk(x1, x2, depth=depth, activation=activation, w_std=w_std, b_std=b_std)
    nngp = kernels.infinite_nngp(x1, x2, depth=depth, activation=activation, w_std=w_std, b_std=b_std)
    assert ntk.shape == (4, 3)
    assert rel_err(mc_ntk, ntk) < 0.03
    assert rel_err(mc_nngp, nngp) < 0.15  # 320 output samples: Monte-Carlo error ~ 1/sqrt(320)


def test_infinite_kernel_error_shrinks_with_width():
    x = X1[:4]
    exact = kernels.infinite_ntk(x, depth=2)
    errs = []
    for width in (32, 512):
        apply_fn, params = mlp((5, width, width, 1), seed=11)
        errs.append(rel_err(kernels.trace_ntk(apply_fn, params, x), exact))
    assert errs[1] < errs[0] / 2


def test_infinite_depth_zero_is_the_linear_kernel():
    k = kernels.infinite_ntk(X1, X2, depth=0, w_std=2.0, b_std=0.5)
    np.testing.assert_allclose(k, 4.0 * X1 @ X2.T / 5 + 0.25, rtol=1e-12)


def test_infinite_kernel_bad_inputs():
    with pytest.raises(ValueError, match="implemented for"):
        kernels.infinite_ntk(X1, depth=1, activation="tanh")
    with pytest.raises(ValueError, match="depth"):
        kernels.infinite_nngp(X1, depth=-1)


# --- memory and bad inputs -------------------------------------------------------------------


def test_kernel_nbytes_matches_the_cifar10_numbers():
    assert kernels.kernel_nbytes(50_000, 50_000, 10, "entk", 8) / 2**40 == pytest.approx(1.819, abs=1e-3)
    assert kernels.kernel_nbytes(50_000, 50_000, 10, "pntk", 8) / 2**30 == pytest.approx(18.63, abs=1e-2)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        kernels.kernel_nbytes(1, 1, 1, "full")


def test_too_large_kernel_raises_with_size_and_advice(monkeypatch):
    apply_fn, params = mlp((5, 8, 10))
    monkeypatch.setenv(kernels.MEMORY_ENV, str(6 * 4 * 10 * 10 * 8))  # entk would need 19 200 B
    with pytest.raises(kernels.KernelTooLargeError, match=r"pNTK .* needs only") as err:
        kernels.entk(apply_fn, params, X1, X2)
    assert "GiB" in str(err.value) and "NTK_TUTORIAL_MAX_BYTES" in str(err.value)
    assert kernels.pntk(apply_fn, params, X1, X2).shape == (6, 4)  # 192 B fits


def test_shape_mismatch_and_nan_inputs():
    apply_fn, params = mlp((5, 8, 3))
    with pytest.raises(ValueError, match="same per-example shape"):
        kernels.entk(apply_fn, params, X1, X2[:, :4])
    with pytest.raises(ValueError, match="leading example axis"):
        kernels.pntk(apply_fn, params, X1[0])
    bad = X1.at[2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match="x1 contains 1 NaN"):
        kernels.pntk(apply_fn, params, bad)
    with pytest.raises(ValueError, match="x2 contains"):
        kernels.entk(apply_fn, params, X1, X2.at[0, 0].set(jnp.inf))
    nan_params = jax.tree.map(lambda a: a * jnp.nan, params)
    with pytest.raises(ValueError, match="parameters contain NaN"):
        kernels.pntk(apply_fn, nan_params, X1)
    with pytest.raises(ValueError, match="batch_size"):
        kernels.pntk(apply_fn, params, X1, batch_size=0)
    with pytest.raises(ValueError, match=r"\(n, k\) logits"):
        kernels.pntk(lambda p, x: x.sum(1), params, X1)


def test_jacobian_budget_sets_the_block_size_not_the_result(monkeypatch):
    from ntk_tutorial.models import CNN, functional

    apply_fn, params = functional(CNN((6, 6, 1), 3, channels=4, rngs=nnx.Rngs(params=jax.random.key(0))))
    x = jax.random.normal(jax.random.key(1), (10, 36))
    whole = kernels.pntk(apply_fn, params, x)
    n_params = sum(int(v.size) for v in jax.tree.leaves(params))
    # room for the Jacobians of 3 examples (pNTK: one gradient each, twice for the two sides)
    monkeypatch.setenv(kernels.JACOBIAN_ENV, str(3 * n_params * x.dtype.itemsize * 2))
    assert kernels._auto_batch_size(apply_fn, params, x, "pntk", "jacobian") == 3
    np.testing.assert_allclose(kernels.pntk(apply_fn, params, x), whole, rtol=1e-6, atol=1e-8)
    monkeypatch.setenv(kernels.JACOBIAN_ENV, "lots")
    with pytest.raises(ValueError, match="NTK_TUTORIAL_JACOBIAN_BYTES"):
        kernels.pntk(apply_fn, params, x)


def _blocked_cnn_case(monkeypatch, tmp_path):
    """A small CNN on 23 points (and 9 others), its pNTK and eNTK from vmap(grad) as the
    reference, and a Jacobian budget that cuts the eNTK into blocks of 5 (scratch in tmp_path)."""
    from ntk_tutorial.models import CNN, functional

    apply_fn, params = functional(CNN((6, 6, 1), 3, channels=4, rngs=nnx.Rngs(params=jax.random.key(0))))
    x = jax.random.normal(jax.random.key(1), (23, 36))
    y = x[:9] + 0.5
    monkeypatch.setattr(kernels, "GRADIENTS", "vmap")
    want = {kind: np.asarray(getattr(kernels, kind)(apply_fn, params, x)) for kind in ("pntk", "entk")}
    want_xy = np.asarray(kernels.entk(apply_fn, params, x, y))
    monkeypatch.setattr(kernels, "GRADIENTS", "auto")
    n_params = sum(int(v.size) for v in jax.tree.leaves(params))
    s = np.dtype(x.dtype).itemsize
    monkeypatch.setenv(kernels.JACOBIAN_ENV, str(2 * 5 * 3 * n_params * s))  # eNTK blocks of 5
    monkeypatch.setenv(kernels.SCRATCH_ENV, str(tmp_path))
    return apply_fn, params, x, y, want, want_xy, n_params, s


def test_the_stream_route_computes_each_gradient_once_and_equals_the_features_route(monkeypatch, tmp_path):
    """Jacobians larger than the budget are computed once each, written to a scratch file and
    streamed against a resident block (issue 17): the kernel is the one of the features route
    (and of vmap(grad)), and the gradient evaluations are one per point, however many blocks."""
    apply_fn, params, x, y, want, want_xy, n_params, s = _blocked_cnn_case(monkeypatch, tmp_path)
    plan = kernels.plan_kernel("entk", apply_fn, params, x)
    assert (plan.route, plan.batch_size, plan.block_pairs, plan.gradients) == ("stream", 5, 15, "structured")
    assert plan.evaluations_per_point == 1.0 and plan.scratch_bytes == 23 * 3 * n_params * s
    assert "1.00 per point" in str(plan) and plan.seconds() > 0
    # the per-layer FLOP rule is reported (what structured forms would save), never above the products
    assert plan.layers >= 2 and 0 < plan.rule_gram_flops <= plan.gram_flops and "per-layer rule" in str(plan)
    for kind in ("pntk", "entk"):
        before = kernels.gradient_evaluations()
        got = np.asarray(getattr(kernels, kind)(apply_fn, params, x))
        assert kernels.gradient_evaluations() - before == 23
        np.testing.assert_allclose(got, want[kind], rtol=2e-5, atol=1e-6)
    before = kernels.gradient_evaluations()
    np.testing.assert_allclose(np.asarray(kernels.entk(apply_fn, params, x, y)), want_xy, rtol=2e-5, atol=1e-6)
    assert kernels.gradient_evaluations() - before == 23 + 9
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone
    monkeypatch.setenv(kernels.SCRATCH_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="NTK_TUTORIAL_SCRATCH"):
        kernels.entk(apply_fn, params, x)


def test_without_room_for_the_scratch_file_the_blocks_are_recomputed(monkeypatch, tmp_path):
    """When the stream route's scratch file would not fit (here: $NTK_TUTORIAL_SCRATCH_BYTES), the
    plan says "recompute": each resident block's partner blocks are computed again, the kernel is
    still the vmap(grad) one, and the gradient evaluations are the ones the plan states (23 points
    in blocks of 5: 23 + 18 + 13 + 8 + 3 symmetric; 23 + 5 x 9 against 9 other points)."""
    apply_fn, params, x, y, want, want_xy, n_params, s = _blocked_cnn_case(monkeypatch, tmp_path)
    monkeypatch.setenv(kernels.SCRATCH_BYTES_ENV, str(9 * 3 * n_params * s - 1))  # room for neither file
    plan = kernels.plan_kernel("entk", apply_fn, params, x)
    assert (plan.route, plan.batch_size, plan.scratch_bytes) == ("recompute", 5, 0)
    assert plan.gradient_evaluations == 23 + 18 + 13 + 8 + 3
    assert kernels.plan_kernel("entk", apply_fn, params, x, y).gradient_evaluations == 23 + 5 * 9
    for kind in ("pntk", "entk"):
        before = kernels.gradient_evaluations()
        got = np.asarray(getattr(kernels, kind)(apply_fn, params, x))
        assert kernels.gradient_evaluations() - before == kernels.plan_kernel(kind, apply_fn, params, x).gradient_evaluations
        np.testing.assert_allclose(got, want[kind], rtol=2e-5, atol=1e-6)
    before = kernels.gradient_evaluations()
    np.testing.assert_allclose(np.asarray(kernels.entk(apply_fn, params, x, y)), want_xy, rtol=2e-5, atol=1e-6)
    assert kernels.gradient_evaluations() - before == 23 + 5 * 9
    assert list(tmp_path.iterdir()) == []  # nothing was written
    monkeypatch.setenv(kernels.SCRATCH_BYTES_ENV, str(23 * 3 * n_params * s))  # exactly room: stream
    assert kernels.plan_kernel("entk", apply_fn, params, x).route == "stream"
    monkeypatch.setenv(kernels.SCRATCH_BYTES_ENV, "plenty")
    with pytest.raises(ValueError, match="NTK_TUTORIAL_SCRATCH_BYTES"):
        kernels.entk(apply_fn, params, x)


@pytest.mark.parametrize("kind", ["entk", "pntk", "trace"])
def test_every_product_of_the_dense_route_asks_for_full_float32_precision(kind):
    """On an accelerator a float32 product without a precision may run in TF32 (10-bit
    mantissa); every dot of the dense route (forward pass, back-propagated vectors, Gram
    matrices) says HIGHEST, so the kernel is float32 on any device."""
    apply_fn, params = mlp((5, 8, 7, 3))
    x = jnp.ones((4, 5))
    jaxpr = jax.make_jaxpr(kernels._dense_block_fn(apply_fn, kind))(params, x, x)

    def eqns(j):  # every equation, inside nested jitted calls too
        for e in j.eqns:
            yield e
            for v in e.params.values():
                inner = getattr(v, "jaxpr", None)
                if inner is not None:
                    yield from eqns(getattr(inner, "jaxpr", inner) if not hasattr(inner, "eqns") else inner)

    found = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(found) >= 6
    for e in found:
        assert e.params["precision"] is not None and all(
            p == jax.lax.Precision.HIGHEST for p in e.params["precision"]), e
