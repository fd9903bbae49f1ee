"""Bad input and faults (issue 16): wrong numbers never, clear errors always, nothing lost.

One test (or more) per class of the issue: integer and boolean inputs to the kernels, the
property test of the kernel and look-ahead functions against float64 references, configuration
fields checked by type and range, labels never spent twice on copies of labelled points, one run
per results file, recovery that keeps every valid cycle, and a memory guard that counts the
real peak (measured as peak RSS in a child process) and respects a cgroup limit.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntk_tutorial import data, kernels, lookahead, models, train
from ntk_tutorial.active import run as R
from ntk_tutorial.active import strategies as S
from helpers import lock_held_elsewhere, mlp, reference_entk, rel_err

# ---------------------------------------------------------------------------------------------
# integer and boolean inputs: cast to the working float dtype, everywhere
# ---------------------------------------------------------------------------------------------


def _np_infinite(x1, x2, depth, w_std=math.sqrt(2.0), b_std=0.1):
    """ReLU NTK / NNGP of an NTK-parameterised MLP in float64 NumPy (arc-cosine recursion), an
    implementation independent of ntk_tutorial.kernels."""
    x1 = np.asarray(x1, np.float64).reshape(len(x1), -1)
    x2 = np.asarray(x2, np.float64).reshape(len(x2), -1)
    d = x1.shape[1]
    s12 = w_std**2 * x1 @ x2.T / d + b_std**2
    s11 = w_std**2 * (x1**2).sum(1) / d + b_std**2
    s22 = w_std**2 * (x2**2).sum(1) / d + b_std**2
    ntk = s12.copy()
    for _ in range(depth):
        norm = np.sqrt(np.outer(s11, s22))
        cos = np.clip(s12 / norm, -1, 1)
        t = np.arccos(cos)
        s12 = w_std**2 * norm * (np.sin(t) + (np.pi - t) * cos) / (2 * np.pi) + b_std**2
        ntk = ntk * w_std**2 * (np.pi - t) / (2 * np.pi) + s12
        s11 = w_std**2 * s11 / 2 + b_std**2
        s22 = w_std**2 * s22 / 2 + b_std**2
    return ntk, s12


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.bool_])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float64])
def test_integer_and_boolean_inputs_give_the_float_kernel(dtype, param_dtype):
    """Raw uint8 pixels (what the loaders return) on the MLP's dense route overflowed the
    activation products: pNTK 54% and eNTK 64% off, infinite NTK 100% off."""
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if dtype is not np.bool_ else None
    x = (rng.integers(0, 2, (7, 12)) if info is None else rng.integers(info.min, info.max, (7, 12), endpoint=True))
    x = x.astype(dtype)
    apply_fn, params = mlp((12, 16, 3), dtype=param_dtype)
    exact = x.astype(np.float64)
    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    ref = np.asarray(reference_entk(apply_fn, params64, exact))
    tol = 1e-9 if param_dtype == jnp.float64 else 2e-5
    for method in ("dense", "jacobian"):
        theta = kernels.entk(apply_fn, params, x, method=method)
        assert theta.dtype == param_dtype
        assert rel_err(theta, ref) < tol, method
        assert rel_err(kernels.pntk(apply_fn, params, x, method=method), ref.sum((2, 3)) / 3) < tol, method
    ntk, nngp = _np_infinite(exact, exact, depth=2)
    assert rel_err(kernels.infinite_ntk(x, depth=2), ntk) < 1e-6
    assert rel_err(kernels.infinite_nngp(x, x[:3], depth=2), nngp[:, :3]) < 1e-6


def test_empty_inputs_and_wrong_feature_sizes_are_clear_errors():
    apply_fn, params = mlp((5, 8, 3))
    x = np.ones((4, 5))
    with pytest.raises(ValueError, match=r"x1 has no examples \(shape \(0, 5\)\)"):
        kernels.pntk(apply_fn, params, x[:0])
    with pytest.raises(ValueError, match="x2 has no examples"):
        kernels.entk(apply_fn, params, x, x[:0])
    with pytest.raises(ValueError, match=r"per-example shape \(4,\).*this MLP takes 5 features"):
        kernels.pntk(apply_fn, params, x[:, :4])
    with pytest.raises(ValueError, match=r"per-example shape \(4,\)"):
        kernels.pntk(apply_fn, params, x[:, :4], method="jacobian")
    with pytest.raises(ValueError, match="no features"):
        kernels.infinite_ntk(x[:, :0], depth=1)
    with pytest.raises(TypeError, match="complex"):
        kernels.pntk(apply_fn, params, x.astype(np.complex64))
    with pytest.raises(TypeError, match="numeric array"):
        kernels.pntk(apply_fn, params, np.array([["a"] * 5]))
    with pytest.raises(TypeError, match="batch_size must be a positive integer"):
        kernels.pntk(apply_fn, params, x, batch_size=2.5)
    with pytest.raises(TypeError, match="depth"):
        kernels.infinite_ntk(x, depth=1.5)
    with pytest.raises(ValueError, match="w_std"):
        kernels.infinite_ntk(x, depth=1, w_std=float("nan"))


# ---------------------------------------------------------------------------------------------
# the property test: random dtypes, shapes and non-finite values
# ---------------------------------------------------------------------------------------------

DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
          "complex64", "object"]
KERNEL_FNS = {"entk": kernels.entk, "pntk": kernels.pntk, "trace": kernels.trace_ntk,
              "single": kernels.single_logit_ntk}


def _values(rng, dtype: str, shape, low=-3, high=3):
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -200), min(info.max, 255), shape, endpoint=True).astype(dtype)
    if dtype == "complex64":
        return (rng.normal(size=shape) + 1j).astype(np.complex64)
    if dtype == "object":
        return np.array(rng.normal(size=shape), dtype=object)
    return (rng.uniform(low, high, shape)).astype(dtype)


def _reference_kernel(name, apply_fn, params64, x1, x2):
    theta = np.asarray(reference_entk(apply_fn, params64, x1, x2))
    k = theta.shape[-1]
    return {"entk": theta, "pntk": theta.sum((2, 3)) / k, "trace": np.trace(theta, axis1=2, axis2=3) / k,
            "single": theta[:, :, 0, 0]}[name]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fn=st.sampled_from([*KERNEL_FNS, "infinite_ntk", "infinite_nngp"]),
    dtype1=st.sampled_from(DTYPES), dtype2=st.sampled_from(DTYPES + [None]),
    n1=st.sampled_from([0, 1, 3]), n2=st.sampled_from([0, 2, 3]),
    d2=st.sampled_from([4, 4, 4, 3]), flat=st.sampled_from([False, False, False, True]),
    bad=st.sampled_from([None, None, "nan", "inf", "-inf"]), where=st.sampled_from([1, 2]),
    param_dtype=st.sampled_from(["float32", "float64"]), method=st.sampled_from(["auto", "jacobian"]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_the_float64_reference_or_raise_a_clear_error(fn, dtype1, dtype2, n1, n2, d2, flat, bad,
                                                                     where, param_dtype, method, seed):
    rng = np.random.default_rng(seed)
    x1 = _values(rng, dtype1, (n1, 4))
    x2 = None if dtype2 is None else _values(rng, dtype2, (n2, d2))
    if flat:
        x1 = x1[0] if n1 else x1.reshape(-1)
    non_finite = False
    target = x1 if where == 1 or x2 is None else x2
    if bad and target.dtype.kind == "f" and target.size:
        target.flat[0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[bad]
        non_finite = True
    arrays = [x1] + ([] if x2 is None else [x2])
    valid = (all(a.dtype.kind in "biuf" for a in arrays) and not flat and not non_finite
             and all(a.ndim == 2 and a.shape[0] > 0 for a in arrays) and all(a.shape[1] == 4 for a in arrays))
    apply_fn, params = mlp((4, 6, 3), seed=seed % 7, dtype=getattr(jnp, param_dtype))
    if fn.startswith("infinite"):
        call = lambda: getattr(kernels, fn)(x1, x2, depth=2)  # noqa: E731
    else:
        call = lambda: KERNEL_FNS[fn](apply_fn, params, x1, x2, method=method)  # noqa: E731
    if not valid:
        with pytest.raises((ValueError, TypeError)) as err:
            call()
        assert len(str(err.value)) > 20 and "\n" not in str(err.value).strip()
        return
    got = np.asarray(call(), np.float64)
    e1 = x1.astype(np.float64)
    e2 = e1 if x2 is None else x2.astype(np.float64)
    if fn.startswith("infinite"):
        want = _np_infinite(e1, e2, 2)[0 if fn == "infinite_ntk" else 1]
        tol = 1e-5  # float32 under the default dtype, float64 with x64 (the tests' setting)
    else:
        params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        want = _reference_kernel(fn, apply_fn, params64, e1, e2)
        # gradients come in the parameters' dtype; float32 inputs are used as they are (the dense
        # route's first Gram matrix of activations is then float32)
        low = param_dtype == "float32" or any(a.dtype == np.float32 for a in arrays)
        tol = 3e-5 if low else 1e-9
    assert got.shape == want.shape
    assert rel_err(got, want) < tol or np.max(np.abs(got - want)) < tol * max(1.0, np.max(np.abs(want)))


def _pd_kernel(rng, dtype, n):
    """A positive definite (n, n) kernel whose values ``dtype`` holds exactly (entries below 30,
    non-negative for unsigned dtypes, the identity for booleans)."""
    if dtype == "bool":
        return np.eye(n, dtype=bool)
    low = 0 if dtype.startswith("uint") else -2
    a = rng.integers(low, 2, (n, 3), endpoint=True)
    return (a @ a.T + n * np.eye(n, dtype=np.int64)).astype(dtype)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fn=st.sampled_from(["kernel_regression", "posterior_change", "schur_update", "lookahead_predictions"]),
    dk=st.sampled_from(DTYPES), dy=st.sampled_from(DTYPES), dt=st.sampled_from(DTYPES),
    n=st.sampled_from([1, 3, 4]), m=st.sampled_from([0, 2, 3]), k=st.sampled_from([1, 3]),
    y_shape=st.sampled_from(["ok", "ok", "ok", "ints", "rows"]),
    bad=st.sampled_from([None, None, None, "nan", "inf"]), bad_in=st.sampled_from(["k", "y", "t"]),
    ridge=st.sampled_from([0.0, 0.5, -1.0, float("nan")]), seed=st.integers(0, 2**16),
)
def test_lookahead_matches_the_float64_reference_or_raises_a_clear_error(fn, dk, dy, dt, n, m, k, y_shape, bad,
                                                                         bad_in, ridge, seed):
    """Kernel regression and the look-ahead updates on random dtypes, shapes and non-finite
    values, against direct float64 solves written here."""
    rng = np.random.default_rng(seed)
    k_input = _pd_kernel(rng, dk if dk in ("bool",) or dk.startswith("uint") else "int64", n + m + 1)
    k_input = k_input if dk == "bool" else k_input.astype(dk)  # labelled, pool/test, one candidate
    y = np.eye(k)[rng.integers(0, k, n)]
    y_input = y.astype(dy) if y_shape == "ok" else (rng.integers(0, k, n) if y_shape == "ints" else np.zeros((n + 1, k)))
    f_test = rng.integers(-2, 3, (m + 1, k)).astype(dt)
    y_cand = np.eye(k)[rng.integers(0, k, m)]  # the label each pool point would get
    arrays = {"k": k_input, "y": y_input, "t": f_test}
    non_finite = False
    if bad and arrays[bad_in].dtype.kind == "f" and (bad_in != "t" or m > 0):  # only f_test[:m] is used
        arrays[bad_in].flat[0] = np.nan if bad == "nan" else np.inf
        non_finite = True
    kin, yin, ftin = arrays["k"], arrays["y"], arrays["t"]
    valid = (all(a.dtype.kind in "biuf" for a in arrays.values()) and y_shape == "ok" and not non_finite
             and ridge >= 0 and math.isfinite(ridge))
    L, U = np.arange(n), np.arange(n, n + m)
    c = n + m  # the candidate
    ke = kin.astype(np.float64) if kin.dtype.kind in "biuf" else None
    if fn == "kernel_regression":
        call = lambda: lookahead.kernel_regression(kin[np.ix_(L, L)], yin, kin[np.ix_(U, L)], f_test=ftin[:m],  # noqa
                                                   ridge=ridge)
    elif fn == "posterior_change":
        def call():
            proxy = lookahead.fit_proxy(kin[np.ix_(L, L)], yin, ridge=ridge)
            return lookahead.posterior_change(proxy, kin[np.ix_(U, L)], kin[np.ix_(U, U)], ftin[:m], y_cand)
    elif fn == "schur_update":
        def call():
            proxy = lookahead.fit_proxy(kin[np.ix_(L, L)], yin, ridge=ridge)
            return lookahead.schur_update(proxy, kin[c, L], kin[c, c], np.eye(k)[0], kin[np.ix_(U, L)],
                                          kin[U, c], f_test=ftin[:m])
    else:
        call = lambda: lookahead.lookahead_predictions(kin[np.ix_(L, L)], yin, kin[c, L], kin[c, c], np.eye(k)[0],  # noqa
                                                       kin[np.ix_(U, L)], kin[U, c], f_test=ftin[:m], ridge=ridge)
    if not valid:
        with pytest.raises((ValueError, TypeError)) as err:
            call()
        assert len(str(err.value)) > 15
        return
    got = np.asarray(call(), np.float64)
    yy, ff = y_input.astype(np.float64), f_test.astype(np.float64)[:m]
    eye = np.eye(len(L))
    if fn == "kernel_regression":
        want = ff + ke[np.ix_(U, L)] @ np.linalg.solve(ke[np.ix_(L, L)] + ridge * eye, yy)
    elif fn == "posterior_change":
        f_lin = ff + ke[np.ix_(U, L)] @ np.linalg.solve(ke[np.ix_(L, L)] + ridge * eye, yy)
        want = []
        for j in range(m):  # Eq. (11) by a direct solve on L + {pool point j}, per candidate
            P = np.concatenate([L, [U[j]]])
            kp = ke[np.ix_(P, P)] + ridge * np.eye(len(P))
            rhs = np.concatenate([yy, (y_cand[j] - ff[j])[None]])  # f_L = 0 on L, f_pool at j
            want.append(ff + ke[np.ix_(U, P)] @ np.linalg.solve(kp, rhs) - f_lin)
        want = np.stack(want) if want else np.zeros((0, 0, k))
    else:
        P = np.concatenate([L, [c]])
        kp = ke[np.ix_(P, P)] + ridge * np.eye(len(P))
        rhs = np.concatenate([yy, np.eye(k)[:1]])
        want = ff + ke[np.ix_(U, P)] @ np.linalg.solve(kp, rhs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# configuration fields: type and range, from one declaration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "epochs must be an integer >= 1, got 0"),
    ("epochs", -5, "epochs must be an integer >= 1"),
    ("epochs", 5.0, "epochs must be an integer >= 1, got 5.0"),
    ("batch_size", -1, "batch_size must be an integer >= 1"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("hidden", "256", r"hidden must be a list of positive integers.*a string"),
    ("hidden", [256, "a"], "hidden must be a list of positive integers"),
    ("hidden", [], "hidden must be a list of positive integers"),
    ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", "0.5", r"lr must be a finite number > 0, got '0.5' \(a string\)"),
    ("retrain_every", -1, "retrain_every must be an integer >= 0"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("dropout", 1.0, "dropout must be a finite number >= 0 and < 1"),
    ("momentum", True, "momentum must be a finite number"),
    ("depth", 11, r"depth must be an integer >= 10 \(6n \+ 4"),
    ("stages", 4, "stages must be an integer >= 1 and <= 3"),
    ("dataset", "mnist5k", "unknown dataset 'mnist5k' \\(did you mean 'mnist-5k'\\?\\)"),
    ("kernel", "ntk", "unknown kernel 'ntk'"),
    ("mode", 3, "mode must be one of batch, sequential, hybrid"),
])
def test_every_configuration_field_is_checked_by_type_and_range(field, value, match):
    """--epochs 0 / -5, --batch-size -1 recorded chance accuracy with exit 0, and a config file's
    "hidden": "256" trained a 784-2-5-6-10 network."""
    with pytest.raises(R.ConfigError, match=match) as err:
        R.ALConfig.from_dict({field: value})
    assert err.value.field == field


def test_every_field_declares_its_check_and_the_defaults_pass_it():
    from dataclasses import fields

    for f in fields(R.ALConfig):
        spec = f.metadata["spec"]
        assert isinstance(spec, R.FieldSpec), f.name
        spec.validate(f.name, f.default)  # the defaults are valid
    cfg = R.ALConfig.from_dict({"hidden": [64, 32], "lr": 2, "batch_size": np.int64(8)})
    assert cfg.hidden == (64, 32) and cfg.lr == 2.0 and isinstance(cfg.lr, float) and type(cfg.batch_size) is int
    assert R.field_spec("hidden").parse("hidden", "256,128") == (256, 128)
    with pytest.raises(R.ConfigError, match="comma-separated positive integers"):
        R.field_spec("hidden").parse("hidden", "256,a")


def test_the_committed_results_still_validate():
    """Every configuration recorded under results/ passes the checks (nothing committed is lost)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "results" / "al"
    files = sorted(root.glob("*/*.jsonl"))
    if not files:
        pytest.skip("no committed results in this checkout")
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no line of a committed file is set aside
            recs = R.read_results(f)
        if recs:  # (a file a running experiment has just created may hold no complete cycle yet)
            R.ALConfig.from_dict(recs[0]["config"])


def test_seeds_are_checked_and_bounded():
    assert R.parse_seeds("0-2") == [0, 1, 2] and R.parse_seeds("3, 5") == [3, 5]
    for text, match in (("-1", "integers >= 0, got -1"), ("0-99999999", "at most 10000"), ("5-2", "empty"),
                        ("a", "expected seeds"), ("", "no seeds")):
        with pytest.raises(ValueError, match=match):
            R.parse_seeds(text)


# ---------------------------------------------------------------------------------------------
# labels spent twice: copies of labelled points are never queried
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def undertrained():
    """An MLP trained 2 epochs on 30 digits (float32, as the command line runs): the network is
    far from its proxy, so a copy's change (the offset alone) is not small."""
    ds = data.load("digits", seed=0)
    model = models.MLP((64, 48, 10), param_dtype=jnp.float32, rngs=nnx.Rngs(params=jax.random.key(0)))
    apply_fn, params = models.functional(model)
    x_l, y_l = ds.x_train[:30], ds.y_train[:30]
    params = train.train(apply_fn, params, x_l, y_l, lr=1.0, epochs=2, loss="mse").params
    x_p = np.concatenate([ds.x_train[100:150], x_l[:10]])  # candidates 50..59 copy labelled points
    return apply_fn, params, x_l, y_l, x_p


@pytest.mark.parametrize("strategy,kernel,relative_to", [
    ("mlmoc", "pntk", "network"), ("mlmoc-flips", "pntk", "network"), ("emoc", "pntk", "network"),
    ("mlmoc", "pntk", "proxy"), ("mlmoc-flips", "pntk", "proxy"), ("emoc", "pntk", "proxy"),
    ("mlmoc", "entk", "network"), ("mlmoc-flips", "entk", "network")])
def test_lookahead_strategies_never_query_copies_of_labelled_points(undertrained, strategy, kernel, relative_to):
    """A zero Schur complement means "nothing to learn here": with 10 exact copies of labelled
    points among 60 candidates, MLMOC, EMOC and the flip count query none of them while other
    candidates remain (they took 4 and 8 of 10; the flip count 2 with this network)."""
    apply_fn, params, x_l, y_l, x_p = undertrained
    ctx = S.Context(apply_fn, params, x_l, y_l, x_p, 10, kernel=kernel, relative_to=relative_to)
    picked = S.select(strategy, ctx, 45, jax.random.key(1))
    assert not np.any(picked >= 50), f"{strategy} queried copies {picked[picked >= 50]}"
    np.testing.assert_array_equal(S.copies_of(x_p, x_l), np.arange(60) >= 50)


def test_sequential_querying_never_picks_copies(tmp_path):
    ds = data.load("digits", seed=0)
    cfg = R.config_from_preset(None, dataset="digits", init=10, query=6, subset=30, hidden=(32,), epochs=2,
                               lr=0.3, strategy="mlmoc-flips", cycles=1, mode="sequential")
    rng = np.random.default_rng([cfg.seed, 0xA1])
    labelled = rng.choice(len(ds.x_train), cfg.init, replace=False)
    x = ds.x_train.copy()
    rng2 = np.random.default_rng([cfg.seed, 0, 0x5B])
    cand = np.sort(rng2.choice(np.setdiff1d(np.arange(len(x)), labelled), cfg.subset, replace=False))
    x[cand[:12]] = x[labelled[np.arange(12) % len(labelled)]]  # 12 candidates copy labelled points
    fake = data.Dataset("digits", x, ds.y_train, ds.x_test, ds.y_test, 10, ds.class_names, "", 0)
    apply_fn, params, state = R.build_model(cfg, 64, 10)
    queried, _, _ = R._sequential_query(apply_fn, params, state, cfg, fake, labelled, cand, jax.random.key(0))
    assert not set(queried.tolist()) & set(cand[:12].tolist())


# ---------------------------------------------------------------------------------------------
# one run per results file; recovery keeps every valid cycle
# ---------------------------------------------------------------------------------------------

TINY = dict(dataset="digits", init=10, query=5, subset=40, hidden=(32,), epochs=20, lr=0.3)


def test_a_second_run_on_a_results_file_names_the_process_holding_it(tmp_path):
    cfg = R.config_from_preset(None, **TINY, strategy="random", cycles=1)
    path = R.results_path(tmp_path, cfg)
    with lock_held_elsewhere(path) as pid:
        with pytest.raises(R.ResultsError, match=rf"being written by another run \(process {pid} "):
            R.run_experiment(cfg, tmp_path)
        assert not path.exists() or not path.read_text()
    assert len(R.run_experiment(cfg, tmp_path)) == 1  # released: the run goes ahead
    assert not R.lock_path(path).exists()
    # a holder killed with SIGKILL leaves no stale lock
    killed = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from ntk_tutorial.active.run import RunLock
        RunLock({str(path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "locked"
    killed.kill()
    killed.wait(timeout=60)
    assert len(R.run_experiment(R.replace(cfg, cycles=2), tmp_path)) == 2


def test_a_file_written_twice_keeps_every_valid_cycle(tmp_path):
    """Two runs on one folder wrote every cycle twice; the next resume and al-plot refused the
    file and advised deleting it, valid cycles included."""
    cfg = R.config_from_preset(None, **TINY, strategy="mlmoc", cycles=2)
    R.run_experiment(cfg, tmp_path / "clean")
    clean = R.results_path(tmp_path / "clean", cfg)
    lines = clean.read_text().splitlines()
    folder = tmp_path / "twice"
    folder.mkdir()
    path = R.results_path(folder, cfg)
    path.write_text("\n".join([lines[0], lines[0], lines[1], lines[1]]) + "\n")
    for c in (0, 1):
        npz = R._params_path(clean, c)
        R._params_path(path, c).write_bytes(npz.read_bytes())
    with pytest.warns(R.ResultsWarning, match="2 line.*second copy of cycle 0"):
        assert [r["cycle"] for r in R.read_results(path)] == [0, 1]  # al-plot's read: both cycles
    with pytest.warns(R.ResultsWarning, match="set aside"):
        recs = R.run_experiment(R.replace(cfg, cycles=3), folder)
    assert [r["cycle"] for r in recs] == [0, 1, 2]
    assert path.read_text().splitlines()[:2] == lines
    assert R.rejected_path(path).read_text().splitlines() == [lines[0], lines[1]]
    full = R.run_experiment(R.replace(cfg, cycles=3), tmp_path / "clean")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("timings", "config")}  # noqa: E731
    assert [strip(r) for r in recs] == [strip(r) for r in full]


def test_an_unreadable_warm_start_is_recomputed_not_a_dead_end(tmp_path):
    """A junk .npz used to end in numpy's "allow_pickle=" advice; now the cycles after the last
    readable parameters are set aside and recomputed, identically."""
    cfg = R.config_from_preset(None, **TINY, strategy="random", cycles=3)
    whole = R.run_experiment(cfg, tmp_path / "a")
    short = R.replace(cfg, cycles=2)
    R.run_experiment(short, tmp_path / "b")
    path = R.results_path(tmp_path / "b", cfg)
    R._params_path(path, 1).write_bytes(b"junk, not a zip file")
    with pytest.warns(R.ResultsWarning, match=r"cycle001\.npz is not a parameter file.*recomputed"):
        again = R.run_experiment(cfg, tmp_path / "b")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("timings", "config")}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in whole]  # bit-identical cycles
    assert len(R.rejected_path(path).read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# the memory guard: the real peak, before allocating, under a cgroup's limit
# ---------------------------------------------------------------------------------------------

_PEAK_CHILD = textwrap.dedent("""
    import gc, json, sys
    import numpy as np
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    spec = json.loads(sys.argv[1])
    import jax, jax.numpy as jnp
    from flax import nnx
    from ntk_tutorial import kernels, models
    from ntk_tutorial.active import strategies as S
    if spec["model"] == "mlp":
        model = models.MLP(tuple(spec["widths"]), rngs=nnx.Rngs(params=jax.random.key(0)))
    else:
        model = models.CNN((8, 8, 1), 10, channels=8, rngs=nnx.Rngs(params=jax.random.key(0)))
    apply_fn, params = models.functional(model)
    rng = np.random.default_rng(0)
    kw = {k: spec[k] for k in ("batch_size", "method") if k in spec}
    if spec["what"] == "kernel":
        x = rng.normal(size=(spec["n"], 64)).astype(np.float32)
        run = lambda: jax.block_until_ready(kernels.__dict__[spec["fn"]](apply_fn, params, x, **kw))
        estimate = kernels.kernel_memory(spec["kind"], apply_fn, params, x, **kw)
    elif spec["what"] == "sequential":  # sequential querying: the M x M pool posterior
        from ntk_tutorial import data
        from ntk_tutorial.active import run as R
        n, m = spec["n"], spec["m"]
        x = rng.normal(size=(n + m, 64)).astype(np.float32)
        y = np.arange(n + m) % 10
        ds = data.Dataset("fake", x, y, x[:10], y[:10], 10, tuple("0123456789"), "", 0)
        cfg = R.config_from_preset(None, strategy="mlmoc-flips", mode="sequential", init=n, query=3, subset=m,
                                   kernel=spec["kernel"], hidden=tuple(spec["widths"][1:-1]))
        run = lambda: R._sequential_query(apply_fn, params, None, cfg, ds, np.arange(n), np.arange(n, n + m),
                                          jax.random.key(0))
        estimate = S.lookahead_memory(apply_fn, params, n, m, (64,), np.float32, 10, kernel=spec["kernel"],
                                      sequential=True)
    else:  # one look-ahead round (batch mode)
        x_l = rng.normal(size=(spec["n"], 64)).astype(np.float32)
        x_p = rng.normal(size=(spec["m"], 64)).astype(np.float32)
        y_l = np.arange(spec["n"]) % 10
        ctx = lambda: S.Context(apply_fn, params, x_l, y_l, x_p, 10, kernel=spec["kernel"])
        run = lambda: S.select(spec["strategy"], ctx(), 5, 0)
        estimate = S.lookahead_memory(apply_fn, params, spec["n"], spec["m"], (64,), np.float32, 10,
                                      kernel=spec["kernel"])
    if spec.get("refuse"):
        import os
        os.environ[kernels.MEMORY_ENV] = str(int(estimate / kernels.MEMORY_FRACTION * 0.97))
        base = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")
        try:
            run()
            refused = False
        except kernels.KernelTooLargeError as err:
            refused = "needs about" in str(err)
        print(json.dumps({"refused": refused, "peak": status("VmHWM:") - base, "estimate": estimate}))
        sys.exit(0)
    run(); gc.collect()  # compile first: the measured run allocates only data
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    run()
    print(json.dumps({"peak": status("VmHWM:") - base, "estimate": estimate}))
""")

# runtime and allocator noise on top of the data buffers the estimate counts
_SLACK = 48 * 2**20


def _measure(spec: dict) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "JAX_ENABLE_X64": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop(kernels.MEMORY_ENV, None)
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, json.dumps(spec)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", [
    dict(what="kernel", fn="entk", kind="entk", model="mlp", widths=[64, 256, 10], n=600),  # dense route
    dict(what="kernel", fn="pntk", kind="pntk", model="mlp", widths=[64, 512, 512, 10], n=2500),
    dict(what="kernel", fn="entk", kind="entk", model="mlp", widths=[64, 256, 10], n=600, batch_size=150),
    dict(what="kernel", fn="entk", kind="entk", model="mlp", widths=[64, 256, 10], n=300, method="jacobian"),
    dict(what="kernel", fn="entk", kind="entk", model="cnn", n=300),
    dict(what="round", strategy="mlmoc", kernel="entk", model="mlp", widths=[64, 128, 10], n=60, m=440),
    dict(what="round", strategy="emoc", kernel="pntk", model="mlp", widths=[64, 128, 10], n=100, m=3000),
    dict(what="sequential", kernel="pntk", model="mlp", widths=[64, 128, 10], n=100, m=3000),
    dict(what="sequential", kernel="entk", model="mlp", widths=[64, 128, 10], n=30, m=270),
], ids=["dense-entk", "dense-pntk-deep", "blocks-entk", "features-entk", "cnn-entk", "mlmoc-entk-round",
        "emoc-pntk-round", "sequential-pntk", "sequential-entk"])
def test_the_memory_estimate_bounds_the_measured_peak_rss(spec):
    """The old guard counted the output only: the MLP eNTK peaked at 3.1x it, an MLMOC round
    with the eNTK at about 4.7x.  The estimate must bound the peak RSS measured in a child
    process, and stay within 3x of it (a guard that refuses what fits is wrong too)."""
    got = _measure(spec)
    assert got["peak"] <= got["estimate"] + _SLACK, got
    assert got["estimate"] <= 3 * got["peak"] + _SLACK, got


def test_the_guard_refuses_before_allocating():
    """Under a limit just below the estimate, an MLMOC round with the eNTK is refused with a
    message before the kernel is computed: the peak RSS barely moves."""
    got = _measure(dict(what="round", strategy="mlmoc", kernel="entk", model="mlp", widths=[64, 128, 10],
                        n=60, m=440, refuse=True))
    assert got["refused"], got
    assert got["peak"] < 0.1 * got["estimate"] + _SLACK, got


def _fake_cgroup(tmp_path, monkeypatch, lines: str, files: dict):
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    monkeypatch.setattr(kernels, "PROC_CGROUP", str(proc))
    monkeypatch.setattr(kernels, "CGROUP_ROOT", str(tmp_path / "fs"))
    monkeypatch.delenv(kernels.MEMORY_ENV, raising=False)


def test_the_guard_respects_a_cgroup_v2_limit(tmp_path, monkeypatch):
    _fake_cgroup(tmp_path, monkeypatch, "0::/job/step\n", {
        "job/step/memory.max": "1000000\n", "job/step/memory.current": "300000\n",
        "job/step/memory.stat": "anon 200000\ninactive_file 100000\n",
        "job/memory.max": "max\n", "memory.max": "max\n"})
    assert kernels.cgroup_available_memory() == 800_000  # limit - usage + reclaimable cache
    assert kernels.available_memory() == 800_000
    (tmp_path / "fs" / "job" / "memory.max").write_text("500000\n")  # a parent's tighter limit
    (tmp_path / "fs" / "job" / "memory.current").write_text("300000\n")
    assert kernels.available_memory() == 200_000
    apply_fn, params = mlp((5, 8, 3))
    x = np.ones((200, 5))
    with pytest.raises(kernels.KernelTooLargeError, match="cgroup"):
        kernels.pntk(apply_fn, params, x)  # 200 x 200 float64: 320 kB of output alone
    kernels.pntk(apply_fn, params, x[:20])


def test_the_guard_respects_a_cgroup_v1_limit(tmp_path, monkeypatch):
    _fake_cgroup(tmp_path, monkeypatch, "4:memory:/docker/abc\n3:cpu:/docker/abc\n", {
        "memory/docker/abc/memory.limit_in_bytes": "2000000\n",
        "memory/docker/abc/memory.usage_in_bytes": "1500000\n",
        "memory/docker/abc/memory.stat": "cache 100\ntotal_inactive_file 500000\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n"})  # the root: no limit
    assert kernels.cgroup_available_memory() == 1_000_000
    _fake_cgroup(tmp_path, monkeypatch, "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert kernels.cgroup_available_memory() is None


def test_the_cpu_preset_with_the_entk_is_refused_before_training(tmp_path, monkeypatch):
    """cpu-mnist-5k with --kernel entk would need ~30 GB and be killed after hours of training;
    on a 16 GiB budget it is refused at once, before the first cycle."""
    cfg = R.config_from_preset("cpu-mnist-5k", strategy="mlmoc-flips", kernel="entk", seed=0)
    apply_fn, params, state = R.build_model(cfg, 784, 10, (28, 28, 1))
    need = S.lookahead_memory(apply_fn, params, cfg.init, cfg.subset, (784,), np.float32, 10, kernel="entk",
                              state=state)
    assert need > 20 * 2**30  # the 7.3 GB float32 eNTK, its 14.7 GB float64 copy, the algebra
    monkeypatch.setenv(kernels.MEMORY_ENV, str(16 * 2**30))
    with pytest.raises(kernels.KernelTooLargeError, match=r"look-ahead query round.*--kernel pntk"):
        R.check_experiment_memory(cfg, apply_fn, params, (784,), np.float32, 10, 4000, state=state)
    R.check_experiment_memory(R.replace(cfg, kernel="pntk"), apply_fn, params, (784,), np.float32, 10, 4000,
                              state=state)
