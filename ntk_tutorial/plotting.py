"""Plot style, and saving figures together with the numbers behind them.

Every figure a notebook reproduces is written by :func:`save_figure` as ``NAME.png`` plus
``NAME.json`` (the plotted numbers, the seed, fast/full mode, package versions and git commit) into
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

from . import provenance
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


def save_figure(fig, name: str, data: dict | None = None, *, seed: Any = None,
                notebook: str | None = None) -> Path:
    """Save ``fig`` as ``NAME.png`` and ``data`` (the plotted numbers) as ``NAME.json``.

    Returns the PNG path.  The JSON also records ``seed``, the notebook, fast/full mode and
    package versions and git state (:mod:`ntk_tutorial.provenance`), so each figure can be traced
    to the run and the code that made it.
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
        **provenance.record(),
        "data": provenance.jsonable(data or {}),
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return png


# ---------------------------------------------------------------------------------------------
# the probability simplex of 3 classes
# ---------------------------------------------------------------------------------------------

# Corners of the triangle: class 0 bottom left, class 1 bottom right, class 2 on top.
SIMPLEX_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3.0) / 2.0]])


def simplex_xy(p) -> np.ndarray:
    """Cartesian coordinates of 3-class distributions ``p`` (``(..., 3)``) in the triangle.

    ``p`` is a barycentric coordinate: ``xy = p @ SIMPLEX_CORNERS``, so ``e_0, e_1, e_2`` map to
    the corners and the uniform distribution to the centroid.  Distances are kept up to a
    constant: ``|xy(p) - xy(q)| = ||p - q||_2 / sqrt(2)`` for distributions ``p, q``.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.shape[-1] != 3:
        raise ValueError(f"simplex plots show 3 classes: the last axis must have length 3, got {p.shape}")
    return p @ SIMPLEX_CORNERS


def moving_average(values, window: int) -> np.ndarray:
    """Centred moving average over the first axis, same length; ends padded with edge values."""
    values = np.asarray(values, dtype=np.float64)
    window = int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1:
        return values
    lo, hi = (window - 1) // 2, window // 2
    padded = np.concatenate([np.repeat(values[:1], lo, 0), values, np.repeat(values[-1:], hi, 0)])
    csum = np.cumsum(np.concatenate([np.zeros_like(values[:1]), padded]), axis=0)
    return (csum[window:] - csum[:-window]) / window


def simplex(paths=None, *, p_star=None, labels=None, ax=None, colors=None,
            class_names=("class 0", "class 1", "class 2"), names=None, markersize=4.0,
            alpha=1.0, grid: bool = True, key: bool = False, smooth: int = 1):
    """Draw learning paths of 3-class predictions on the probability simplex (a triangle).

    Each path is drawn as a line through its points with small dots, a hollow circle where it
    starts and a filled circle where it ends; its sample's true posterior ``p*`` as a star and
    its (possibly wrong) label as a large ring on the label's corner, all in the path's colour
    (rings grow with the path's index, so that several labels on one corner stay visible).

    Args:
      paths: one path ``(T, 3)`` or several ``(m, T, 3)`` (probabilities at ``T`` times), or
        ``None`` for the bare triangle.
      p_star: ``(3,)`` or ``(m, 3)``: the true ``p*(y|x)`` of each path's sample.
      labels: an int or ``(m,)`` ints: the training label of each sample.
      ax: axes to draw into (a new figure when ``None``).
      colors: one colour per path (default: the style's colour cycle).
      class_names: text at the three corners.
      names: legend text per path (no legend when ``None``).
      markersize, alpha: of the path dots and lines.
      grid: faint lines at probabilities 0.2, 0.4, 0.6, 0.8 of each class.
      key: add a legend explaining the markers (start, end, p*, label).
      smooth: if above 1, the line is a centred moving average over this many records (the
        ends padded with the first and last record) and every record is a faint dot: SGD
        makes paths jitter from record to record, and this shows their trend.  Start and end
        markers stay at the recorded start and end.
    Returns:
      the axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 4.2))
    corners = SIMPLEX_CORNERS
    ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.3", lw=1.0, zorder=1)
    if grid:
        for level in (0.2, 0.4, 0.6, 0.8):
            for c in range(3):
                a, b = [j for j in range(3) if j != c]
                ends = np.zeros((2, 3))
                ends[:, c] = level
                ends[0, a] = ends[1, b] = 1 - level
                ax.plot(*simplex_xy(ends).T, color="0.85", lw=0.6, zorder=0)
    offsets = np.array([[-0.04, -0.05], [0.04, -0.05], [0.0, 0.04]])
    aligns = ("right", "left", "center")
    for c in range(3):
        ax.text(*(corners[c] + offsets[c]), class_names[c], ha=aligns[c], va="center", fontsize=10)
    if paths is not None:
        paths = np.asarray(paths, dtype=np.float64)
        single = paths.ndim == 2
        paths = paths[None] if single else paths
        if paths.ndim != 3:
            raise ValueError(f"paths must be (T, 3) or (m, T, 3), got shape {paths.shape}")
        m = paths.shape[0]
        cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        colors = [cycle[i % len(cycle)] for i in range(m)] if colors is None else list(colors)
        stars = None if p_star is None else np.asarray(p_star, np.float64).reshape(m, 3)
        labs = None if labels is None else np.asarray(labels).reshape(m)
        for i in range(m):
            xy = simplex_xy(paths[i])
            line, dots = xy, alpha
            if smooth > 1:
                line = simplex_xy(moving_average(paths[i], smooth))
                dots = 0.3 * alpha
            ax.plot(line[:, 0], line[:, 1], "-", color=colors[i], lw=1.2 if smooth <= 1 else 1.8,
                    alpha=alpha, zorder=3, label=None if names is None else names[i])
            ax.plot(xy[:, 0], xy[:, 1], ".", color=colors[i], ms=markersize, alpha=dots, zorder=3)
            ax.plot(*xy[0], "o", mfc="white", mec=colors[i], ms=6, zorder=4)
            ax.plot(*xy[-1], "o", color=colors[i], ms=6, zorder=4)
            if stars is not None:
                ax.plot(*simplex_xy(stars[i]), "*", color=colors[i], mec="k", mew=0.6, ms=14, zorder=5)
            if labs is not None:
                ax.plot(*corners[int(labs[i])], "o", mfc="none", mec=colors[i], mew=1.5,
                        ms=14 + 5 * i % 20, zorder=2)
    handles = []
    if paths is not None and names is not None:
        handles = ax.get_legend_handles_labels()[0]
    if key:
        from matplotlib.lines import Line2D

        handles += [
            Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", label="start"),
            Line2D([], [], ls="", marker="o", color="0.3", label="end"),
            Line2D([], [], ls="", marker="*", color="0.5", mec="k", ms=12, label="p*(y|x)"),
            Line2D([], [], ls="", marker="o", mfc="none", mec="0.3", ms=12, label="label"),
        ]
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False)
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.1, np.sqrt(3) / 2 + 0.08)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax
