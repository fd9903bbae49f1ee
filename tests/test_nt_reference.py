"""Our kernels against numbers written by neural-tangents 0.6.5 (scripts/nt_reference.py).

neural-tangents does not import with current jax; the file was produced once in the pinned
legacy environment of environment-nt.yml and is read here with plain numpy.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_tutorial import kernels, models
from helpers import rel_err

REF = np.load(Path(__file__).parent / "data" / "nt_reference.npz")
CASES = [str(c) for c in REF["cases"]]


def _case(name):
    get = lambda field: REF[f"{name}/{field}"]  # noqa: E731
    depth = int(get("depth"))
    cfg = dict(activation=str(get("activation")), depth=depth, width=int(get("width")),
               k=int(get("k")), w_std=float(get("w_std")), b_std=float(get("b_std")))
    layers = [(get(f"W{l}"), get(f"b{l}")) for l in range(depth + 1)]
    return cfg, layers, get


def _our_mlp(cfg, layers):
    """models.MLP with neural-tangents' parameters poured in."""
    d = REF["x1"].shape[1]
    model = models.MLP((d,) + (cfg["width"],) * cfg["depth"] + (cfg["k"],), activation=cfg["activation"],
                       w_std=cfg["w_std"], b_std=cfg["b_std"], rngs=nnx.Rngs(0))
    apply_fn, params = models.functional(model)
    for l, (w, b) in enumerate(layers):
        params["layers"][l]["w"] = jnp.asarray(w)
        params["layers"][l]["b"] = jnp.asarray(b)
    return apply_fn, params


def test_reference_file_is_complete():
    assert len(CASES) >= 4
    assert "neural_tangents=0.6.5" in str(REF["versions"])
    assert {"relu", "erf"} <= {str(REF[f"{c}/activation"]) for c in CASES}


@pytest.mark.parametrize("name", CASES)
def test_outputs_and_empirical_kernels_match_neural_tangents(name):
    cfg, layers, get = _case(name)
    apply_fn, params = _our_mlp(cfg, layers)
    x1, x2 = jnp.asarray(REF["x1"]), jnp.asarray(REF["x2"])
    assert rel_err(apply_fn(params, x1), get("f1")) < 1e-10  # same parameterisation
    for method in ("dense", "jacobian"):
        assert rel_err(kernels.entk(apply_fn, params, x1, x2, method=method), get("entk")) < 1e-10
        assert rel_err(kernels.entk(apply_fn, params, x1, method=method), get("entk_11")) < 1e-10
        assert rel_err(kernels.trace_ntk(apply_fn, params, x1, x2, method=method), get("trace_ntk")) < 1e-10


@pytest.mark.parametrize("name", CASES)
def test_infinite_width_kernels_match_neural_tangents(name):
    cfg, _, get = _case(name)
    kw = dict(depth=cfg["depth"], activation=cfg["activation"], w_std=cfg["w_std"], b_std=cfg["b_std"])
    x1, x2 = REF["x1"], REF["x2"]
    assert rel_err(kernels.infinite_ntk(x1, x2, **kw), get("inf_ntk")) < 1e-10
    assert rel_err(kernels.infinite_nngp(x1, x2, **kw), get("inf_nngp")) < 1e-10
    assert rel_err(kernels.infinite_ntk(x1, **kw), get("inf_ntk_11")) < 1e-10
    assert rel_err(kernels.infinite_nngp(x1, **kw), get("inf_nngp_11")) < 1e-10
