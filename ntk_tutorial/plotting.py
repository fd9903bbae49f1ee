"""Plot style, and saving figures together with the numbers behind them.

Every figure a notebook reproduces is written by :func:`save_figure` as ``NAME.png`` plus
``NAME.json`` (the plotted numbers, the seed, fast/full mode and package versions) into
:func:`figures_dir`.  Full-mode runs write into the repository's ``figures/``; fast-mode runs
(CI, ``--fast``) write into ``figures/fast/`` so that they never overwrite the reproduced figures.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .config import is_fast

FIGURES_ENV = "NTK_TUTORIAL_FIGURES"


def use_style() -> None:
    """Apply the package's matplotlib style (``styles/ntk_tutorial.mplstyle``)."""
    import matplotlib.pyplot as plt

    plt.style.use(str(resources.files("ntk_tutorial") / "styles" / "ntk_tutorial.mplstyle"))


def _repo_figures() -> Path:
    cwd = Path.cwd()
    for base in (cwd, *cwd.parents):
        if (base / "notebooks").is_dir() and (base / "ntk_tutorial").is_dir():
            return base / "figures"
    return cwd / "figures"


def figures_dir() -> Path:
    """Where figures go: ``$NTK_TUTORIAL_FIGURES`` if set, else the repository's ``figures/``
    (``figures/fast/`` in fast mode).  Created if missing."""
    env = os.environ.get(FIGURES_ENV)
    path = Path(env) if env else _repo_figures()
    if is_fast() and not env:
        path = path / "fast"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj


def versions() -> dict[str, str]:
    """Versions of the packages that produce the numbers (stored with every figure/result)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ntk-tutorial", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_figure(fig, name: str, data: dict | None = None, *, seed: Any = None,
                notebook: str | None = None) -> Path:
    """Save ``fig`` as ``NAME.png`` and ``data`` (the plotted numbers) as ``NAME.json``.

    Returns the PNG path.  The JSON also records ``seed``, the notebook, fast/full mode and
    package versions, so each figure can be traced to the run that made it.
    """
    if not name or "/" in name or name.endswith((".png", ".json")):
        raise ValueError(f"name must be a bare file stem like 'lazy_training', got {name!r}")
    out = figures_dir()
    png = out / f"{name}.png"
    fig.savefig(png)
    meta = {
        "figure": name,
        "notebook": notebook,
        "seed": seed,
        "mode": "fast" if is_fast() else "full",
        "versions": versions(),
        "data": _jsonable(data or {}),
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return png
