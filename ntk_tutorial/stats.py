"""One rule for intervals and paired comparisons across the package.

Every interval is the two-sided Student-t interval of a mean over independent seeds; every
comparison of two methods is *paired by seed* (the seeds share initial labels, initial network
and candidate subsets), so it is the t-interval of the per-seed differences.  A difference is
called *reproduced* (or *significant*) only when that interval excludes zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95


def t_halfwidth(values, axis: int = 0, level: float = LEVEL) -> np.ndarray:
    """Half-width of the ``level`` t-interval of the mean along ``axis`` (NaN for one value)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    n = v.shape[axis]
    if n < 2:
        return np.full(np.delete(v.shape, axis), np.nan) if v.ndim > 1 else np.float64(np.nan)
    return stats.t.ppf(0.5 + level / 2, n - 1) * v.std(axis=axis, ddof=1) / np.sqrt(n)


def t_interval(values, axis: int = 0, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, half-width)`` of the ``level`` t-interval along ``axis``."""
    v = np.asarray(values, np.float64)
    return v.mean(axis=axis), t_halfwidth(v, axis, level)


@dataclass(frozen=True)
class Paired:
    """A paired comparison ``a - b`` over seeds.

    Attributes:
      mean, half_width: mean difference and the half-width of its t-interval.
      low, high: the interval.
      n: number of seeds; wins: seeds with ``a > b``; ties: seeds with ``a == b``.
      p_value: two-sided paired t-test (NaN for one seed or zero spread).
      level: the interval's confidence level.
    """

    mean: float
    half_width: float
    low: float
    high: float
    n: int
    wins: int
    ties: int
    p_value: float
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return bool(np.isfinite(self.half_width) and (self.low > 0 or self.high < 0))

    @property
    def verdict(self) -> str:
        """``"a better"``, ``"b better"`` or ``"no difference shown"`` (the interval's word)."""
        if not self.excludes_zero:
            return "no difference shown"
        return "a better" if self.mean > 0 else "b better"

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def __str__(self) -> str:
        return (f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({int(self.level * 100)}% t, "
                f"n={self.n}, a>b in {self.wins}/{self.n})")


def paired(a, b, level: float = LEVEL) -> Paired:
    """Paired comparison of per-seed values ``a`` and ``b`` (same seeds, same order)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values need the same non-zero number of seeds, got {a.size} and {b.size}")
    d = a - b
    mean, half = float(d.mean()), float(t_halfwidth(d, 0, level))
    p = float(stats.ttest_rel(a, b).pvalue) if a.size > 1 and d.std() > 0 else float("nan")
    return Paired(mean, half, mean - half, mean + half, int(a.size), int(np.sum(d > 0)),
                  int(np.sum(d == 0)), p, level)
