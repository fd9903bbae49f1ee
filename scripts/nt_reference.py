"""Generate reference numbers from neural-tangents for the package's tests.

Purpose
-------
``neural-tangents`` (NT) is archived and no longer imports with current JAX
(jax>=0.6 fails with ``ImportError: cannot import name 'Jaxpr' from
'jax.core'``).  This script is therefore NOT part of the package and is not
run by the test-suite: it is run once, in a pinned legacy environment, to
write ``tests/data/nt_reference.npz``, which the tests then read with plain
numpy.

Environment
-----------
Either with conda::

    conda env create -f environment-nt.yml
    conda activate ntk-tutorial-nt-reference

or with a plain venv (Python 3.11)::

    python3.11 -m venv /tmp/ntenv
    /tmp/ntenv/bin/pip install jax==0.4.25 jaxlib==0.4.25 numpy==1.26.4 \
        tensorflow==2.16.2 tf2jax==0.3.6 neural-tangents==0.6.5 flax==0.8.2

(``tensorflow-cpu`` is no substitute: neural-tangents and tf2jax both
declare a dependency on ``tensorflow`` itself, so pip installs it anyway.)

Run (from the repository root)::

    python scripts/nt_reference.py --out tests/data/nt_reference.npz

Conventions checked by this script (assertions, it fails otherwise)
-------------------------------------------------------------------
* float64 throughout (``jax_enable_x64``); inputs from
  ``numpy.random.default_rng(SEED)``, parameters from
  ``init_fn(jax.random.PRNGKey(SEED + case_index), x1.shape)``.
* Network: ``stax.serial(*[Dense(width, W_std, b_std), Act()] * depth,
  Dense(k, W_std, b_std))`` with ``parameterization='ntk'`` (the default),
  ``Act`` = ``stax.Relu()`` (``max(x, 0)``) or ``stax.Erf()``.  NT's ``Erf`` is
  ``a * erf(b * x) + c`` with defaults ``a=1, b=1, c=0``, i.e. plain
  ``scipy.special.erf``.
* stax Dense, NTK parameterization: parameters are stored *unscaled*
  (standard normal at init) and applied as::

      out = x @ W * (w_std / sqrt(fan_in)) + b_std * b

  with ``W`` of shape ``(fan_in, fan_out)``.  stax stores ``b`` with shape
  ``(1, fan_out)``; it is written here raveled to shape ``(fan_out,)``.
  With ``b_std = 0`` a bias parameter still exists but contributes nothing
  to the output or to the NTK.
* Empirical NTK with ``trace_axes=()`` has axis order ``(n1, n2, k, k)``:
  ``entk[a, b, i, j] = sum_p d f_i(x1_a)/dp * d f_j(x2_b)/dp`` (checked
  against an explicit ``jax.jacobian`` contraction).
* NT's default ``trace_axes=(-1,)`` returns the MEAN over the diagonal
  logits, ``trace(entk[a, b]) / k`` (NT divides by the size of the traced
  axes), not the sum.  So ``C/trace_ntk == C/trace_ntk_mean``; both are kept.

npz layout
----------
``x1`` (6, 5), ``x2`` (4, 5), ``cases`` (1-D str), ``versions`` (0-d str,
use ``str(...)`` or ``.item()``), and for every case name ``C``:
``C/activation`` (0-d str), ``C/depth``, ``C/width``, ``C/k`` (ints, depth =
number of hidden layers), ``C/w_std``, ``C/b_std`` (floats),
``C/W{l}``, ``C/b{l}`` for ``l = 0..depth``, ``C/f1`` (6, k), ``C/f2`` (4, k),
``C/entk`` (6, 4, k, k), ``C/entk_11`` (6, 6, k, k), ``C/trace_ntk`` (6, 4),
``C/trace_ntk_mean`` (6, 4), ``C/inf_ntk``, ``C/inf_nngp`` (6, 4),
``C/inf_ntk_11``, ``C/inf_nngp_11`` (6, 6).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402,F401

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402
from scipy.special import erf  # noqa: E402

SEED = 20240607
N1, N2, D = 6, 4, 5

# (activation, depth, width, k, w_std, b_std)
CASES = [
    ("relu", 1, 16, 3, 1.5, 0.1),
    ("relu", 2, 32, 2, math.sqrt(2.0), 0.05),
    ("erf", 2, 16, 4, 1.2, 0.2),
    ("relu", 3, 8, 3, 1.0, 0.0),
]

RTOL, ATOL = 1e-10, 1e-12


def case_name(act, depth, width, k):
    return f"{act}_d{depth}_w{width}_k{k}"


def build(act, depth, width, k, w_std, b_std):
    Act = {"relu": stax.Relu, "erf": stax.Erf}[act]
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(width, W_std=w_std, b_std=b_std), Act()]
    layers += [stax.Dense(k, W_std=w_std, b_std=b_std)]
    return stax.serial(*layers)


def dense_params(params):
    """[(W, b), ...] for the Dense layers (activations have empty params)."""
    out = [p for p in params if len(p) == 2]
    assert all(len(p) == 0 for p in params if len(p) != 2)
    return out


def numpy_forward(x, Wb, act, w_std, b_std):
    """Independent numpy forward pass using the stax NTK convention."""
    fn = {"relu": lambda z: np.maximum(z, 0.0), "erf": erf}[act]
    h = np.asarray(x, dtype=np.float64)
    for i, (W, b) in enumerate(Wb):
        h = h @ W * (w_std / math.sqrt(W.shape[0])) + b_std * b
        if i < len(Wb) - 1:
            h = fn(h)
    return h


def jacobian_entk(apply_fn, params, xa, xb):
    """Explicit Jacobian contraction, independent of nt.empirical_*."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda p, x: apply_fn(unravel(p), x)  # noqa: E731
    Ja = jax.jacobian(f)(flat, xa)  # (na, k, P)
    Jb = jax.jacobian(f)(flat, xb)  # (nb, k, P)
    return np.einsum("aip,bjp->abij", np.asarray(Ja), np.asarray(Jb))


def close(a, b, what, rtol=RTOL, atol=ATOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs diff {np.max(np.abs(a - b))}")


def run_case(idx, spec, x1, x2, out, log):
    act, depth, width, k, w_std, b_std = spec
    C = case_name(act, depth, width, k)
    init_fn, apply_fn, kernel_fn = build(*spec)
    _, params = init_fn(jax.random.PRNGKey(SEED + idx), x1.shape)

    Wb = []
    for W, b in dense_params(params):
        W = np.asarray(W)
        b = np.asarray(b)
        assert W.dtype == np.float64 and b.dtype == np.float64
        assert b.shape == (1, W.shape[1]), b.shape  # stax stores (1, out)
        Wb.append((W, b.reshape(-1)))
    assert len(Wb) == depth + 1

    f1 = np.asarray(apply_fn(params, x1))
    f2 = np.asarray(apply_fn(params, x2))
    close(numpy_forward(x1, Wb, act, w_std, b_std), f1, f"{C} forward x1")
    close(numpy_forward(x2, Wb, act, w_std, b_std), f2, f"{C} forward x2")

    impl = nt.NtkImplementation
    full_jc = nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                                  implementation=impl.JACOBIAN_CONTRACTION)
    entk = np.asarray(full_jc(x1, x2, params))
    entk_11 = np.asarray(full_jc(x1, None, params))
    assert entk.shape == (N1, N2, k, k) and entk_11.shape == (N1, N1, k, k)
    close(jacobian_entk(apply_fn, params, x1, x2), entk, f"{C} entk vs jac")
    close(jacobian_entk(apply_fn, params, x1, x1), entk_11, f"{C} entk11 jac")

    for name in ("STRUCTURED_DERIVATIVES", "NTK_VECTOR_PRODUCTS"):
        fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                                 implementation=getattr(impl, name))
        close(fn(x1, x2, params), entk, f"{C} entk {name}")
        close(fn(x1, None, params), entk_11, f"{C} entk_11 {name}")

    tr_fn = nt.empirical_ntk_fn(apply_fn, vmap_axes=0)  # default (-1,)
    trace_ntk = np.asarray(tr_fn(x1, x2, params))
    tr_sum = np.trace(entk, axis1=2, axis2=3)
    trace_mean = tr_sum / k
    close(trace_ntk, trace_mean, f"{C} NT trace_axes=(-1,) is the mean")
    assert not np.allclose(trace_ntk, tr_sum)  # ... and not the sum (k > 1)

    kern = kernel_fn(x1, x2, ("ntk", "nngp"))
    inf_ntk, inf_nngp = np.asarray(kern.ntk), np.asarray(kern.nngp)
    inf_ntk_11 = np.asarray(kernel_fn(x1, None, "ntk"))
    inf_nngp_11 = np.asarray(kernel_fn(x1, None, "nngp"))
    for a, s in ((inf_ntk, (N1, N2)), (inf_nngp, (N1, N2)),
                 (inf_ntk_11, (N1, N1)), (inf_nngp_11, (N1, N1))):
        assert a.shape == s and a.dtype == np.float64

    p = f"{C}/"
    out[p + "activation"] = np.array(act)
    out[p + "depth"] = np.array(depth, dtype=np.int64)
    out[p + "width"] = np.array(width, dtype=np.int64)
    out[p + "k"] = np.array(k, dtype=np.int64)
    out[p + "w_std"] = np.array(w_std, dtype=np.float64)
    out[p + "b_std"] = np.array(b_std, dtype=np.float64)
    for l, (W, b) in enumerate(Wb):
        out[p + f"W{l}"] = W
        out[p + f"b{l}"] = b
    out[p + "f1"] = f1
    out[p + "f2"] = f2
    out[p + "entk"] = entk
    out[p + "entk_11"] = entk_11
    out[p + "trace_ntk"] = trace_ntk
    out[p + "trace_ntk_mean"] = trace_mean
    out[p + "inf_ntk"] = inf_ntk
    out[p + "inf_nngp"] = inf_nngp
    out[p + "inf_ntk_11"] = inf_ntk_11
    out[p + "inf_nngp_11"] = inf_nngp_11

    rel = np.abs(trace_ntk - inf_ntk).max() / np.abs(inf_ntk).max()
    log(f"{C}: ok (max rel |trace eNTK - inf NTK| = {rel:.3f})")
    return C


def sanity_check(path):
    d = np.load(path)  # no pickle needed: all str arrays are numpy unicode
    for C in d["cases"]:
        C = str(C)
        e11 = d[f"{C}/entk_11"]
        close(e11, e11.transpose(1, 0, 3, 2), f"{C} entk_11 symmetry")
        for key in ("inf_ntk_11", "inf_nngp_11"):
            K = d[f"{C}/{key}"]
            close(K, K.T, f"{C} {key} symmetry")
            assert np.linalg.eigvalsh(K).min() > -1e-10 * np.abs(K).max(), key
        M = e11.transpose(0, 2, 1, 3).reshape(6 * int(d[f"{C}/k"]), -1)
        assert np.linalg.eigvalsh(M).min() > -1e-10 * np.abs(M).max()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/nt_reference.npz")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(SEED)
    x1 = rng.standard_normal((N1, D))
    x2 = rng.standard_normal((N2, D))

    out = {"x1": x1, "x2": x2}
    names = [run_case(i, spec, x1, x2, out, print)
             for i, spec in enumerate(CASES)]
    out["cases"] = np.array(names)
    out["versions"] = np.array(
        f"jax={jax.__version__}, neural_tangents={nt.__version__}, "
        f"numpy={np.__version__}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    sanity_check(args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes); "
          f"{out['versions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
