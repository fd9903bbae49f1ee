"""Independent references the unit tests compare against (no code shared with the package), and
small fixtures several test modules use."""

import contextlib
import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from ntk_tutorial import models


@functools.lru_cache(maxsize=64)
def _jacobian_fn(apply_fn):
    return jax.jit(jax.jacrev(apply_fn))


def flat_jacobian(apply_fn, params, x):
    """(n, k, P) Jacobian through jax.jacrev, its leaves raveled in ravel_pytree's order
    (jitted once per apply_fn: the eager version made the property tests 6x slower)."""
    try:
        hash(apply_fn)
    except TypeError:  # an unhashable apply_fn: jacrev on the raveled parameter vector, eagerly
        flat, unravel = ravel_pytree(params)
        return jax.jacrev(lambda w: apply_fn(unravel(w), x))(flat)
    leaves = jax.tree.leaves(_jacobian_fn(apply_fn)(params, x))
    n, k = x.shape[0], leaves[0].shape[1]
    return jnp.concatenate([leaf.reshape(n, k, -1) for leaf in leaves], axis=2)


def reference_entk(apply_fn, params, x1, x2=None):
    x2 = x1 if x2 is None else x2
    j1, j2 = flat_jacobian(apply_fn, params, x1), flat_jacobian(apply_fn, params, x2)
    return jnp.einsum("aip,bjp->abij", j1, j2)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def mlp(widths, seed=0, dtype=jnp.float64, **kw):
    model = models.MLP(widths, rngs=nnx.Rngs(params=jax.random.key(seed)), **kw)
    apply_fn, params = models.functional(model)
    return apply_fn, jax.tree.map(lambda a: a.astype(dtype), params)


@contextlib.contextmanager
def lock_held_elsewhere(path):
    """Another process holds the runner's lock on the results file ``path`` while the block runs;
    yields that process's id."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from ntk_tutorial.active.run import RunLock
        with RunLock({str(path)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)


def write_notebook(path, sources):
    """A Python 3 notebook at ``path`` whose code cells are ``sources``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
