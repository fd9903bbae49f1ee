"""Preparing the task head for fine-tuning (Ren, Guo, Bae & Sutherland 2023), and eNTK + GCV
(Wei, Hu & Steinhardt 2022).

A model is a *backbone* ``z = phi(B(x))`` (features) followed by a *head* ``f = h(z)``
(logits).  Head probing trains ``h`` on frozen features; fine-tuning trains both.  For one SGD
step on ``(x_u, y_u)`` with cross-entropy the features of another input move by, to first order,

    z(x_o) <- z(x_o) - eta * Theta_z(x_o, x_u) (dh/dz)^T (p(x_u) - e_{y_u}),

where ``Theta_z`` is the backbone's feature eNTK.  The size of ``p - e_y`` at the start of
fine-tuning -- the *energy* -- therefore controls how far features travel.

:func:`energy` uses the definition ``E = mean_i ||e_{y_i} - p_0(x_i)||_2`` (the Euclidean norm of
the cross-entropy gradient with respect to the logits, averaged over the training set).  The
paper's Eq. (4) bounds the feature change by a quantity proportional to this average; the L2
norm is the one that appears in that bound, and it is 0 for a perfectly fitted head and at most
``sqrt(2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import data, kernels, lookahead, models, train

Array = jax.Array


@dataclass(frozen=True, init=False)
class BackboneHead(kernels.DenseMLP):
    """``apply_fn(params, x)`` for ``params = {"backbone": ..., "head": ...}``: an MLP backbone
    followed by an MLP head (both :class:`~ntk_tutorial.kernels.DenseMLP`).

    ``backbone_features(params["backbone"], x)`` gives ``z``; ``head(params["head"], z)`` gives
    logits.  Backbone then head is one MLP (its layers are the backbone's and the head's), so
    it is a ``DenseMLP`` itself: the kernels' dense route applies, and two of the same shapes
    are equal, so jitted code is reused across seeds.
    """

    backbone: kernels.DenseMLP = None
    head: kernels.DenseMLP = None

    def __init__(self, backbone: kernels.DenseMLP, head: kernels.DenseMLP):
        if not (isinstance(backbone, kernels.DenseMLP) and isinstance(head, kernels.DenseMLP)):
            raise TypeError("backbone and head must be MLPs (models.functional of a models.MLP)")
        if backbone.activation != head.activation:
            raise ValueError(f"backbone and head must share one activation, got {backbone.activation!r} "
                             f"and {head.activation!r}")
        for name, value in (("activation", backbone.activation), ("scales", backbone.scales + head.scales),
                            ("dropout", 0.0), ("backbone", backbone), ("head", head)):
            object.__setattr__(self, name, value)

    def layers(self, params: Any) -> list:
        return self.backbone.layers(params["backbone"]) + self.head.layers(params["head"])

    def backbone_features(self, backbone_params: Any, x: Array) -> Array:
        """``z = phi(B(x))``: the features the head sees."""
        return kernels.activation_fn(self.activation)(self.backbone(backbone_params, x))

    def __call__(self, params: Any, x: Array, dropout_key: Array | None = None) -> Array:
        return self.head(params["head"], self.backbone_features(params["backbone"], x))


def mlp_backbone_head(
    d_in: int,
    width: int,
    num_classes: int,
    *,
    depth: int = 2,
    head_hidden: int | None = None,
    key: Array,
    activation: str = "relu",
) -> tuple[BackboneHead, dict]:
    """An MLP backbone (``depth`` hidden layers of ``width``, NTK parameterisation) with a
    linear head, or a one-hidden-layer MLP head of ``head_hidden`` units (a "richer" head).

    Returns ``(apply_fn, params)`` with ``params = {"backbone": ..., "head": ...}``.
    """
    k_b, k_h = jax.random.split(key)
    backbone_fn, pb = models.functional(
        models.MLP((d_in,) + (width,) * depth, activation=activation, rngs=nnx.Rngs(params=k_b))
    )
    head_fn, ph = new_head(width, num_classes, key=k_h, hidden=head_hidden, activation=activation)
    return BackboneHead(backbone_fn, head_fn), {"backbone": pb, "head": ph}


def new_head(feature_dim: int, num_classes: int, *, key: Array, hidden: int | None = None,
             activation: str = "relu") -> tuple[Callable, Any]:
    """A freshly initialised head: linear (``hidden=None``) or one hidden layer."""
    widths = (feature_dim, num_classes) if hidden is None else (feature_dim, hidden, num_classes)
    return models.functional(models.MLP(widths, activation=activation, rngs=nnx.Rngs(params=key)))


def with_new_head(apply_fn: BackboneHead, params: dict, num_classes: int, *, key: Array,
                  hidden: int | None = None) -> tuple[BackboneHead, dict]:
    """Keep the (pretrained) MLP backbone, attach a new random head for a new task."""
    layers = params["backbone"]["layers"]
    feature_dim = layers[max(layers)]["w"].shape[1]
    head_fn, ph = new_head(feature_dim, num_classes, key=key, hidden=hidden,
                           activation=apply_fn.activation)
    return BackboneHead(apply_fn.backbone, head_fn), {
        "backbone": params["backbone"], "head": ph}


def head_probe(apply_fn: BackboneHead, params: dict, x: Array, y: Array, *, epochs: int,
               lr: float, batch_size: int | None = None, momentum: float = 0.0,
               label_smoothing: float = 0.0, key: Array | None = None) -> dict:
    """Train the head only, for ``epochs`` epochs, on frozen features (cross-entropy).

    ``label_smoothing`` eps trains towards ``(1 - eps) e_y + eps / k`` (it keeps some energy).
    Features are computed once, so head probing costs only the head's forward/backward passes.
    """
    if epochs == 0:
        return params
    z = apply_fn.backbone_features(params["backbone"], jnp.asarray(x))
    k = jax.eval_shape(apply_fn.head, params["head"], z[:1]).shape[-1]
    targets = smooth_labels(y, k, label_smoothing)
    res = train.train(apply_fn.head, params["head"], z, targets, lr=lr, epochs=epochs,
                      batch_size=batch_size, momentum=momentum, loss="xent", key=key)
    return {"backbone": params["backbone"], "head": res.params}


def smooth_labels(y: Array, k: int, eps: float) -> Array:
    """One-hot labels smoothed towards uniform: ``(1 - eps) e_y + eps / k``."""
    if not 0.0 <= eps < 1.0:  # eps = 1: uniform targets, nothing left to fit
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
    return jnp.asarray(data.label_smoothing(np.asarray(y), k, eps))


def energy(apply_fn: Callable, params: Any, x: Array, y: Array) -> float:
    """Mean over examples of ``||e_y - softmax(f(x))||_2`` (see the module docstring)."""
    logits = train.predict(apply_fn, params, x)
    k = logits.shape[-1]
    return float(jnp.mean(jnp.linalg.norm(jax.nn.one_hot(jnp.asarray(y), k) - jax.nn.softmax(logits), axis=-1)))


def feature_change(z0: Array, z1: Array) -> dict[str, float]:
    """Statistics of the features' change from ``z0`` to ``z1`` (rows = examples), averaged:

    ``distance`` ``||z1 - z0||``, ``cosine`` similarity, ``cosine_distance`` = 1 - cosine,
    ``inner`` ``z1 . z0``, ``norm`` ``||z1||`` and ``norm0`` ``||z0||``.
    """
    z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    if z0.shape != z1.shape or z0.ndim != 2:
        raise ValueError(f"z0 and z1 must be (n, d) arrays of equal shape, got {z0.shape}, {z1.shape}")
    n0, n1 = np.linalg.norm(z0, axis=1), np.linalg.norm(z1, axis=1)
    inner = np.sum(z0 * z1, axis=1)
    cos = inner / np.maximum(n0 * n1, 1e-30)
    return {
        "distance": float(np.linalg.norm(z1 - z0, axis=1).mean()),
        "cosine": float(cos.mean()),
        "cosine_distance": float(1.0 - cos.mean()),
        "inner": float(inner.mean()),
        "norm": float(n1.mean()),
        "norm0": float(n0.mean()),
    }


# ---------------------------------------------------------------------------------------------
# kernel ridge regression and generalised cross-validation (Wei, Hu & Steinhardt 2022)
# ---------------------------------------------------------------------------------------------


def _eigh(kernel: Array) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(kernel, np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"kernel must be a square (n, n) matrix, got shape {k.shape}")
    if not np.isfinite(k).all():
        raise ValueError("kernel contains NaN or infinite values")
    evals, evecs = np.linalg.eigh((k + k.T) / 2)
    return np.clip(evals, 0.0, None), evecs


def _cv_inputs(kernel: Array, y: Array, ridges: Array):
    """Validated eigendecomposition, targets projected on the eigenvectors, positive ridges."""
    evals, evecs = _eigh(kernel)
    y = np.asarray(y, np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if y.shape[0] != evals.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows but the kernel is {evals.shape[0]} x {evals.shape[0]}")
    ridges = np.atleast_1d(np.asarray(ridges, np.float64))
    if (ridges <= 0).any():
        raise ValueError("cross-validation needs positive ridges (at ridge 0 an interpolating fit "
                         "has GCV 0/0 and leave-one-out divides by 0)")
    return evals, evecs, evecs.T @ y, ridges


def gcv(kernel: Array, y: Array, ridges: Array) -> np.ndarray:
    """Generalised cross-validation of kernel ridge regression for each ridge, from one
    eigendecomposition ``K = U diag(s) U^T``:

        S_l = K (K + l I)^{-1},   GCV(l) = (1/n) ||(I - S_l) y||^2 / (1 - tr(S_l)/n)^2,

    with ``(I - S_l) y = U diag(l / (s + l)) U^T y`` and ``tr S_l = sum s / (s + l)``.  For
    multi-output ``y`` (n, k) the squared norm sums over outputs (the square loss per example).
    Cost: ``O(n^3)`` once, then ``O(n k)`` per ridge.
    """
    evals, evecs, proj, ridges = _cv_inputs(kernel, y, ridges)
    n = evals.shape[0]
    shrink = ridges[:, None] / (evals[None, :] + ridges[:, None])  # (r, n)
    resid = np.einsum("rn,nk->r", shrink**2, proj**2) / n
    dof = np.sum(evals[None, :] / (evals[None, :] + ridges[:, None]), axis=1)
    return resid / (1.0 - dof / n) ** 2


def loo_cv(kernel: Array, y: Array, ridges: Array) -> np.ndarray:
    """Exact leave-one-out error of kernel ridge regression for each ridge:
    ``(1/n) sum_i ||[(I - S) y]_i||^2 / (1 - S_ii)^2``.

    GCV is this with every leverage ``S_ii`` replaced by their mean ``tr(S)/n``; the two differ
    when leverages are uneven.  Same eigendecomposition; ``O(n^2)`` per ridge.
    """
    evals, evecs, proj, ridges = _cv_inputs(kernel, y, ridges)
    out = []
    for lam in ridges:
        resid = evecs @ (proj * (lam / (evals + lam))[:, None])  # (I - S) y
        leverage = (evecs**2) @ (evals / (evals + lam))  # diag(S)
        out.append(np.mean(np.sum(resid**2, axis=1) / (1.0 - leverage) ** 2))
    return np.asarray(out)


def krr_predict(k_train: Array, k_test_train: Array, y: Array, ridge: float) -> np.ndarray:
    """Kernel ridge regression predictions ``K(x, X) (K + ridge I)^{-1} y`` (float64).

    The package's one ridge solve, :func:`ntk_tutorial.lookahead.kernel_regression` (Cholesky,
    with the smallest jitter that works), for a scalar ``(n, n)`` kernel; ``y`` may be ``(n,)``
    (then ``(t,)`` is returned) or ``(n, k)``.
    """
    y = np.asarray(y, np.float64)
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be (n,) or (n, k), got shape {y.shape}")
    pred = lookahead.kernel_regression(k_train, y[:, None] if y.ndim == 1 else y, k_test_train, ridge=float(ridge))
    return pred[:, 0] if y.ndim == 1 else pred
