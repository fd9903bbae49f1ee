"""Every benchmark script runs in --quick mode, writes its JSON, and exits non-zero when a
measurement fails (benchmarks print ratios; tests never assert on wall-clock time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("kernels.py", "conv_kernels.py", "lookahead.py", "active.py", "presets.py")


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, capture_output=True,
                          text=True, timeout=timeout)


def test_every_benchmark_script_is_tested():
    assert sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py") == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs_and_writes_json(script, tmp_path):
    out = tmp_path / "result.json"
    res = run(script, "--quick", "--output", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["quick"] is True and "machine" in payload
    assert "all measurements ran" in res.stdout


def test_a_failed_measurement_exits_non_zero(tmp_path):
    res = run("active.py", "--quick", "--strategies", "random", "no-such-strategy",
              "--output", str(tmp_path / "a.json"))
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "no-such-strategy" in res.stdout


def test_the_neural_tangents_side_rebuilds_the_same_network():
    """``conv_kernels.py --nt-python`` times neural-tangents on a plain-JAX copy of each network
    (``scripts/nt_conv_reference.py``, run in the legacy environment); here, without
    neural-tangents, that copy must give the package's CNN and WideResNet outputs from the
    parameters and statistics the benchmark hands over (float64, to round-off)."""
    import importlib.util

    import jax
    import numpy as np

    from ntk_tutorial import models

    sys.path.insert(0, str(BENCH))
    try:
        import conv_kernels as ck
    finally:
        sys.path.remove(str(BENCH))
    path = BENCH.parent / "scripts" / "nt_conv_reference.py"
    spec = importlib.util.spec_from_file_location("nt_conv_reference", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    with jax.enable_x64(True):
        for name in ("cnn", "wrn-10-2"):
            apply_fn, params, stats, shape, _ = ck.build(name)
            cast = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
            params = cast(params)
            if stats is not None:
                # statistics away from (0, 1), so that a wrong mean/variance mapping shows
                stats = jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.3, stats)
            strides = [] if name == "cnn" else [int(b.conv1.strides[0]) for b in ck._model(name)[0].layers]
            tree = ref._unflatten({k[len("param/"):]: v for k, v in ck._flat(params, "param/").items()})
            stat_tree = ref._unflatten({k[len("stat/"):]: v for k, v in ck._flat(stats, "stat/").items()}) \
                if stats is not None else {}
            f = ref._network("cnn" if name == "cnn" else "wrn", shape, stat_tree, strides)
            x = np.asarray(jax.random.normal(jax.random.key(5), (3, int(np.prod(shape))), dtype=np.float64))
            want = np.asarray(models.call(apply_fn, params, x, stats))
            np.testing.assert_allclose(np.asarray(f(tree, x)), want, rtol=1e-10, atol=1e-12, err_msg=name)
