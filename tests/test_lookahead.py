"""ntk_tutorial.lookahead against an independent reference: a direct solve on L+ in NumPy.

Kernels are random Gram matrices of random features (positive semi-definite by construction),
full eNTK-shaped ``(n, n, k, k)`` or scalar ``(n, n)``; everything runs in float64 (conftest.py)
and must agree with ``numpy.linalg.solve`` on the assembled ``L+`` system to 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntk_tutorial import kernels, lookahead
from helpers import mlp, rel_err

TOL = 1e-6
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# an independent reference (NumPy only)
# ---------------------------------------------------------------------------------------------


class Problem:
    """Random features G on n_all points -> kernel, outputs f, labels y; index sets L, U, T."""

    def __init__(self, seed, n, m, t, k, scalar, extra_features=4, ridge=0.0):
        rng = np.random.default_rng(seed)
        self.n, self.m, self.t, self.k, self.scalar, self.ridge = n, m, t, k, scalar, ridge
        n_all = n + m + t
        dim = (n + m) * (1 if scalar else k) + extra_features  # full rank on L u U
        if scalar:
            g = rng.standard_normal((n_all, dim)) / np.sqrt(dim)
            self.kernel = g @ g.T
        else:
            g = rng.standard_normal((n_all, k, dim)) / np.sqrt(dim)
            self.kernel = np.einsum("aip,bjp->abij", g, g)
        self.f = rng.standard_normal((n_all, k))
        self.y_all = np.eye(k)[rng.integers(0, k, n_all)]
        self.L = np.arange(n)
        self.U = np.arange(n, n + m)
        self.T = np.arange(n + m, n_all)

    def block(self, a, b):
        return self.kernel[np.ix_(a, b)]

    def matrix(self, a, b):
        """Matrix form of the kernel between index sets a and b, independent of the package."""
        kab = self.block(a, b)
        if self.scalar:
            return kab
        return np.concatenate([np.concatenate(list(row), axis=1) for row in kab], axis=0)

    def direct(self, train, y_train, test):
        """f(test) + K(test, train) (K(train, train) + ridge I)^{-1} (y - f(train)), by np.linalg.solve."""
        a = self.matrix(train, train) + self.ridge * np.eye(self.matrix(train, train).shape[0])
        r = y_train - self.f[train]
        if self.scalar:
            return self.f[test] + self.matrix(test, train) @ np.linalg.solve(a, r)
        return self.f[test] + (self.matrix(test, train) @ np.linalg.solve(a, r.reshape(-1))).reshape(-1, self.k)

    def proxy(self):
        return lookahead.fit_proxy(self.block(self.L, self.L), self.y_all[self.L], self.f[self.L],
                                   ridge=self.ridge)


problems = st.builds(
    Problem,
    seed=st.integers(0, 2**31),
    n=st.integers(1, 9),
    m=st.integers(1, 7),
    t=st.integers(1, 5),
    k=st.integers(1, 4),
    scalar=st.booleans(),
    ridge=st.sampled_from([0.0, 0.0, 1e-3, 0.5]),
)


# ---------------------------------------------------------------------------------------------
# agreement with the direct solve
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(p=problems)
def test_kernel_regression_matches_direct_solve(p):
    pred, info = lookahead.kernel_regression(
        p.block(p.L, p.L), p.y_all[p.L], p.block(p.T, p.L), f_train=p.f[p.L], f_test=p.f[p.T],
        ridge=p.ridge, return_info=True)
    assert pred.shape == (p.t, p.k) and pred.dtype == jnp.float64
    assert info.jitter == 0.0 and info.size == p.n * (1 if p.scalar else p.k)
    assert rel_err(pred, p.direct(p.L, p.y_all[p.L], p.T)) < TOL


@SETTINGS
@given(p=problems, which=st.integers(0, 100))
def test_eq11_and_eq12_match_direct_solve_on_L_plus(p, which):
    j = p.U[which % p.m]
    plus = np.append(p.L, j)
    ref = p.direct(plus, p.y_all[plus], p.T)
    eq11 = lookahead.lookahead_predictions(
        p.block(p.L, p.L), p.y_all[p.L], p.kernel[j, p.L], p.kernel[j, j], p.y_all[j],
        p.block(p.T, p.L), p.kernel[p.T, j], f_train=p.f[p.L], f_cand=p.f[j], f_test=p.f[p.T],
        ridge=p.ridge)
    eq12 = lookahead.schur_update(
        p.proxy(), p.kernel[j, p.L], p.kernel[j, j], p.y_all[j], p.block(p.T, p.L),
        p.kernel[p.T, j], f_cand=p.f[j], f_test=p.f[p.T])
    assert rel_err(eq11, ref) < TOL
    assert rel_err(eq12, ref) < TOL


@SETTINGS
@given(p=problems, c=st.integers(1, 3))
def test_adding_a_set_of_candidates_matches_direct_solve(p, c):
    cand = p.U[: min(c, p.m)]
    plus = np.concatenate([p.L, cand])
    ref = p.direct(plus, p.y_all[plus], p.T)
    args = (p.block(cand, p.L), p.block(cand, cand), p.y_all[cand])
    eq11 = lookahead.lookahead_predictions(
        p.block(p.L, p.L), p.y_all[p.L], *args, p.block(p.T, p.L), p.block(p.T, cand),
        f_train=p.f[p.L], f_cand=p.f[cand], f_test=p.f[p.T], ridge=p.ridge)
    eq12 = lookahead.schur_update(p.proxy(), *args, p.block(p.T, p.L), p.block(p.T, cand),
                                  f_cand=p.f[cand], f_test=p.f[p.T])
    assert rel_err(eq11, ref) < TOL and rel_err(eq12, ref) < TOL


@SETTINGS
@given(p=problems, relative_to=st.sampled_from(["proxy", "network"]), block=st.integers(1, 4),
       callable_columns=st.booleans())
def test_posterior_change_matches_direct_solve_for_every_candidate(p, relative_to, block,
                                                                   callable_columns):
    labels = p.y_all[p.U]
    base = p.direct(p.L, p.y_all[p.L], p.U) if relative_to == "proxy" else p.f[p.U]
    ref = np.stack([
        p.direct(np.append(p.L, j), np.vstack([p.y_all[p.L], labels[i]]), p.U) - base
        for i, j in enumerate(p.U)
    ])
    k_uu = p.block(p.U, p.U)
    columns = (lambda idx: k_uu[:, idx]) if callable_columns else k_uu
    got = lookahead.posterior_change(p.proxy(), p.block(p.U, p.L), columns, p.f[p.U], labels,
                                     relative_to=relative_to, block_size=block)
    assert got.shape == (p.m, p.m, p.k)
    assert rel_err(got, ref) < TOL
    # reductions, computed blockwise, equal the reductions of the full array
    l2 = lookahead.posterior_change(p.proxy(), p.block(p.U, p.L), columns, p.f[p.U], labels,
                                    relative_to=relative_to, reduce="l2", block_size=block)
    np.testing.assert_allclose(l2, np.linalg.norm(ref, axis=-1).sum(-1), rtol=TOL, atol=1e-12)
    # a subset of candidates, in any order
    sub = np.arange(p.m)[::-1][: max(1, p.m // 2)]
    got_sub = lookahead.posterior_change(p.proxy(), p.block(p.U, p.L), columns, p.f[p.U],
                                         labels[sub], candidates=sub, relative_to=relative_to,
                                         block_size=block)
    assert rel_err(got_sub, ref[sub]) < TOL


def test_label_flips_counts_changed_argmax():
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4]])
    change = np.array([[[0.0, 0.0], [0.0, 0.0], [-0.3, 0.3]],  # third point flips
                       [[-2.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])  # first two flip
    np.testing.assert_array_equal(lookahead.label_flips(change, reference), [1, 2])
    np.testing.assert_allclose(lookahead.total_l2_change(change), [0.3 * np.sqrt(2), 4.0])
    np.testing.assert_array_equal(lookahead.pseudo_labels(reference), [[1, 0], [0, 1], [1, 0]])


@SETTINGS
@given(p=problems, relative_to=st.sampled_from(["proxy", "network"]))
def test_flip_reduction_matches_full_changes(p, relative_to):
    labels = p.y_all[p.U]
    full = lookahead.posterior_change(p.proxy(), p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U],
                                      labels, relative_to=relative_to)
    reference = p.direct(p.L, p.y_all[p.L], p.U) if relative_to == "proxy" else p.f[p.U]
    flips = lookahead.posterior_change(p.proxy(), p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U],
                                       labels, relative_to=relative_to, reduce="flips", block_size=2)
    np.testing.assert_array_equal(flips, lookahead.label_flips(full, reference))


@SETTINGS
@given(p=problems)
def test_sequential_updates_match_fitting_from_scratch(p):
    """Add the pool points one at a time (and then two at once): same as a fit on L u added."""
    proxy = p.proxy()
    added = p.L
    for j in p.U:
        proxy = lookahead.sequential_update(proxy, p.kernel[j, added], p.kernel[j, j], p.y_all[j],
                                            p.f[j])
        added = np.append(added, j)
        assert rel_err(proxy.predict(p.block(p.T, added), p.f[p.T]),
                       p.direct(added, p.y_all[added], p.T)) < TOL
    fresh = lookahead.fit_proxy(p.block(added, added), p.y_all[added], p.f[added], ridge=p.ridge)
    assert rel_err(proxy.alpha, fresh.alpha) < TOL
    assert proxy.jitter == 0.0
    # a set of two points at once
    two = lookahead.sequential_update(p.proxy(), p.block(p.U[:2], p.L), p.block(p.U[:2], p.U[:2]),
                                      p.y_all[p.U[:2]], p.f[p.U[:2]])
    both = np.concatenate([p.L, p.U[:2]])
    assert rel_err(two.predict(p.block(p.T, both), p.f[p.T]), p.direct(both, p.y_all[both], p.T)) < TOL


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(1, 8), k=st.integers(1, 4))
def test_scalar_kernel_equals_full_kernel_times_identity(seed, n, k):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n + 3, n + 5))
    kern = g @ g.T / (n + 5)
    y, f = rng.standard_normal((n, k)), rng.standard_normal((n + 3, k))
    full = kern[:, :, None, None] * np.eye(k)
    a = lookahead.kernel_regression(kern[:n, :n], y, kern[n:, :n], f_train=f[:n], f_test=f[n:])
    b = lookahead.kernel_regression(full[:n, :n], y, full[n:, :n], f_train=f[:n], f_test=f[n:])
    assert rel_err(a, b) < TOL


# ---------------------------------------------------------------------------------------------
# a real network: the proxy is the linearised network trained to convergence
# ---------------------------------------------------------------------------------------------


def test_proxy_is_the_linearised_network_trained_to_convergence():
    apply_fn, params = mlp((4, 24, 3), seed=3)
    x = jax.random.normal(jax.random.key(1), (6, 4))  # 5 labelled points + 1 candidate
    x_test = jax.random.normal(jax.random.key(2), (4, 4))
    y = jax.nn.one_hot(jnp.array([0, 1, 2, 1, 0, 2]), 3)
    f_lin = lambda p, xs: apply_fn(params, xs) + jax.jvp(  # noqa: E731
        lambda q: apply_fn(q, xs), (params,), (jax.tree.map(lambda a, b: a - b, p, params),))[1]
    loss = lambda p: 0.5 * jnp.sum((f_lin(p, x) - y) ** 2)  # noqa: E731
    theta = kernels.entk(apply_fn, params, jnp.concatenate([x, x_test]))
    lr = 1.0 / float(np.linalg.eigvalsh(kernels.as_matrix(theta[:6, :6]))[-1])

    @jax.jit
    def run(p):
        return jax.lax.fori_loop(0, 20_000, lambda _, q: jax.tree.map(
            lambda a, g: a - lr * g, q, jax.grad(loss)(q)), p)

    trained = run(params)
    assert float(loss(trained)) < 1e-20
    proxy = lookahead.lookahead_predictions(
        theta[:5, :5], y[:5], theta[5, :5], theta[5, 5], y[5], theta[6:, :5], theta[6:, 5],
        f_train=apply_fn(params, x[:5]), f_cand=apply_fn(params, x[5:])[0],
        f_test=apply_fn(params, x_test))
    assert rel_err(proxy, f_lin(trained, x_test)) < TOL


# ---------------------------------------------------------------------------------------------
# jitter and errors
# ---------------------------------------------------------------------------------------------


def test_singular_kernel_gets_the_smallest_jitter_that_works_and_reports_it():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((8, 3))  # rank 3 < 8: positive semi-definite, singular
    kern = g @ g.T
    top = np.linalg.eigvalsh(kern[:6, :6])[-1]
    kern[np.diag_indices(8)] -= 1e-9 * top  # slightly indefinite, as round-off makes kernels
    y = rng.standard_normal((6, 2))
    pred, info = lookahead.kernel_regression(kern[:6, :6], y, kern[6:, :6], return_info=True)
    assert 1e-9 * top <= info.jitter <= 2e-9 * top  # 1.1 max(-lambda_min, ...): just enough
    ref = kern[6:, :6] @ np.linalg.solve(kern[:6, :6] + info.jitter * np.eye(6), y)
    assert rel_err(pred, ref) < 1e-5  # the jittered system has condition number ~1e9
    # a duplicated labelled point in sequential_update refactorises with a jitter
    proxy = lookahead.fit_proxy(np.eye(3), y[:3])
    dup = lookahead.sequential_update(proxy, np.eye(3)[0], 1.0, y[0])
    assert dup.jitter > 0 and np.all(np.isfinite(dup.alpha))


def test_errors_say_what_is_wrong():
    kern, y = np.eye(3), np.zeros((3, 2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        lookahead.kernel_regression(np.where(np.eye(3) > 0, np.nan, 0.0), y, np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        lookahead.kernel_regression(kern, y, np.ones((1, 3)), f_test=np.full((1, 2), np.inf))
    with pytest.raises(ValueError, match=r"k_train must be \(n, n\)"):
        lookahead.kernel_regression(np.ones((3, 4)), y, np.ones((1, 3)))
    with pytest.raises(ValueError, match="y_train must have shape"):
        lookahead.kernel_regression(kern, np.zeros(3), np.ones((1, 3)))
    with pytest.raises(ValueError, match="k_test_train must have shape"):
        lookahead.kernel_regression(kern, y, np.ones((1, 4)))
    with pytest.raises(ValueError, match="indefinite"):
        lookahead.kernel_regression(np.diag([1.0, -1.0, 1.0]), y, np.ones((1, 3)))
    with pytest.raises(ValueError, match="not symmetric"):
        lookahead.kernel_regression(np.triu(np.ones((3, 3))), y, np.ones((1, 3)))
    with pytest.raises(ValueError, match="ridge"):
        lookahead.kernel_regression(kern, y, np.ones((1, 3)), ridge=-1.0)
    proxy = lookahead.fit_proxy(kern, y)
    with pytest.raises(ValueError, match="relative_to"):
        lookahead.posterior_change(proxy, np.ones((2, 3)), np.eye(2), np.zeros((2, 2)),
                                   np.zeros((2, 2)), relative_to="net")
    with pytest.raises(ValueError, match="y_candidates must be"):
        lookahead.posterior_change(proxy, np.ones((2, 3)), np.eye(2), np.zeros((2, 2)),
                                   np.zeros((1, 2)))
    with pytest.raises(ValueError, match="candidates must be indices"):
        lookahead.posterior_change(proxy, np.ones((2, 3)), np.eye(2), np.zeros((2, 2)),
                                   np.zeros((1, 2)), candidates=[5])
    with pytest.raises(ValueError, match="reduce must be"):
        lookahead.posterior_change(proxy, np.ones((2, 3)), np.eye(2), np.zeros((2, 2)),
                                   np.zeros((2, 2)), reduce="max")


# ---------------------------------------------------------------------------------------------
# the pool posterior (sequential querying): conditioning equals refitting on L u J
# ---------------------------------------------------------------------------------------------


def _naive_after(p, train, y_train, pool):
    """The proxy refitted on ``train`` by a direct solve, predicted on ``pool``."""
    return p.direct(train, y_train, pool)


@SETTINGS
@given(p=problems, data=st.data())
def test_condition_equals_refit(p, data):
    post = lookahead.pool_posterior(p.proxy(), p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U])
    assert rel_err(post.mean, p.direct(p.L, p.y_all[p.L], p.U)) < TOL
    picks = data.draw(st.lists(st.integers(0, p.m - 1), min_size=1, max_size=p.m, unique=True))
    y_new = p.y_all[p.U[picks]]
    for i, j in enumerate(picks):  # one at a time, as sequential querying
        post = lookahead.condition(post, [j], y_new[i:i + 1])
    train = np.concatenate([p.L, p.U[picks]])
    y_train = np.concatenate([p.y_all[p.L], y_new])
    assert rel_err(post.mean, p.direct(train, y_train, p.U)) < TOL
    # the covariance is the prior minus the explained part, from an independent solve
    k_uu, k_ut, k_tt = p.matrix(p.U, p.U), p.matrix(p.U, train), p.matrix(train, train)
    want = k_uu - k_ut @ np.linalg.solve(k_tt + p.ridge * np.eye(len(k_tt)), k_ut.T)
    assert np.linalg.norm(post.cov - want) <= 1e-6 * np.linalg.norm(k_uu)


@SETTINGS
@given(p=problems, relative=st.sampled_from(["proxy", "network"]), reduce=st.sampled_from([None, "l2", "flips"]))
def test_covariance_change_equals_direct(p, relative, reduce):
    """Every candidate's change (and its L2 / flip reduction) read off the pool posterior equals
    a fresh direct solve of Eq. (11) on L + {(x', y')} per candidate."""
    proxy = p.proxy()
    post = lookahead.pool_posterior(proxy, p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U])
    reference = post.mean if relative == "proxy" else p.f[p.U]
    y_c = p.y_all[p.U]
    got = lookahead.covariance_change(post, y_c, reference=reference, reduce=reduce)
    same = lookahead.posterior_change(proxy, p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U], y_c,
                                      relative_to=relative, reduce=reduce)
    direct = np.stack([p.direct(np.concatenate([p.L, [p.U[c]]]), np.concatenate([p.y_all[p.L], y_c[c:c + 1]]), p.U)
                       - reference for c in range(p.m)])
    if reduce is None:
        assert rel_err(got, direct) < TOL and rel_err(same, direct) < TOL
    elif reduce == "l2":
        want = np.linalg.norm(direct, axis=-1).sum(-1)
        assert rel_err(got, want) < TOL and rel_err(same, want) < TOL
    else:  # flips: compare where no pool point sits within round-off of an arg-max tie
        after = direct + reference
        top2 = np.sort(after, axis=-1)[..., -2:]
        if after.shape[-1] < 2:  # one output: its arg-max never flips
            assert not np.any(got) and not np.any(same)
            return
        clear = np.all(top2[..., 1] - top2[..., 0] > 1e-8, axis=-1)
        want = np.sum(np.argmax(after, -1) != np.argmax(reference, -1)[None], axis=-1)
        assert np.array_equal(got[clear], want[clear]) and np.array_equal(same[clear], want[clear])


def test_fused_flips_and_l2_match_the_formed_changes():
    """The fused scalar-kernel reductions equal the reductions of the (c, m, k) changes."""
    p = Problem(3, n=12, m=40, t=1, k=5, scalar=True)
    proxy = p.proxy()
    args = (proxy, p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U], p.y_all[p.U])
    for relative in ("proxy", "network"):
        change = lookahead.posterior_change(*args, relative_to=relative)
        reference = p.f[p.U] if relative == "network" else proxy.predict(p.block(p.U, p.L), p.f[p.U])
        flips = lookahead.posterior_change(*args, relative_to=relative, reduce="flips")
        l2 = lookahead.posterior_change(*args, relative_to=relative, reduce="l2")
        assert np.array_equal(flips, lookahead.label_flips(change, reference))
        assert rel_err(l2, np.linalg.norm(change, axis=-1).sum(-1)) < 1e-12


@pytest.mark.parametrize("scalar", [True, False])
def test_known_points_change_nothing(scalar):
    """A candidate that duplicates a labelled point (zero posterior variance) has zero change:
    no infinite score, and conditioning on it leaves the posterior as it was."""
    p = Problem(5, n=6, m=8, t=1, k=3, scalar=scalar)
    p.kernel[p.U[0]] = p.kernel[p.L[2]]
    p.kernel[:, p.U[0]] = p.kernel[:, p.L[2]]
    p.f[p.U[0]] = p.f[p.L[2]]
    proxy = p.proxy()
    y_c = p.y_all[p.U]
    for reduce in ("l2", "flips"):
        scores = lookahead.posterior_change(proxy, p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U], y_c,
                                            relative_to="proxy", reduce=reduce)
        assert np.all(np.isfinite(scores)) and scores[0] == 0
    post = lookahead.pool_posterior(proxy, p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U])
    after = lookahead.condition(post, [0], y_c[:1])
    assert rel_err(after.mean, post.mean) < 1e-8


@SETTINGS
@given(p=problems, relative=st.sampled_from(["proxy", "network"]))
def test_sequential_emoc_equals_its_expectation_over_direct_solves(p, relative):
    """Sequential EMOC (one pass for a scalar kernel measured from the proxy, one per class
    otherwise) equals sum_c p_c ||Delta(.; x', e_c)||, each change a fresh direct solve of Eq. (11),
    also after a pool point has been conditioned on."""
    from hypothesis import assume

    from ntk_tutorial.active import strategies

    assume(p.m >= 2)  # pool point 0 is labelled below; the others are the candidates compared
    post = lookahead.pool_posterior(p.proxy(), p.block(p.U, p.L), p.block(p.U, p.U), p.f[p.U])
    post = lookahead.condition(post, [0], p.y_all[p.U[:1]])
    train, y_train = np.concatenate([p.L, p.U[:1]]), np.concatenate([p.y_all[p.L], p.y_all[p.U[:1]]])
    network = p.f[p.U]
    reference = post.mean if relative == "proxy" else network
    got = strategies.posterior_scores(post, "emoc", network=network, relative_to=relative)
    probs = strategies.probabilities(reference, "softmax")
    want = np.zeros(p.m)
    for j in range(1, p.m):
        for c in range(p.k):
            y = np.eye(p.k)[c][None]
            after = p.direct(np.concatenate([train, [p.U[j]]]), np.concatenate([y_train, y]), p.U)
            want[j] += probs[j, c] * np.linalg.norm(after - reference, axis=1).sum()
    assert rel_err(got[1:], want[1:]) < TOL
