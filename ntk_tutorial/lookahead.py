"""Look-ahead: approximating retraining through the eNTK (Mohamadi, Bae & Sutherland 2022).

A network ``f_L`` (parameters ``theta_L``) has been trained on the labelled set ``L = (X, Y)``.
Linearise it at ``theta_L`` and train the linear model on ``L+ = L u {(x', y')}`` with square
loss to convergence: the result is kernel regression on the residuals (Eq. 11 of Mohamadi, Bae &
Sutherland 2022)::

    f_L+(x) = f_L(x) + Theta(x, X+) Theta(X+, X+)^{-1} (Y+ - f_L(X+))

with ``Theta`` the eNTK at ``theta_L``.  Everything here takes *kernel arrays*, computed by
:mod:`ntk_tutorial.kernels` or any other way, in one of two forms:

* the full eNTK, ``(n1, n2, k, k)``: the system has ``n k`` unknowns (``kernels.as_matrix``);
* a scalar kernel, ``(n1, n2)`` (pNTK, trace kernel, infinite NTK, ...), used as
  ``Theta_hat (x) I_k``: one ``n x n`` system solved for all ``k`` outputs at once.

Write ``N`` for the size of the system (``n k`` or ``n``) and ``k`` for the outputs.

==============================  ============================================================
:func:`kernel_regression`       ``f_test + K(x,X) (K(X,X) + ridge I)^{-1} (Y - f_train)``
:func:`fit_proxy`               factorise once (Cholesky, :class:`Proxy`); predict many times
:func:`lookahead_predictions`   Eq. (11) for one candidate (or a set), by a direct solve on ``L+``
:func:`schur_update`            the same through the block (Schur complement) update of Eq. (12)
:func:`posterior_change`        Eq. (12) for every candidate of a pool at once, blockwise, from
                                the posterior covariance ``C = Theta(U,U) - Theta(U,X) K^{-1} Theta(X,U)``
:func:`sequential_update`       add labelled point(s) to a :class:`Proxy` in ``O(N^2)``
:func:`total_l2_change`,        reductions of a change for look-ahead scores: the MLMOC sum of L2
:func:`label_flips`             norms (Eq. 13) and the count of flipped arg-max predictions
:func:`pseudo_labels`           one-hot arg-max labels (MLMOC's assumed label of a candidate)
:func:`cholesky_with_jitter`    the factorisation with the smallest jitter that works
==============================  ============================================================

Precision and where it runs: the algebra runs on the host in float64 with NumPy/SciPy (LAPACK),
whatever precision the kernels were computed in (the released code of the paper works in float64
too): kernel matrices are often badly conditioned and float32 loses most digits in the solves.
These are dense solves of modest size (``N`` up to a few thousand), for which LAPACK is as fast
as XLA on a CPU and needs no compilation per shape.  Results are NumPy arrays.

Positive definiteness: ``K + ridge I`` is factorised by Cholesky.  When that fails in the working
precision (a kernel that is only positive *semi*-definite, or a few tiny negative eigenvalues from
round-off), the smallest jitter that makes it succeed is added to the diagonal, starting from
``1.1 max(-lambda_min, N eps lambda_max)`` (the released code adds ``1.1 max(-lambda_min, 1e-6)``)
and reported as ``Proxy.jitter`` / ``SolveInfo.jitter``.  A matrix that needs a jitter above
``MAX_RELATIVE_JITTER * lambda_max`` is not a kernel matrix and raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import scipy.linalg

# A kernel matrix whose negative eigenvalues exceed this fraction of its largest one is not
# positive semi-definite up to round-off: something upstream is wrong.
MAX_RELATIVE_JITTER = 1e-4
# Relative asymmetry tolerated (and removed by symmetrising) in a kernel matrix.
MAX_RELATIVE_ASYMMETRY = 1e-4
# Memory a block of posterior_change may use when block_size is not given.
_BLOCK_BYTES = 256 * 2**20
DTYPE = np.float64


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolveInfo:
    """How a kernel system was solved.

    Attributes:
      jitter: added to the diagonal on top of ``ridge`` to make the Cholesky factorisation
        succeed (0.0 when ``K + ridge I`` was positive definite in float64).
      ridge: the ridge that was asked for.
      size: ``N``, the number of unknowns (``n k`` for the full eNTK, ``n`` for a scalar kernel).
    """

    jitter: float
    ridge: float
    size: int


@dataclass(frozen=True)
class Proxy:
    """The linearised network retrained on ``L`` to convergence: kernel regression on residuals.

    ``f_lin_L(x) = f_L(x) + K(x, X) alpha`` with ``alpha = (K + (ridge + jitter) I)^{-1} (Y - f_L(X))``.
    Built by :func:`fit_proxy`, grown by :func:`sequential_update`; used by :func:`schur_update`
    and :func:`posterior_change`.

    Attributes:
      kernel: ``(N, N)`` matrix form of ``K(X, X)`` (symmetrised, without ridge or jitter).
      chol: ``(N, N)`` lower Cholesky factor of ``kernel + (ridge + jitter) I``.
      residual: ``(n, k)`` ``Y - f_L(X)``.
      alpha: ``(n, k)`` the regression coefficients (example-major, like ``residual``).
      ridge, jitter: the diagonal added is ``ridge + jitter`` (see :class:`SolveInfo`).
      scalar: True for a scalar kernel used as ``Theta_hat (x) I_k``, False for the full eNTK.
    """

    kernel: np.ndarray
    chol: np.ndarray
    residual: np.ndarray
    alpha: np.ndarray
    ridge: float
    jitter: float
    scalar: bool

    @property
    def n(self) -> int:
        """Number of labelled points."""
        return int(self.residual.shape[0])

    @property
    def k(self) -> int:
        """Number of outputs."""
        return int(self.residual.shape[1])

    @property
    def shift(self) -> float:
        """``ridge + jitter``: what is added to the kernel's diagonal."""
        return float(self.ridge + self.jitter)

    @property
    def info(self) -> SolveInfo:
        return SolveInfo(float(self.jitter), float(self.ridge), int(self.kernel.shape[0]))

    def predict(self, k_test_train: Any, f_test: Any | None = None) -> np.ndarray:
        """``f_test + K(x, X) alpha``: the linearised network trained on ``L``, ``(t, k)``.

        Args:
          k_test_train: ``(t, n)`` (scalar kernel) or ``(t, n, k, k)`` (eNTK).
          f_test: ``(t, k)`` network outputs at ``theta_L`` (``None``: zeros, plain kernel
            regression).

        Cost ``O(t n k^2)`` (eNTK) or ``O(t n k)`` (scalar kernel).
        """
        k_tn = _cross(self, _arr(k_test_train, "k_test_train"), "k_test_train", rows=None)
        t = k_tn.shape[0] // (1 if self.scalar else self.k)
        f_test = _outputs(f_test, t, self.k, "f_test")
        return f_test + _unrhs(self, k_tn @ _rhs(self, self.alpha), t)


# ---------------------------------------------------------------------------------------------
# validation and layout helpers
# ---------------------------------------------------------------------------------------------


def _arr(x: Any, name: str) -> np.ndarray:
    """As a float64 NumPy array (booleans and integers are cast); complex, string and object
    arrays raise ``TypeError``, NaN/inf ``ValueError``."""
    if x is None:
        raise ValueError(f"{name} is required")
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else np.dtype(dtype)
    if dtype.kind == "c":
        raise TypeError(f"{name} is complex; kernels, outputs and labels are real: pass x.real if the "
                        "imaginary part is zero")
    if dtype.kind not in "biuf" and not dtype.name.startswith(("bfloat", "float")):  # ml_dtypes floats
        raise TypeError(f"{name} must be a numeric array, got dtype {dtype} "
                        f"({type(x).__name__}); convert it with numpy.asarray(x, dtype=float)")
    a = np.asarray(x, dtype=DTYPE)
    if not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a)))
        raise ValueError(
            f"{name} contains {bad} NaN or infinite values; a kernel or output with NaN usually "
            "means the network diverged (lower the learning rate) or the inputs held NaN"
        )
    return a


def _outputs(f: Any, n: int, k: int, name: str) -> np.ndarray:
    """``(n, k)`` outputs/labels, zeros when ``None``."""
    if f is None:
        return np.zeros((n, k), DTYPE)
    f = _arr(f, name)
    if f.shape != (n, k):
        raise ValueError(
            f"{name} must have shape ({n}, {k}) (one row of k outputs per point), got {f.shape}"
            + ("; int class labels must be one-hot encoded first (ntk_tutorial.data.one_hot)"
               if f.ndim == 1 else "")
        )
    return f


def _matrix(kab: np.ndarray) -> np.ndarray:
    """``(a, b, k, k)`` -> ``(a k, b k)`` example-major (as ``kernels.as_matrix``)."""
    a, b, k1, k2 = kab.shape
    return kab.transpose(0, 2, 1, 3).reshape(a * k1, b * k2)


def _train_kernel(k_train: np.ndarray) -> tuple[np.ndarray, bool, int, int | None]:
    """Matrix form, scalar?, n, k (None for a scalar kernel)."""
    if k_train.ndim == 2 and k_train.shape[0] == k_train.shape[1]:
        return k_train, True, k_train.shape[0], None
    if k_train.ndim == 4 and k_train.shape[0] == k_train.shape[1] and k_train.shape[2] == k_train.shape[3]:
        return _matrix(k_train), False, k_train.shape[0], k_train.shape[2]
    raise ValueError(
        "k_train must be (n, n) (a scalar kernel used as Theta_hat (x) I_k) or (n, n, k, k) (the "
        f"full eNTK, as ntk_tutorial.kernels.entk returns), got shape {k_train.shape}"
    )


def _symmetrise(matrix: np.ndarray, name: str) -> np.ndarray:
    if not matrix.size:
        return matrix
    scale = float(np.max(np.abs(matrix)))
    asym = float(np.max(np.abs(matrix - matrix.T)))
    if asym > MAX_RELATIVE_ASYMMETRY * max(scale, 1e-300):
        raise ValueError(
            f"{name} is not symmetric (largest |K - K^T| is {asym / scale:.1e} of the largest "
            "entry); pass the kernel of the points with themselves, in the same order on both sides"
        )
    return 0.5 * (matrix + matrix.T)


class _Flags:
    def __init__(self, scalar: bool, k: int, n: int):
        self.scalar, self.k, self.n = scalar, k, n


def _cross(p, k_ab: np.ndarray, name: str, rows: int | None, cols: int | None = None) -> np.ndarray:
    """Matrix form of a cross kernel ``(a, b[, k, k])`` -> ``(a, b)`` or ``(a k, b k)``."""
    cols = p.n if cols is None else cols
    want = "(a, b)" if p.scalar else f"(a, b, {p.k}, {p.k})"
    ok = k_ab.ndim == 2 if p.scalar else (k_ab.ndim == 4 and k_ab.shape[2:] == (p.k, p.k))
    ok = ok and k_ab.shape[1] == cols and (rows is None or k_ab.shape[0] == rows)
    if not ok:
        kind = "a scalar kernel" if p.scalar else "the full eNTK"
        raise ValueError(
            f"{name} must have shape {want} with b = {cols}"
            + (f", a = {rows}" if rows is not None else "")
            + f" to match the labelled set's {kind}, got {k_ab.shape}"
        )
    return k_ab if p.scalar else _matrix(k_ab)


def _rhs(p, y: np.ndarray) -> np.ndarray:
    """``(n, k)`` -> right-hand side: ``(n, k)`` (scalar kernel) or ``(n k, 1)`` (eNTK)."""
    return y if p.scalar else y.reshape(-1, 1)


def _unrhs(p, z: np.ndarray, n: int) -> np.ndarray:
    return z if p.scalar else z.reshape(n, p.k)


# ---------------------------------------------------------------------------------------------
# Cholesky with the smallest jitter that works
# ---------------------------------------------------------------------------------------------


def _try_cholesky(a: np.ndarray) -> np.ndarray | None:
    try:
        return scipy.linalg.cholesky(a, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def cholesky_with_jitter(matrix: Any, ridge: float = 0.0) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of ``matrix + (ridge + jitter) I`` and the jitter used.

    ``jitter`` is 0 when ``matrix + ridge I`` is positive definite in float64.  Otherwise it
    starts at ``1.1 max(-lambda_min, N eps lambda_max)`` (one eigendecomposition, ``O(N^3)``) and
    grows tenfold until the factorisation succeeds.

    Raises:
      ValueError: ``ridge < 0``, or the matrix is far from positive semi-definite (its most
        negative eigenvalue is more than ``MAX_RELATIVE_JITTER`` times its largest).
    """
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    a = np.array(matrix, dtype=DTYPE)
    size = a.shape[0]
    diag = np.diag_indices(size)
    a[diag] += ridge
    chol = _try_cholesky(a)
    if chol is not None:
        return chol, 0.0
    eig = np.linalg.eigvalsh(a)
    lam_min, lam_max = float(eig[0]), float(eig[-1])
    if not lam_max > 0:
        raise ValueError(
            f"the kernel matrix (size {size}) has no positive eigenvalue (largest {lam_max:.3g}); "
            "it is zero or negative definite, not a kernel matrix"
        )
    limit = MAX_RELATIVE_JITTER * lam_max
    if -lam_min > limit:
        raise ValueError(
            f"the kernel matrix is indefinite beyond round-off: smallest eigenvalue {lam_min:.3g}, "
            f"largest {lam_max:.3g} (ratio {-lam_min / lam_max:.1e} > {MAX_RELATIVE_JITTER:g}). "
            "A kernel matrix (Gram matrix of gradients) is positive semi-definite: check that it "
            "was computed on the same points on both sides; pass ridge= to regularise"
        )
    jitter = 1.1 * max(-lam_min, size * np.finfo(DTYPE).eps * lam_max)
    while jitter <= 10 * limit:
        b = a.copy()
        b[diag] += jitter
        chol = _try_cholesky(b)
        if chol is not None:
            return chol, float(jitter)
        jitter *= 10.0
    raise ValueError(  # pragma: no cover - only for pathological round-off
        f"Cholesky of the kernel matrix failed even with a jitter of {jitter / 10:.3g} "
        f"({MAX_RELATIVE_JITTER:g} of its largest eigenvalue); pass a larger ridge="
    )


def _cho_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    return scipy.linalg.cho_solve((chol, True), b, check_finite=False)


# ---------------------------------------------------------------------------------------------
# memory: the float64 algebra's peak, for the memory guard (kernels.check_memory)
# ---------------------------------------------------------------------------------------------


def fit_proxy_bytes(n: int, k: int, scalar: bool) -> int:
    """Peak bytes of :func:`fit_proxy` on ``n`` labelled points, besides its inputs: up to seven
    ``N x N`` float64 matrices at once (the float64 copy of the kernel, its matrix form,
    the symmetrisation's temporaries, the factorisation's copy and factor, an
    eigendecomposition when a jitter is needed).  ``N = n`` (scalar kernel) or ``n k``."""
    size = int(n) * (1 if scalar else int(k))
    return 8 * (7 * size * size + 4 * int(n) * int(k))


def _block_candidates(m: int, k: int, kk: int, c: int, block_bytes: int = _BLOCK_BYTES) -> int:
    """Candidates per block of :func:`posterior_change` / :func:`covariance_change` by default."""
    per_candidate = 8 * int(m) * int(k) * (2 + 2 * kk)
    return int(max(1, min(max(int(c), 1), block_bytes // max(per_candidate, 1))))


def posterior_change_bytes(n: int, m: int, k: int, scalar: bool, block_bytes: int = _BLOCK_BYTES) -> int:
    """Peak bytes of :func:`posterior_change` over a pool of ``m`` points (``n`` labelled, every
    pool point a candidate), besides its inputs: ``Theta(U, X)`` in matrix form and
    ``W = L^{-1} Theta(X, U)`` (``3 N M`` with the solver's copy), then the block of ``B``
    candidates in flight: for a scalar kernel its ``M x B`` posterior columns (three copies; the
    fused reductions never write the changes), for the eNTK the block's ``(B, m, k, k)`` kernel
    columns, their matrix form, the posterior columns and their product (four copies) and the
    ``(B, m, k)`` changes."""
    kk = 1 if scalar else int(k)
    size_n, size_m = int(n) * kk, int(m) * kk
    b = _block_candidates(m, k, kk, m, block_bytes)
    blocks = 8 * 4 * int(m) * b if scalar else 8 * b * int(m) * int(k) * (4 * kk + 2)
    return 8 * 3 * size_n * size_m + blocks + 8 * 6 * int(m) * int(k)


def pool_posterior_bytes(n: int, m: int, k: int, scalar: bool, block_bytes: int = _BLOCK_BYTES) -> int:
    """Peak bytes of :func:`pool_posterior` (and of conditioning it, :func:`condition`, and reading
    changes off it, :func:`covariance_change`), besides its inputs: three ``M x M`` float64
    matrices at once (the symmetrised pool kernel, ``W^T W`` and the covariance; conditioning
    holds the old and the new covariance and ``G^T G``), a fourth for the eNTK's matrix form, half
    a matrix of headroom, ``W`` (``N x M``) and a block of candidates.  ``M = m`` (scalar kernel)
    or ``m k``: sequential querying's ``PoolPosterior`` is ``M^2`` floats."""
    kk = 1 if scalar else int(k)
    size_n, size_m = int(n) * kk, int(m) * kk
    b = _block_candidates(m, k, kk, m, block_bytes)
    blocks = 8 * 4 * size_m * b if scalar else 8 * b * int(k) * size_m + 8 * 2 * b * int(m) * int(k)
    squares = 3.5 if scalar else 4.5
    return int(8 * (squares * size_m * size_m + 2 * size_n * size_m) + blocks)


# ---------------------------------------------------------------------------------------------
# kernel regression
# ---------------------------------------------------------------------------------------------


def fit_proxy(k_train: Any, y_train: Any, f_train: Any | None = None, *,
              ridge: float = 0.0) -> Proxy:
    """Factorise ``K(X, X) + ridge I`` once and solve for the residuals ``Y - f_train``.

    The linearised network trained on ``L`` to convergence (square loss, no ridge) is
    ``Proxy.predict``; :func:`schur_update`, :func:`posterior_change` and
    :func:`sequential_update` reuse the factorisation.

    Args:
      k_train: ``(n, n)`` scalar kernel or ``(n, n, k, k)`` eNTK on the labelled points.
      y_train: ``(n, k)`` targets (one-hot labels for classification).
      f_train: ``(n, k)`` network outputs at ``theta_L`` (``None``: zeros).
      ridge: ``lambda >= 0`` added to the diagonal of the ``N x N`` system.  For a scalar kernel
        ``(Theta_hat (x) I + lambda I) = (Theta_hat + lambda I) (x) I``: the same ridge.

    Cost ``O(N^3 / 3)`` for the factorisation, ``O(N^2 k)`` (scalar) or ``O(N^2)`` (eNTK) for the
    solve; memory two ``N x N`` matrices.  (``N = n k`` for the eNTK, ``n`` for a scalar kernel.)
    """
    k_train = _arr(k_train, "k_train")
    matrix, scalar, n, k = _train_kernel(k_train)
    y_train = _arr(y_train, "y_train")
    if y_train.ndim != 2 or y_train.shape[0] != n or (k is not None and y_train.shape[1] != k):
        raise ValueError(
            f"y_train must have shape ({n}, {'k' if k is None else k}) to match k_train "
            f"{k_train.shape}, got {y_train.shape}"
            + ("; one-hot encode int labels first (ntk_tutorial.data.one_hot)" if y_train.ndim == 1 else "")
        )
    k = y_train.shape[1]
    f_train = _outputs(f_train, n, k, "f_train")
    matrix = _symmetrise(matrix, "k_train")
    chol, jitter = cholesky_with_jitter(matrix, float(ridge))
    residual = y_train - f_train
    flags = _Flags(scalar, k, n)
    alpha = _unrhs(flags, _cho_solve(chol, _rhs(flags, residual)), n)
    return Proxy(matrix, chol, residual, alpha, float(ridge), jitter, scalar)


def kernel_regression(k_train: Any, y_train: Any, k_test_train: Any, *,
                      f_train: Any | None = None, f_test: Any | None = None,
                      ridge: float = 0.0, return_info: bool = False):
    """``f_test + K(x, X) (K(X, X) + ridge I)^{-1} (Y - f_train)`` by Cholesky.

    With ``f = f_L`` (the trained network's outputs) and the eNTK at ``theta_L`` this is the
    linearised network trained on ``(X, Y)`` with square loss to convergence (Eq. 11 of Mohamadi,
    Bae & Sutherland 2022); with ``f = 0`` it is plain kernel (ridge) regression.

    Args:
      k_train: ``(n, n, k, k)`` eNTK or ``(n, n)`` scalar kernel (used as ``Theta_hat (x) I_k``).
      y_train: ``(n, k)`` targets.
      k_test_train: ``(t, n, k, k)`` or ``(t, n)``, the same kind as ``k_train``.
      f_train, f_test: ``(n, k)``, ``(t, k)`` outputs to regress from (``None``: zeros).
      ridge: added to the diagonal (see :func:`fit_proxy`).
      return_info: also return a :class:`SolveInfo` (the jitter used).

    Returns:
      ``(t, k)`` predictions, or ``(predictions, SolveInfo)``.

    Raises:
      ValueError: NaN/inf inputs, mismatched shapes, a kernel matrix that is not symmetric or
        is indefinite beyond round-off.

    Cost ``O(N^3 / 3 + t N k)`` with ``N = n k`` (eNTK) or ``N = n`` (scalar kernel).
    """
    proxy = fit_proxy(k_train, y_train, f_train, ridge=ridge)
    pred = proxy.predict(k_test_train, f_test)
    return (pred, proxy.info) if return_info else pred


# ---------------------------------------------------------------------------------------------
# adding candidates: Eq. (11) directly, Eq. (12), sequential updates
# ---------------------------------------------------------------------------------------------


def _candidate_set(p, k_cand_train, k_cand_cand, y_cand, f_cand):
    """Normalise one candidate ((k,) label) or a set ((c, k) labels) to set form.

    Returns (single, y (c, k), f (c, k), b = matrix form of Theta(cand, X), d = of Theta(cand, cand)).
    """
    y_cand = _arr(y_cand, "y_cand")
    single = y_cand.ndim == 1
    if single:
        y_cand = y_cand[None]
    if y_cand.ndim != 2 or y_cand.shape[1] != p.k:
        raise ValueError(f"y_cand must be ({p.k},) for one candidate or (c, {p.k}) for c of them, "
                         f"got {y_cand.shape}")
    c = y_cand.shape[0]
    k_cand_train = _arr(k_cand_train, "k_cand_train")
    k_cand_cand = _arr(k_cand_cand, "k_cand_cand")
    if single:
        k_cand_train, k_cand_cand = k_cand_train[None], k_cand_cand[None, None]
        f_cand = None if f_cand is None else np.asarray(f_cand)[None]
    f_cand = _outputs(f_cand, c, p.k, "f_cand")
    b = _cross(p, k_cand_train, "k_cand_train", rows=c)
    d = _symmetrise(_cross(p, k_cand_cand, "k_cand_cand", rows=c, cols=c), "k_cand_cand")
    return single, y_cand, f_cand, b, d


def lookahead_predictions(k_train: Any, y_train: Any, k_cand_train: Any, k_cand_cand: Any,
                          y_cand: Any, k_test_train: Any, k_test_cand: Any, *,
                          f_train: Any | None = None, f_cand: Any | None = None,
                          f_test: Any | None = None, ridge: float = 0.0,
                          return_info: bool = False):
    """The retraining proxy of Eq. (11) of Mohamadi, Bae & Sutherland 2022, by a direct solve.

    ``f_L+(x) = f_L(x) + Theta(x, X+) (Theta(X+, X+) + ridge I)^{-1} (Y+ - f_L(X+))`` with
    ``L+ = L u {(x', y')}``: the network linearised at ``theta_L`` and retrained on ``L+`` with
    square loss to convergence.  One candidate, or a set of ``c`` candidates added together.

    Args:
      k_train: ``(n, n[, k, k])`` kernel on the labelled points (eNTK at ``theta_L``, or scalar).
      y_train: ``(n, k)`` labels of ``L``.
      k_cand_train: ``(n[, k, k])`` for one candidate, ``(c, n[, k, k])`` for a set.
      k_cand_cand: ``()`` / ``(k, k)`` for one candidate, ``(c, c[, k, k])`` for a set.
      y_cand: ``(k,)`` label of the candidate (a pseudo-label for look-ahead scores) or ``(c, k)``.
      k_test_train: ``(t, n[, k, k])``; k_test_cand: ``(t[, k, k])`` or ``(t, c[, k, k])``.
      f_train, f_cand, f_test: network outputs at ``theta_L`` (``None``: zeros).
      ridge, return_info: as in :func:`kernel_regression`.

    Returns ``(t, k)`` (and a :class:`SolveInfo`).  Cost ``O((N + c k')^3)``, ``k' = k`` for the
    eNTK and 1 for a scalar kernel: a fresh factorisation per candidate.  :func:`schur_update`
    gets the same in ``O(N^2 k')`` per candidate and :func:`posterior_change` for a pool at once.
    """
    k_train = _arr(k_train, "k_train")
    _, scalar, n, _ = _train_kernel(k_train)
    y_train = _arr(y_train, "y_train")
    if y_train.ndim != 2:
        raise ValueError(f"y_train must be (n, k), got {y_train.shape}")
    flags = _Flags(scalar, y_train.shape[1], n)
    single, y_cand, f_cand_, _, _ = _candidate_set(flags, k_cand_train, k_cand_cand, y_cand, f_cand)
    kct, kcc, ktc = (_arr(k_cand_train, "k_cand_train"), _arr(k_cand_cand, "k_cand_cand"),
                     _arr(k_test_cand, "k_test_cand"))
    if single:
        kct, kcc, ktc = kct[None], kcc[None, None], ktc[:, None]
    swap = (1, 0) if scalar else (1, 0, 3, 2)
    k_plus = np.concatenate([np.concatenate([k_train, kct.transpose(swap)], axis=1),
                             np.concatenate([kct, kcc], axis=1)], axis=0)
    k_test_plus = np.concatenate([_arr(k_test_train, "k_test_train"), ktc], axis=1)
    f_plus = None if f_train is None and f_cand is None else np.concatenate(
        [_outputs(f_train, n, flags.k, "f_train"), f_cand_])
    return kernel_regression(k_plus, np.concatenate([y_train, y_cand]), k_test_plus,
                             f_train=f_plus, f_test=f_test, ridge=ridge, return_info=return_info)


def schur_update(proxy: Proxy, k_cand_train: Any, k_cand_cand: Any, y_cand: Any,
                 k_test_train: Any, k_test_cand: Any, *, f_cand: Any | None = None,
                 f_test: Any | None = None) -> np.ndarray:
    """Eq. (11) through the block update of Eq. (12) of Mohamadi, Bae & Sutherland 2022.

    With ``K = Theta(X, X) + shift I`` factorised in ``proxy``, ``b = Theta(X, x')``,
    ``v = K^{-1} b``, the Schur complement ``u = Theta(x', x') + shift - b^T v``,
    ``r_L = Y - f_L(X)`` and ``r' = y' - f_L(x')``::

        f_L+(x) = f_lin_L(x) + (Theta(x, X) v - Theta(x, x')) u^{-1} (v^T r_L - r')

    where ``f_lin_L = proxy.predict``.  (For the eNTK, ``b`` is ``N x k`` and ``u`` is ``k x k``.)
    Equal to :func:`lookahead_predictions` up to round-off, without refactorising.

    Args:
      proxy: :func:`fit_proxy` of the labelled set.
      k_cand_train, k_cand_cand, y_cand, k_test_train, k_test_cand, f_cand, f_test: as in
        :func:`lookahead_predictions` (one candidate, or a set added together).

    Returns ``(t, k)``.  Cost per candidate ``O(N^2 k')`` for ``v`` (two triangular solves,
    ``k' = k`` for the eNTK, 1 for a scalar kernel) plus ``O(t N k')`` for the test points.
    """
    single, y_cand, f_cand, b, d = _candidate_set(proxy, k_cand_train, k_cand_cand, y_cand, f_cand)
    c = y_cand.shape[0]
    k_tn = _cross(proxy, _arr(k_test_train, "k_test_train"), "k_test_train", rows=None)
    t = k_tn.shape[0] // (1 if proxy.scalar else proxy.k)
    ktc = _arr(k_test_cand, "k_test_cand")
    k_tc = _cross(proxy, ktc[:, None] if single else ktc, "k_test_cand", rows=t, cols=c)
    f_test = _outputs(f_test, t, proxy.k, "f_test")
    alpha = _rhs(proxy, proxy.alpha)
    v = _cho_solve(proxy.chol, b.T)  # (N, c k')
    u = d + proxy.shift * np.eye(d.shape[0]) - b @ v  # Schur complement
    vt_r = b @ alpha  # v^T r_L = b^T K^{-1} r_L
    r_new = _rhs(proxy, y_cand - f_cand)
    direction = k_tn @ v - k_tc  # Theta(x, X) v - Theta(x, x')
    f_lin_test = f_test + _unrhs(proxy, k_tn @ alpha, t)
    return f_lin_test + _unrhs(proxy, direction @ np.linalg.solve(u, vt_r - r_new), t)


def sequential_update(proxy: Proxy, k_new_train: Any, k_new_new: Any, y_new: Any,
                      f_new: Any | None = None) -> Proxy:
    """Add labelled point(s) to the proxy without refactorising: ``O(N^2)`` per point.

    The Cholesky factor is extended by its new rows (a bordered, rank-``k'`` update):
    ``L+ = [[L, 0], [l^T, chol(D + shift I - l^T l)]]`` with ``l = L^{-1} Theta(X, x')``, and the
    coefficients are re-solved with the new factor.  The result equals :func:`fit_proxy` on
    ``L+`` (same ridge and jitter), so labels can be incorporated one at a time without SGD
    (the paper's sequential querying).  If the Schur complement is not positive definite in
    float64 (a point duplicating a labelled one), the whole factorisation is redone with a larger
    jitter, ``O(N^3)``, and the new jitter is reported in the result.

    Args:
      proxy: the current proxy on ``L``.
      k_new_train: ``(n[, k, k])`` kernel between the new point and ``X`` (``(c, n[, k, k])``
        for a set of c points).
      k_new_new: ``()`` or ``(k, k)`` (``(c, c[, k, k])`` for a set).
      y_new: ``(k,)`` its label (``(c, k)``).
      f_new: ``(k,)`` (``(c, k)``) network outputs at ``theta_L`` on it (``None``: zeros).

    Returns a new :class:`Proxy` on ``L+``.  Cost ``O(N^2 (k' + k))`` time, ``O(N^2)`` memory.
    """
    _, y_new, f_new, b, d = _candidate_set(proxy, k_new_train, k_new_new, y_new, f_new)
    c, big, size = y_new.shape[0], d.shape[0], proxy.kernel.shape[0]
    kernel = np.block([[proxy.kernel, b.T], [b, d]])
    residual = np.concatenate([proxy.residual, y_new - f_new])
    l_new = scipy.linalg.solve_triangular(proxy.chol, b.T, lower=True, check_finite=False)
    schur = d + proxy.shift * np.eye(big) - l_new.T @ l_new
    tail = _try_cholesky(0.5 * (schur + schur.T))
    if tail is not None:
        chol = np.block([[proxy.chol, np.zeros((size, big))], [l_new.T, tail]])
        jitter = proxy.jitter
    else:
        chol, extra = cholesky_with_jitter(kernel, proxy.shift)
        jitter = proxy.jitter + extra
    flags = _Flags(proxy.scalar, proxy.k, proxy.n + c)
    alpha = _unrhs(flags, _cho_solve(chol, _rhs(flags, residual)), proxy.n + c)
    return replace(proxy, kernel=kernel, chol=chol, residual=residual, alpha=alpha, jitter=jitter)


# ---------------------------------------------------------------------------------------------
# the vectorised form: every candidate of a pool at once
# ---------------------------------------------------------------------------------------------


def pseudo_labels(logits: Any) -> np.ndarray:
    """One-hot of the arg-max output, ``(m, k)``: the label MLMOC assumes a candidate gets."""
    logits = np.asarray(logits)
    return np.eye(logits.shape[-1], dtype=DTYPE)[np.argmax(logits, axis=-1)]


def total_l2_change(change: Any, reference: Any | None = None) -> np.ndarray:
    """MLMOC score (Eq. 13 of Mohamadi, Bae & Sutherland 2022): ``sum_x ||change(x)||_2``.

    ``change`` is ``(..., m, k)`` (candidates, pool points, outputs); returns ``(...)``.
    ``reference`` is accepted (and ignored) so every reduction has the same signature.
    """
    return np.linalg.norm(np.asarray(change), axis=-1).sum(axis=-1)


def label_flips(change: Any, reference: Any) -> np.ndarray:
    """How many pool points change their arg-max prediction: ``sum_x [argmax(ref + change) != argmax(ref)]``.

    ``change`` is ``(..., m, k)``, ``reference`` ``(m, k)`` (the outputs the change is measured
    from); returns ``(...)`` counts.  The released code of the paper scores candidates this way.
    """
    reference = np.asarray(reference)
    before = np.argmax(reference, axis=-1)
    after = np.argmax(reference + np.asarray(change), axis=-1)
    return np.sum(after != before, axis=-1)


REDUCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "l2": total_l2_change,
    "flips": label_flips,
}


# A candidate whose posterior variance C(x', x') + shift is at most this fraction of its prior
# variance Theta(x', x') is already determined by L (an exact copy of a labelled point): its label
# changes nothing, so its change is zero (not the 0/0 of round-off).
KNOWN_POINT_TOLERANCE = 1e-9


def _scalar_steps(c_bb, prior_bb, shift, r_blk):
    """``z = r' / (C(x', x') + shift)`` per candidate, ``(B, k)``; zero for known points."""
    den = c_bb + shift
    known = den <= KNOWN_POINT_TOLERANCE * np.maximum(np.abs(prior_bb), np.finfo(DTYPE).tiny)
    return np.where(known[:, None], 0.0, r_blk / np.where(known, 1.0, den)[:, None])


def _block_steps(c_bb, prior_trace, shift, r_blk):
    """``z = (C(x', x') + shift I)^{-1} r'`` per candidate for the eNTK, ``(B, k, 1)``; zero for
    known points (posterior trace at round-off of the prior's), a pseudo-inverse for a singular
    but not vanishing block."""
    k = c_bb.shape[-1]
    a = c_bb + shift * np.eye(k)
    known = np.trace(a, axis1=1, axis2=2) <= KNOWN_POINT_TOLERANCE * np.maximum(np.abs(prior_trace),
                                                                              np.finfo(DTYPE).tiny)
    z = np.zeros(r_blk.shape + (1,))
    ok = ~known
    if np.any(ok):
        try:
            z[ok] = np.linalg.solve(a[ok], r_blk[ok][..., None])
        except np.linalg.LinAlgError:
            z[ok] = np.linalg.pinv(a[ok], hermitian=True) @ r_blk[ok][..., None]
    return z


_FUSED: dict = {}


def _fused(name: str):
    """Jitted, fused reductions of the scalar-kernel change ``offset + C(x, x') z(x')`` over the
    pool for a block of candidates (the ``(B, m, k)`` changes are never written to memory)."""
    if name not in _FUSED:
        import jax
        import jax.numpy as jnp

        if name == "flips":
            def fn(mean, ref_arg, cols, z):  # mean: f_lin (m, k); cols: (B, m); z: (B, k)
                after = mean[None] + cols[:, :, None] * z[:, None, :]
                return jnp.sum(jnp.argmax(after, axis=-1) != ref_arg[None], axis=1)
        else:  # "l2" with an offset (change measured from the network)
            def fn(offset, cols, z):
                change = offset[None] + cols[:, :, None] * z[:, None, :]
                return jnp.sum(jnp.sqrt(jnp.sum(change**2, axis=-1)), axis=1)
        _FUSED[name] = jax.jit(fn)
    return _FUSED[name]


def _scalar_reduce(reduce_fn, cols, z, f_lin, reference, offset):
    """The reduction of a block's scalar-kernel changes, or ``None`` if it has no fast form.

    ``cols``: ``(B, m)`` columns ``C(U, x')``; ``z``: ``(B, k)`` steps.  float64 throughout."""
    import jax

    if reduce_fn is label_flips:
        with jax.enable_x64(True):
            return np.asarray(_fused("flips")(f_lin, np.argmax(reference, axis=-1), cols, z))
    if reduce_fn is total_l2_change:
        if not np.any(offset):
            return np.abs(cols).sum(1) * np.linalg.norm(z, axis=1)
        with jax.enable_x64(True):
            return np.asarray(_fused("l2")(offset, cols, z))
    return None


def _block_change(k_ub, w, w_b, r_new, shift, offset, scalar, k, b_pos):
    """Change on every pool point for a block of B candidates: ``(B, m, k)``.

    ``b_pos`` are the candidates' positions in the pool (rows of ``k_ub``).
    """
    c_ub = k_ub - w.T @ w_b  # C(U, block): (M, B k')
    bsz = b_pos.size
    cols = np.arange(bsz)
    if scalar:
        z = _scalar_steps(c_ub[b_pos, cols], k_ub[b_pos, cols], shift, r_new)  # (B, k)
        delta = c_ub.T[:, :, None] * z[:, None, :]  # (B, m, k)
    else:
        m = c_ub.shape[0] // k
        c4 = c_ub.reshape(m, k, bsz, k)
        c_bb = c4[b_pos, :, cols, :]  # (B, k, k)
        prior = k_ub.reshape(m, k, bsz, k)[b_pos, :, cols, :]
        z = _block_steps(c_bb, np.trace(prior, axis1=1, axis2=2), shift, r_new)  # (B, k, 1)
        delta = np.matmul(c4.transpose(2, 0, 1, 3).reshape(bsz, m * k, k), z).reshape(bsz, m, k)
    return offset[None] + delta


def posterior_change(
    proxy: Proxy,
    k_pool_train: Any,
    k_pool_pool: Any | Callable[[np.ndarray], Any],
    f_pool: Any,
    y_candidates: Any,
    *,
    candidates: Sequence[int] | np.ndarray | None = None,
    relative_to: str = "proxy",
    network: Any | None = None,
    reduce: str | Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """Change of the retraining proxy on every pool point, for every candidate at once.

    The vectorised Eq. (12) of Mohamadi, Bae & Sutherland 2022: with the posterior covariance
    ``C(x, x') = Theta(x, x') - Theta(x, X) K^{-1} Theta(X, x')`` on the pool ``U``, adding
    ``(x', y')`` to ``L`` changes the proxy at ``x`` by::

        Delta(x; x') = C(x, x') (C(x', x') + shift)^{-1} (y' - f_lin_L(x'))

    (``C(x', x')`` is ``k x k`` for the eNTK, a number for a scalar kernel; ``shift`` is the
    proxy's ridge + jitter, ``K`` includes it).  ``C`` is never formed whole: with
    ``W = L^{-1} Theta(X, U)`` computed once, a block of candidates' columns is
    ``Theta(U, block) - W^T W_block``.

    Args:
      proxy: :func:`fit_proxy` on the labelled set (``f_train`` = the network at ``theta_L``).
      k_pool_train: ``(m, n[, k, k])`` kernel between the pool and the labelled points.
      k_pool_pool: ``(m, m[, k, k])`` kernel on the pool (symmetric: ``Theta(x, x') = Theta(x', x)^T``;
        its rows are read, block by block: a memory-mapped ``.npy`` such as
        ``kernels.pntk(..., out="pool.npy")`` opened with ``numpy.load(path, mmap_mode="r")``
        is never loaded whole), or a function
        ``idx -> (m, len(idx)[, k, k])`` returning its columns for the candidates ``idx`` (so the
        ``m x m`` kernel never has to sit in memory, e.g.
        ``lambda idx: kernels.pntk(apply_fn, params, x_pool, x_pool[idx])``).
      f_pool: ``(m, k)`` network outputs at ``theta_L`` on the pool.
      y_candidates: ``(c, k)`` the label each candidate would get (``pseudo_labels(f_pool)`` for
        MLMOC), in the order of ``candidates``.
      candidates: indices into the pool of the candidates (default: every pool point, ``c = m``).
      relative_to: ``"proxy"``: the change of the proxy, ``f_lin_L+ - f_lin_L``; ``"network"``:
        ``f_lin_L+ - f_L``, the change from the trained network (Eq. 13's wording, and what the
        released code's batch mode counts flips against); equal when the network fits ``L``.
      network: ``(m, k)`` the network's outputs on the pool, the reference for
        ``relative_to="network"`` (default ``f_pool``; give it when the proxy does not start
        from the network, e.g. kernel regression with an infinite-width kernel and ``f_pool = 0``).
      reduce: ``None`` returns the ``(c, m, k)`` changes; ``"l2"`` the MLMOC scores
        ``sum_x ||Delta(x)||_2`` (:func:`total_l2_change`), ``"flips"`` the number of pool points
        whose arg-max prediction flips (:func:`label_flips`), each ``(c,)``; or a function
        ``(change (B, m, k), reference (m, k)) -> (B, ...)`` applied block by block.
        ``reference`` is ``f_lin_L`` or ``f_L`` on the pool, following ``relative_to``.
      block_size: candidates per block (default: blocks of about 256 MiB).

    Returns:
      ``(c, m, k)`` array (``reduce=None``) or the reduction's ``(c, ...)`` array.

    Cost (``N = n k``, ``M = m k`` for the eNTK; ``N = n``, ``M = m`` for a scalar kernel):
    ``O(N^2 M)`` once for ``W``, then ``O(M N k')`` per candidate for its column of ``C`` and
    ``O(m k k')`` for its change: ``O(N^2 M + c M N k')`` in all (for a scalar kernel and
    ``c = m``: ``O(n^2 m + m^2 n + m^2 k)``), against ``O(c (N + k')^3)`` for a direct solve per
    candidate.  Memory ``O(N M)`` plus ``O(B M (k + k'))`` per block, besides the inputs.
    """
    if relative_to not in ("proxy", "network"):
        raise ValueError(f"relative_to must be 'proxy' or 'network', got {relative_to!r}")
    if isinstance(reduce, str):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be None, a function or one of {sorted(REDUCTIONS)}, got {reduce!r}")
        reduce_fn = REDUCTIONS[reduce]
    else:
        reduce_fn = reduce
    k, kk = proxy.k, (1 if proxy.scalar else proxy.k)
    k_ux = _cross(proxy, _arr(k_pool_train, "k_pool_train"), "k_pool_train", rows=None)
    m = k_ux.shape[0] // kk
    f_pool = _outputs(f_pool, m, k, "f_pool")
    cand = np.arange(m) if candidates is None else np.asarray(candidates, dtype=np.int64).reshape(-1)
    if cand.size and (cand.min() < 0 or cand.max() >= m):
        raise ValueError(f"candidates must be indices into the pool of {m} points, got range "
                         f"{cand.min()}..{cand.max()}")
    c = cand.size
    y_candidates = _arr(y_candidates, "y_candidates")
    if y_candidates.shape != (c, k):
        raise ValueError(f"y_candidates must be ({c}, {k}): one label per candidate, got {y_candidates.shape}")
    if callable(k_pool_pool):
        columns = lambda idx: _arr(k_pool_pool(idx), "k_pool_pool(idx)")  # noqa: E731
    else:
        # a NumPy array (a memory-mapped .npy included) is read block by block, never copied
        # whole; other arrays (JAX) are converted once
        k_uu = k_pool_pool if isinstance(k_pool_pool, np.ndarray) else _arr(k_pool_pool, "k_pool_pool")
        want = (m, m) if proxy.scalar else (m, m, k, k)
        if k_uu.shape != want:
            raise ValueError(f"k_pool_pool must have shape {want}, got {k_uu.shape}")
        # Theta(U, x') = Theta(x', U)^T: gather rows (contiguous), not columns (strided)
        swap = (1, 0) if proxy.scalar else (1, 0, 3, 2)
        columns = lambda idx: _arr(k_uu[idx], "k_pool_pool").transpose(swap)  # noqa: E731

    w = scipy.linalg.solve_triangular(proxy.chol, k_ux.T, lower=True, check_finite=False)  # (N, M)
    f_lin = f_pool + _unrhs(proxy, k_ux @ _rhs(proxy, proxy.alpha), m)
    reference = f_lin if relative_to == "proxy" else (
        f_pool if network is None else _outputs(network, m, k, "network"))
    offset = f_lin - reference
    r_all = y_candidates - f_lin[cand]  # y' - f_lin_L(x'), (c, k)

    if block_size is None:
        per_candidate = max(8 * m * k * (2 + 2 * kk), 1)  # an empty pool: one block of nothing
        block_size = int(max(1, min(c, _BLOCK_BYTES // per_candidate)))
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    w3 = w.reshape(w.shape[0], m, kk)
    # scalar kernel: Delta(x; x') = C(x, x') z(x'), so the L2 score and the flip count have fused
    # forms that never write the (B, m, k) changes to memory (_scalar_reduce)
    fast = proxy.scalar and reduce_fn in (total_l2_change, label_flips)
    out = []
    for start in range(0, c, block_size):
        idx = cand[start:start + block_size]
        flags = _Flags(proxy.scalar, k, idx.size)
        k_ub = _cross(flags, columns(idx), "k_pool_pool columns", rows=m, cols=idx.size)
        w_b = w3[:, idx, :].reshape(w.shape[0], idx.size * kk)
        r_blk = r_all[start:start + block_size]
        if fast:
            c_ub = k_ub - w.T @ w_b
            diag = np.arange(idx.size)
            z = _scalar_steps(c_ub[idx, diag], k_ub[idx, diag], proxy.shift, r_blk)
            out.append(_scalar_reduce(reduce_fn, np.ascontiguousarray(c_ub.T), z, f_lin, reference, offset))
            continue
        change = _block_change(k_ub, w, w_b, r_blk, proxy.shift, offset, proxy.scalar, k, idx)
        out.append(change if reduce_fn is None else np.asarray(reduce_fn(change, reference)))
    if not out:
        return np.zeros((0, m, k)) if reduce_fn is None else np.zeros((0,))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# sequential querying on a fixed pool: the posterior over the pool, conditioned point by point
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolPosterior:
    """The retraining proxy seen from a fixed pool ``U``: its predictions and posterior covariance.

    ``mean = f_lin_L(U)`` and ``cov = C(U, U) = Theta(U, U) - Theta(U, X) (K + shift I)^{-1} Theta(X, U)``
    (matrix form, ``M = m`` for a scalar kernel, ``m k`` for the eNTK).  Adding labelled pool
    points is a Gaussian-process conditioning step (:func:`condition`, ``O(M^2)`` per point),
    and the look-ahead change of every candidate is read off ``cov`` (:func:`covariance_change`):
    what sequential querying needs, without refactorising or recomputing ``C`` per label.

    Attributes:
      cov: ``(M, M)`` posterior covariance on the pool.
      mean: ``(m, k)`` the proxy's predictions on the pool.
      prior_diag: ``(M,)`` the diagonal of ``Theta(U, U)`` (to recognise already-known points).
      shift: the proxy's ``ridge + jitter``, added to the diagonal of every labelled point.
      scalar: scalar kernel (``Theta_hat (x) I_k``) or full eNTK.
      labelled: pool indices conditioned on so far, in order.
    """

    cov: np.ndarray
    mean: np.ndarray
    prior_diag: np.ndarray
    shift: float
    scalar: bool
    labelled: tuple = ()

    @property
    def m(self) -> int:
        return int(self.mean.shape[0])

    @property
    def k(self) -> int:
        return int(self.mean.shape[1])


def pool_posterior(proxy: Proxy, k_pool_train: Any, k_pool_pool: Any, f_pool: Any) -> PoolPosterior:
    """:class:`PoolPosterior` of ``proxy`` on a pool: ``O(N^2 M + N M^2)`` once, ``M^2`` floats.

    Args:
      proxy: :func:`fit_proxy` on the labelled set.
      k_pool_train: ``(m, n[, k, k])``; k_pool_pool: ``(m, m[, k, k])``; f_pool: ``(m, k)`` the
        network's outputs on the pool (zeros for a proxy that does not start from the network).
    """
    k, kk = proxy.k, (1 if proxy.scalar else proxy.k)
    k_ux = _cross(proxy, _arr(k_pool_train, "k_pool_train"), "k_pool_train", rows=None)
    m = k_ux.shape[0] // kk
    f_pool = _outputs(f_pool, m, k, "f_pool")
    k_uu = _arr(k_pool_pool, "k_pool_pool")
    want = (m, m) if proxy.scalar else (m, m, k, k)
    if k_uu.shape != want:
        raise ValueError(f"k_pool_pool must have shape {want}, got {k_uu.shape}")
    k_uu = _symmetrise(k_uu if proxy.scalar else _matrix(k_uu), "k_pool_pool")
    w = scipy.linalg.solve_triangular(proxy.chol, k_ux.T, lower=True, check_finite=False)  # (N, M)
    cov = k_uu - w.T @ w
    mean = f_pool + _unrhs(proxy, k_ux @ _rhs(proxy, proxy.alpha), m)
    return PoolPosterior(cov, mean, np.diag(k_uu).copy(), proxy.shift, proxy.scalar)


def _rows(post: PoolPosterior, idx: np.ndarray) -> np.ndarray:
    """Matrix rows of pool points ``idx`` (``k`` rows each for the eNTK)."""
    if post.scalar:
        return idx
    return (idx[:, None] * post.k + np.arange(post.k)[None]).reshape(-1)


def condition(post: PoolPosterior, idx: Any, y: Any) -> PoolPosterior:
    """Add pool points ``idx`` with labels ``y`` ``(c, k)`` to the labelled set.

    ``mean += C(U, J) (C(J, J) + shift I)^{-1} (y - mean(J))`` and
    ``cov -= C(U, J) (C(J, J) + shift I)^{-1} C(J, U)``: the same proxy as :func:`fit_proxy` on
    ``L u J`` (same ridge and jitter), in ``O(M^2 c k')``.  A point the pool already determines
    (posterior variance at round-off, e.g. a copy of a labelled point) changes nothing.
    """
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    y = _outputs(y, idx.size, post.k, "y")
    if idx.size and (idx.min() < 0 or idx.max() >= post.m):
        raise ValueError(f"idx must be indices into the pool of {post.m} points")
    rows = _rows(post, idx)
    c_uj = post.cov[:, rows]  # (M, c k')
    c_jj = c_uj[rows] + post.shift * np.eye(rows.size)
    known = np.diag(c_jj) <= KNOWN_POINT_TOLERANCE * np.maximum(np.abs(post.prior_diag[rows]),
                                                               np.finfo(DTYPE).tiny)
    if np.all(known):
        return replace(post, labelled=post.labelled + tuple(int(i) for i in idx))
    keep = ~known
    c_uj, c_jj = c_uj[:, keep], c_jj[np.ix_(keep, keep)]
    chol, _ = cholesky_with_jitter(0.5 * (c_jj + c_jj.T))
    g = scipy.linalg.solve_triangular(chol, c_uj.T, lower=True, check_finite=False)  # (c k', M)
    r = (y - post.mean[idx]).reshape(-1, 1) if not post.scalar else (y - post.mean[idx])
    r = r[keep]
    step = scipy.linalg.solve_triangular(chol, r, lower=True, check_finite=False)
    delta = g.T @ step  # (M, k) or (M, 1)
    mean = post.mean + (delta if post.scalar else delta.reshape(post.m, post.k))
    cov = post.cov - g.T @ g
    return replace(post, cov=cov, mean=mean, labelled=post.labelled + tuple(int(i) for i in idx))


def covariance_change(post: PoolPosterior, y_candidates: Any, *, candidates: Any = None,
                      reference: Any | None = None,
                      reduce: str | Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                      block_size: int | None = None) -> np.ndarray:
    """:func:`posterior_change` read off a :class:`PoolPosterior`: the change on every pool point
    if candidate ``x'`` (each of ``candidates``, default all) were labelled ``y'``::

        Delta(x; x') = C(x, x') (C(x', x') + shift)^{-1} (y' - mean(x'))

    measured from ``reference`` (default ``post.mean``: the change of the proxy; pass the
    network's outputs to measure from the network).  ``reduce`` as in :func:`posterior_change`.
    Cost ``O(c M k)`` (scalar kernel, fused: no ``(c, m, k)`` array is written) or
    ``O(c M k k')``.
    """
    reduce_fn = REDUCTIONS[reduce] if isinstance(reduce, str) else reduce
    if isinstance(reduce, str) and reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be None, a function or one of {sorted(REDUCTIONS)}")
    m, k = post.m, post.k
    cand = np.arange(m) if candidates is None else np.asarray(candidates, dtype=np.int64).reshape(-1)
    y_candidates = _outputs(y_candidates, cand.size, k, "y_candidates")
    reference = post.mean if reference is None else _outputs(reference, m, k, "reference")
    offset = post.mean - reference
    r_all = y_candidates - post.mean[cand]
    kk = 1 if post.scalar else k
    if block_size is None:
        block_size = int(max(1, min(max(cand.size, 1), _BLOCK_BYTES // max(8 * m * k * (2 + 2 * kk), 1))))
    out = []
    for start in range(0, cand.size, block_size):
        idx = cand[start:start + block_size]
        r_blk = r_all[start:start + block_size]
        if post.scalar:
            cols = post.cov[idx]  # rows = columns (symmetric): (B, m)
            z = _scalar_steps(cols[np.arange(idx.size), idx], post.prior_diag[idx], post.shift, r_blk)
            fast = _scalar_reduce(reduce_fn, cols, z, post.mean, reference, offset)
            if fast is not None:
                out.append(fast)
                continue
            change = offset[None] + cols[:, :, None] * z[:, None, :]
        else:
            rows = _rows(post, idx)
            c4 = post.cov[rows].reshape(idx.size, k, m, k)  # (B, k, m, k)
            c_bb = c4[np.arange(idx.size), :, idx, :]  # (B, k, k)
            z = _block_steps(c_bb, post.prior_diag[rows].reshape(idx.size, k).sum(1), post.shift, r_blk)
            # Delta(x) = C(x, x') z = (C(x', x)^T) z
            change = offset[None] + np.einsum("bjxi,bjo->bxi", c4, z)
        out.append(change if reduce_fn is None else np.asarray(reduce_fn(change, reference)))
    if not out:
        return np.zeros((0, m, k)) if reduce_fn is None else np.zeros((0,))
    return np.concatenate(out)
