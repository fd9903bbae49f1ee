"""Run-time switches shared by the notebooks, the CLI and the tests.

The one switch that matters is *fast mode*: ``NTK_TUTORIAL_FAST=1`` makes every notebook use
small sizes so that the whole sequence runs in minutes on a laptop CPU (and in CI).  Notebooks
read it through :func:`pick` in their parameter cell::

    WIDTH = pick(full=2048, fast=64)
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

FAST_ENV = "NTK_TUTORIAL_FAST"
_FALSE = {"", "0", "false", "no", "off"}


def is_fast() -> bool:
    """True when ``NTK_TUTORIAL_FAST`` is set to anything but 0/false/no/off (read at call time)."""
    return os.environ.get(FAST_ENV, "0").strip().lower() not in _FALSE


def pick(full: T, fast: T) -> T:
    """Return ``fast`` in fast mode and ``full`` otherwise.

    ``full`` values are the ones that reproduce the papers' settings (the notebooks' prose says
    which); ``fast`` values keep the same code path but shrink every size.
    """
    return fast if is_fast() else full


def enable_x64() -> None:
    """Switch JAX to float64 by default.

    Kernel algebra (Cholesky solves, Schur complements, eigenvalues of ill-conditioned kernels)
    loses most of its digits in float32; the notebooks that need it call this first.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
