"""Kernels split over several devices, and kernels written to disk block by block."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tutorial import kernels
from helpers import mlp

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from flax import nnx
    from ntk_tutorial import kernels, models
    assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
    model = models.MLP((5, 16, 16, 3), param_dtype=jnp.float64, rngs=nnx.Rngs(params=jax.random.key(0)))
    fn, p = models.functional(model)
    cnn_fn, cp = models.functional(models.CNN((2, 2, 2), 3, channels=4, depth=1, rngs=nnx.Rngs(1)))
    cp = jax.tree.map(lambda a: a.astype(jnp.float64), cp)
    x = jax.random.normal(jax.random.key(1), (13, 5), dtype=jnp.float64)
    xc = jax.random.normal(jax.random.key(2), (11, 8), dtype=jnp.float64)
    out = dict(
        entk=kernels.entk(fn, p, x), pntk=kernels.pntk(fn, p, x, x[:6], batch_size=4),
        trace=kernels.trace_ntk(fn, p, x, method="jacobian"),
        cnn=kernels.entk(cnn_fn, cp, xc, batch_size=5),
    )
    before = kernels.gradient_evaluations()
    out["cnn_xy"] = kernels.pntk(cnn_fn, cp, xc, xc[:7] + 1.0, batch_size=3)  # stream, not symmetric
    out["cnn_pntk"] = kernels.pntk(cnn_fn, cp, xc)  # features route
    routes = [kernels.plan_kernel(kind, cnn_fn, cp, xc, y, batch_size=b, costs=False).route
              for kind, y, b in (("entk", None, 5), ("pntk", xc[:7], 3), ("pntk", None, None))]
    assert routes == ["stream", "stream", "features"], routes
    out["evaluations"] = np.array([kernels.gradient_evaluations() - before])
    np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in out.items()})
""")


def _run(path, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(devices)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(path)


def test_kernels_sharded_over_eight_devices_equal_one_device(tmp_path):
    """Gradient passes and products split over eight devices give the one-device kernel, on the
    dense, features and stream routes, and still compute each per-example gradient once (11 + 7
    gradients for the kernel of two sets, 11 for the symmetric one; issue 17: the several-device
    route used to recompute them per block pair)."""
    one = _run(tmp_path / "one.npz", 1)
    eight = _run(tmp_path / "eight.npz", 8)
    assert int(one["evaluations"][0]) == int(eight["evaluations"][0]) == 11 + 7 + 11
    for name in one.files:
        np.testing.assert_allclose(eight[name], one[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_kernel_written_to_a_memory_mapped_file(tmp_path):
    apply_fn, params = mlp((5, 16, 16, 3))
    x = jax.random.normal(jax.random.key(3), (9, 5), dtype=jnp.float64)
    path = tmp_path / "theta.npy"
    disk = kernels.entk(apply_fn, params, x, out=path, batch_size=4)
    assert isinstance(disk, np.memmap) and disk.shape == (9, 9, 3, 3)
    np.testing.assert_allclose(np.load(path), kernels.entk(apply_fn, params, x), rtol=1e-12)
    loaded = np.load(path, mmap_mode="r")  # consumers read it in blocks
    np.testing.assert_allclose(loaded[2:5], disk[2:5])


def test_memory_guard_names_the_disk_route(tmp_path, monkeypatch):
    apply_fn, params = mlp((5, 8, 3))
    x = jax.random.normal(jax.random.key(4), (400, 5), dtype=jnp.float64)
    # 1 MB: the 1.28 MB kernel does not fit, its 50 x 50 blocks do (the disk route checks those)
    monkeypatch.setenv(kernels.MEMORY_ENV, str(10**6))
    with pytest.raises(kernels.KernelTooLargeError, match=r"out='kernel\.npy'"):
        kernels.pntk(apply_fn, params, x)
    disk = kernels.pntk(apply_fn, params, x, out=tmp_path / "k.npy", batch_size=50)  # the disk route works
    assert disk.shape == (400, 400)
    with pytest.raises(kernels.KernelTooLargeError, match="smaller batch_size"):
        kernels.pntk(apply_fn, params, x, out=tmp_path / "k2.npy", batch_size=400)
    with pytest.raises(ValueError, match="does not exist"):
        kernels.pntk(apply_fn, params, x, out=tmp_path / "missing" / "k.npy")


def test_lookahead_reads_a_kernel_on_disk_block_by_block(tmp_path):
    """The pool kernel written by ``out=`` feeds ``posterior_change`` without being loaded whole."""
    import tracemalloc

    from ntk_tutorial import lookahead

    apply_fn, params = mlp((5, 32, 3))
    n, m = 10, 600
    x = jax.random.normal(jax.random.key(5), (n + m, 5), dtype=jnp.float32)
    k_all = np.asarray(kernels.pntk(apply_fn, params, x), np.float64)
    f = np.asarray(apply_fn(params, x), np.float64)
    y = np.eye(3)[np.arange(n) % 3]
    proxy = lookahead.fit_proxy(k_all[:n, :n], y, f[:n])
    pool_path = tmp_path / "pool.npy"
    written = kernels.pntk(apply_fn, params, x[n:], out=pool_path, batch_size=128)
    np.testing.assert_allclose(written, k_all[n:, n:], rtol=1e-4, atol=1e-5)
    np.save(pool_path, np.asarray(written, np.float32))  # float32 on disk, as a GPU run writes it
    on_disk = np.load(pool_path, mmap_mode="r")
    labels = lookahead.pseudo_labels(f[n:])
    in_memory = lookahead.posterior_change(proxy, k_all[n:, :n], k_all[n:, n:], f[n:], labels, reduce="l2",
                                           block_size=50)
    tracemalloc.start()
    blocked = lookahead.posterior_change(proxy, k_all[n:, :n], on_disk, f[n:], labels, reduce="l2",
                                         block_size=50)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(blocked, in_memory, rtol=1e-4)
    assert peak < m * m * 8 / 2, f"peak {peak} bytes: the {m}x{m} kernel was loaded whole"
