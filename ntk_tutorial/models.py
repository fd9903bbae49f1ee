"""Small flax-nnx models and the one functional interface the kernel code needs.

Every kernel in :mod:`ntk_tutorial.kernels` takes ``apply_fn(params, x) -> (n, k)`` logits,
exactly as neural-tangents did.  :func:`functional` turns an nnx model into that pair.

Parameterisations (Jacot et al. 2018; neural-tangents' ``stax.Dense``):

* ``"ntk"``: ``z = (w_std / sqrt(n_in)) * x @ W + b_std * b`` with ``W, b ~ N(0, 1)``.  The eNTK
  then converges to the analytic :func:`ntk_tutorial.kernels.infinite_ntk` as width grows.
* ``"standard"``: ``z = x @ W + b`` with ``W ~ N(0, w_std^2 / n_in)``, ``b ~ N(0, b_std^2)``.
  Same function at initialisation, different training dynamics (and an eNTK that grows
  with width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "erf": jax.scipy.special.erf,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "linear": lambda z: z,
}

PARAMETERIZATIONS = ("ntk", "standard")


def activation_fn(name: str) -> Callable[[Array], Array]:
    """Look up an activation by name; unknown names list the available ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class Dense(nnx.Module):
    """A dense layer in NTK or standard parameterisation (see the module docstring)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        parameterization: str = "ntk",
        w_std: float = math.sqrt(2.0),
        b_std: float = 0.1,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}"
            )
        w = jax.random.normal(rngs.params(), (n_in, n_out), dtype=param_dtype)
        b = jax.random.normal(rngs.params(), (n_out,), dtype=param_dtype)
        if parameterization == "ntk":
            self.w_scale, self.b_scale = w_std / math.sqrt(n_in), float(b_std)
        else:
            w, b = w * (w_std / math.sqrt(n_in)), b * b_std
            self.w_scale, self.b_scale = 1.0, 1.0
        self.w = nnx.Param(w)
        self.b = nnx.Param(b)

    def __call__(self, x: Array) -> Array:
        return (x @ self.w[...]) * self.w_scale + self.b[...] * self.b_scale


class MLP(nnx.Module):
    """Fully connected network ``widths[0] -> widths[1] -> ... -> widths[-1]``.

    Args:
      widths: input dimension, hidden widths, number of outputs ``k``; e.g. ``(784, 512, 512, 10)``.
      activation: a name in :data:`ACTIVATIONS`.
      parameterization: ``"ntk"`` (default) or ``"standard"``.
      dropout: dropout rate on every hidden layer's output; active only when ``__call__`` gets a
        ``dropout_key`` (MC dropout), so kernels and evaluation see the deterministic network.
      w_std, b_std: weight and bias standard deviations (neural-tangents' ``W_std``, ``b_std``).
      param_dtype: parameter dtype, float32 by default even when float64 is enabled
        (``jnp.float64`` for checks that need the extra digits).
      rngs: ``nnx.Rngs`` built from an explicit key, e.g. ``nnx.Rngs(params=key)``.
    """

    def __init__(
        self,
        widths: Sequence[int],
        activation: str = "relu",
        parameterization: str = "ntk",
        dropout: float = 0.0,
        *,
        w_std: float = math.sqrt(2.0),
        b_std: float = 0.1,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must list at least an input and an output size >= 1, got {widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        activation_fn(activation)  # validate early
        self.widths = widths
        self.activation = activation
        self.parameterization = parameterization
        self.dropout = float(dropout)
        self.w_std, self.b_std = float(w_std), float(b_std)
        self.layers = nnx.List(
            [
                Dense(a, b, parameterization=parameterization, w_std=w_std, b_std=b_std,
                      param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )

    def __call__(self, x: Array, *, dropout_key: Array | None = None) -> Array:
        phi = activation_fn(self.activation)
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = phi(x)
                if dropout_key is not None and self.dropout > 0:
                    dropout_key, sub = jax.random.split(dropout_key)
                    keep = jax.random.bernoulli(sub, 1.0 - self.dropout, x.shape)
                    x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        return x


class CNN(nnx.Module):
    """A small convolutional network: ``depth`` 3x3 conv+ReLU layers, global average pool, dense.

    Inputs are images ``(n, H, W, C)`` (flat inputs of length ``H*W*C`` are reshaped with
    ``image_shape``).  Standard parameterisation (flax defaults); kernels use the generic path.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        channels: int = 32,
        depth: int = 2,
        *,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape}")
        c_in = self.image_shape[-1]
        convs = []
        for _ in range(depth):
            convs.append(nnx.Conv(c_in, channels, kernel_size=(3, 3), rngs=rngs))
            c_in = channels
        self.convs = nnx.List(convs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x: Array, *, dropout_key: Array | None = None) -> Array:
        x = x.reshape((x.shape[0],) + self.image_shape)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.head(x.mean(axis=(1, 2)))


@dataclass(frozen=True, eq=False)
class FunctionalModel:
    """``apply_fn(params, x, dropout_key=None)`` for an nnx model.

    Two functional models of the same architecture (equal nnx graph definitions and no
    non-parameter state) compare equal, so jitted kernels and training steps compiled for one
    are reused for the other: re-initialising with a new seed does not recompile.

    ``params`` is a plain nested dict of arrays (``nnx.to_pure_dict``), so it can be
    differentiated, stored with ``numpy.savez`` and printed.  For :class:`MLP` the object also
    describes its dense layers, which lets :mod:`ntk_tutorial.kernels` use its fast exact path.
    """

    graphdef: Any
    state: Any  # the nnx.State template that pure dicts are poured into
    rest: Any  # non-parameter variables (none for MLP/CNN)
    activation: str | None = None  # set for MLP only

    def __call__(self, params: Any, x: Array, dropout_key: Array | None = None) -> Array:
        state = jax.tree.map(lambda v: v, self.state)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(self.graphdef, state, self.rest)
        return model(x, dropout_key=dropout_key)

    def _key(self):
        rest = self.rest if jax.tree.leaves(self.rest) else None
        return (self.graphdef, self.activation, id(rest) if rest is not None else None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FunctionalModel) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # --- dense-network description used by the kernels' fast path -------------------------
    @property
    def is_dense(self) -> bool:
        return self.activation is not None

    def dense_layers(self, params: Any) -> list[tuple[Array, Array, float, float]]:
        """``[(W, b, w_scale, b_scale), ...]`` such that layer l computes ``a @ W * w_scale + b * b_scale``."""
        model = nnx.merge(self.graphdef, self.state, self.rest)
        return [
            (params["layers"][i]["w"], params["layers"][i]["b"], layer.w_scale, layer.b_scale)
            for i, layer in enumerate(model.layers)
        ]


def functional(model: nnx.Module) -> tuple[FunctionalModel, Any]:
    """Split an nnx model into ``(apply_fn, params)`` with ``apply_fn(params, x) -> logits``.

    Example::

        model = MLP((64, 256, 10), rngs=nnx.Rngs(params=key))
        apply_fn, params = functional(model)
        logits = apply_fn(params, x)          # (n, 10)
    """
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)
    activation = model.activation if isinstance(model, MLP) else None
    return FunctionalModel(graphdef, state, rest, activation), params


def num_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
