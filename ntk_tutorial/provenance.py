"""Where a number came from: package versions and the source tree's git state.

Every saved figure (:func:`ntk_tutorial.plotting.save_figure`), every active-learning record
(``ntk_tutorial.active.run``) and ``ntk-tutorial info`` carry :func:`record`: the versions of
the packages that compute the numbers and, when the package runs from a git checkout, the commit
and whether the tree had uncommitted changes (``dirty``), so a result can be traced to the code
that made it.  Installed from a wheel there is no checkout: ``commit`` and ``dirty`` are
``None``.  Imports no JAX.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = ("ntk-tutorial", "jax", "jaxlib", "flax", "optax", "numpy")
# what "dirty" looks at: the code and the notebooks, not the outputs they write (figures/,
# results/, build/), which a reproduction run itself changes
SOURCES = ("ntk_tutorial", "notebooks", "benchmarks", "scripts", "pyproject.toml")


def versions() -> dict[str, str]:
    """Versions of the packages that produce the numbers (stored with every figure/result)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


@lru_cache(maxsize=4)
def git_state(root: str | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout the package runs from (``root``:
    a folder inside it; default this package's folder), ``None`` for both outside a checkout or
    without git.  ``dirty``: a tracked file of the code or the notebooks (``SOURCES``) differs
    from the commit; untracked files and the outputs (figures, results) do not count.  Read once
    per process."""
    where = Path(root) if root is not None else Path(__file__).resolve().parent
    top = _git(where, "rev-parse", "--show-toplevel")
    if top is None:
        return {"commit": None, "dirty": None}
    top_path = Path(top.strip())
    if root is None and not (top_path / "ntk_tutorial" / "provenance.py").exists():
        return {"commit": None, "dirty": None}  # installed inside some other repository
    commit = _git(top_path, "rev-parse", "HEAD")
    status = _git(top_path, "status", "--porcelain", "--untracked-files=no", "--", *SOURCES)
    return {"commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip())}


def record() -> dict[str, Any]:
    """``{"versions": ..., "git": ...}``: what is stored beside every result."""
    return {"versions": versions(), "git": dict(git_state())}


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy/JAX arrays and scalars turned into lists and Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj
