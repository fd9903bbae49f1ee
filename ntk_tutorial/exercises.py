"""Checks for the notebooks' exercises.

Every solution cell ends in one of these, and a reader's own attempt can call the same check.
They raise :class:`ExerciseMismatch` with what differs (never a bare ``assert``, which
``python -O`` would skip), and print one line when the answer is right. The claims of the
lessons go through :mod:`ntk_tutorial.claims`; exercises are not claims and stay out of the
ledger.
"""

from __future__ import annotations

import numpy as np


class ExerciseMismatch(ValueError):
    """An exercise's answer differs from the expected one; the message says by how much."""


def check_close(got, want, *, rtol: float = 1e-6, what: str = "your answer") -> float:
    """Check ``got`` against ``want`` to relative tolerance ``rtol`` (max-abs difference over
    max-abs of ``want``); returns that relative difference."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ExerciseMismatch(f"{what}: shape {got.shape}, expected {want.shape}")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    rel = diff / scale if scale > 0 else diff
    if not np.isfinite(rel) or rel > rtol:
        raise ExerciseMismatch(f"{what}: relative difference {rel:.2e} is above {rtol:g}; compare your steps "
                               "with the text")
    print(f"{what}: right (relative difference {rel:.1e})")
    return rel


def check_that(condition: bool, message: str) -> None:
    """Raise :class:`ExerciseMismatch` with ``message`` unless ``condition`` holds; else print it."""
    if not bool(condition):
        raise ExerciseMismatch(f"not as expected: {message}")
    print(f"as expected: {message}")
