"""Kernels split over several devices, and kernels written to disk block by block."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
    one = _run(tmp_path / "one.npz", 1)
    eight = _run(tmp_path / "eight.npz", 8)
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
    x = jax.random.normal(jax.random.key(4), (12, 5), dtype=jnp.float64)
    monkeypatch.setenv(kernels.MEMORY_ENV, "1000")
    with pytest.raises(kernels.KernelTooLargeError, match=r"out='kernel\.npy'"):
        kernels.pntk(apply_fn, params, x)
    disk = kernels.pntk(apply_fn, params, x, out=tmp_path / "k.npy")  # the disk route works
    assert disk.shape == (12, 12)
    with pytest.raises(ValueError, match="does not exist"):
        kernels.pntk(apply_fn, params, x, out=tmp_path / "missing" / "k.npy")
