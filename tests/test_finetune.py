import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tutorial import finetune, kernels
from helpers import reference_entk, rel_err


def _psd(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n + 3))
    return a @ a.T / n


@pytest.mark.parametrize("k", [1, 3])
def test_gcv_matches_the_direct_formula(k):
    rng = np.random.default_rng(0)
    K, y = _psd(30, 1), rng.standard_normal((30, k))
    ridges = np.array([1e-3, 0.1, 2.0])
    got = finetune.gcv(K, y, ridges)
    for lam, g in zip(ridges, got):
        S = K @ np.linalg.inv(K + lam * np.eye(30))
        direct = np.sum(((np.eye(30) - S) @ y) ** 2) / 30 / (1 - np.trace(S) / 30) ** 2
        assert g == pytest.approx(direct, rel=1e-8)


def test_loo_matches_refitting_without_each_point():
    rng = np.random.default_rng(2)
    K, y = _psd(15, 3), rng.standard_normal((15, 2))
    lam = 0.05
    errs = []
    for i in range(15):
        keep = np.arange(15) != i
        pred = finetune.krr_predict(K[np.ix_(keep, keep)], K[i:i + 1, keep], y[keep], lam)
        errs.append(np.sum((pred[0] - y[i]) ** 2))
    assert finetune.loo_cv(K, y, [lam])[0] == pytest.approx(np.mean(errs), rel=1e-8)


def test_krr_predict_equals_a_direct_solve_for_vectors_and_matrices():
    K, Kt = _psd(12, 4), np.random.default_rng(5).standard_normal((3, 12))
    y = np.random.default_rng(6).standard_normal(12)
    direct = Kt @ np.linalg.solve(K + 0.3 * np.eye(12), y)
    np.testing.assert_allclose(finetune.krr_predict(K, Kt, y, 0.3), direct, rtol=1e-9)
    np.testing.assert_allclose(finetune.krr_predict(K, Kt, y[:, None], 0.3)[:, 0], direct, rtol=1e-9)
    assert finetune.krr_predict(K, Kt, y, 0.3).shape == (3,)
    # ridge 0 on a positive-definite kernel interpolates the training targets
    np.testing.assert_allclose(finetune.krr_predict(K, K, y, 0.0), y, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, k\)"):
        finetune.krr_predict(K, Kt, y[:, None, None], 0.3)


def test_gcv_bad_inputs():
    with pytest.raises(ValueError, match="positive ridges"):
        finetune.gcv(np.eye(3), np.ones(3), [0.0])
    with pytest.raises(ValueError, match="square"):
        finetune.gcv(np.ones((3, 2)), np.ones(3), [1.0])
    with pytest.raises(ValueError, match="NaN"):
        finetune.gcv(np.full((2, 2), np.nan), np.ones(2), [1.0])
    with pytest.raises(ValueError, match="rows"):
        finetune.loo_cv(np.eye(3), np.ones(4), [1.0])


def test_backbone_head_is_one_mlp_for_the_kernels():
    apply_fn, params = finetune.mlp_backbone_head(6, 16, 3, key=jax.random.key(0))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (5, 6), dtype=jnp.float64)
    assert apply_fn(params, x).shape == (5, 3) and isinstance(apply_fn, kernels.DenseMLP)
    ref = reference_entk(apply_fn, params, x)
    assert rel_err(kernels.entk(apply_fn, params, x, method="dense"), ref) < 1e-10
    assert rel_err(kernels.pntk(apply_fn, params, x), ref.sum((2, 3)) / 3) < 1e-10
    new_fn, new_params = finetune.with_new_head(apply_fn, params, 4, key=jax.random.key(2))
    assert new_fn(new_params, x).shape == (5, 4)
    np.testing.assert_array_equal(new_fn.backbone_features(new_params["backbone"], x),
                                  apply_fn.backbone_features(params["backbone"], x))
    # a linear head: the penultimate features of the whole are the backbone's features
    np.testing.assert_allclose(apply_fn.features(params, x), apply_fn.backbone_features(params["backbone"], x),
                               rtol=1e-12)
    rich_fn, rich = finetune.with_new_head(apply_fn, params, 4, key=jax.random.key(2), hidden=8)
    assert rich_fn(rich, x).shape == (5, 4)


def test_head_probing_freezes_the_backbone_and_lowers_the_energy():
    apply_fn, params = finetune.mlp_backbone_head(6, 32, 3, key=jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (40, 6))
    y = jnp.asarray(np.arange(40) % 3)
    e0 = finetune.energy(apply_fn, params, x, y)
    probed = finetune.head_probe(apply_fn, params, x, y, epochs=30, lr=0.5)
    assert probed["backbone"] is params["backbone"]
    assert finetune.energy(apply_fn, probed, x, y) < e0
    smoothed = finetune.head_probe(apply_fn, params, x, y, epochs=30, lr=0.5, label_smoothing=0.3)
    assert finetune.energy(apply_fn, smoothed, x, y) > finetune.energy(apply_fn, probed, x, y)
    # energy definition: mean L2 norm of e_y - softmax(f)
    p = jax.nn.softmax(apply_fn(params, x))
    assert e0 == pytest.approx(float(jnp.mean(jnp.linalg.norm(jax.nn.one_hot(y, 3) - p, axis=1))), rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        finetune.smooth_labels(y, 3, 1.0)


def test_feature_change_statistics():
    z0 = np.array([[1.0, 0.0], [0.0, 2.0]])
    z1 = np.array([[1.0, 1.0], [0.0, 4.0]])
    st = finetune.feature_change(z0, z1)
    assert st["distance"] == pytest.approx(1.5)
    assert st["cosine"] == pytest.approx((1 / np.sqrt(2) + 1) / 2)
    assert st["inner"] == pytest.approx((1 + 8) / 2)
    assert st["norm"] == pytest.approx((np.sqrt(2) + 4) / 2)
    with pytest.raises(ValueError, match="equal shape"):
        finetune.feature_change(z0, z1[:1])
