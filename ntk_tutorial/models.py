"""Small flax-nnx models and the one functional interface the kernel code needs.

Every kernel in :mod:`ntk_tutorial.kernels` takes ``apply_fn(params, x) -> (n, k)`` logits,
exactly as neural-tangents did.  :func:`functional` turns an nnx model into that pair;
:func:`split` gives ``(apply_fn, params, state)`` for networks with batch norm, whose running
statistics (``state``) are passed explicitly beside the parameters.

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
from functools import lru_cache
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .kernels import ACTIVATIONS, DenseMLP, activation_fn, dense_forward  # noqa: F401 - part of this module's interface

Array = jax.Array

PARAMETERIZATIONS = ("ntk", "standard")


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

    def _layers(self) -> list:
        return [(layer.w[...], layer.b[...], layer.w_scale, layer.b_scale) for layer in self.layers]

    def features(self, x: Array) -> Array:
        """Penultimate features: the input of the readout layer (deterministic network)."""
        return dense_forward(self._layers(), x, self.activation, features=True)

    @property
    def readout_scale(self) -> float:
        """The readout layer computes ``features @ W * readout_scale + ...``."""
        return float(self.layers[-1].w_scale)

    def __call__(self, x: Array, *, dropout_key: Array | None = None) -> Array:
        return dense_forward(self._layers(), x, self.activation, self.dropout, dropout_key)


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

    readout_scale = 1.0

    def features(self, x: Array) -> Array:
        """Globally pooled features, the input of the readout layer."""
        x = x.reshape((x.shape[0],) + self.image_shape)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return x.mean(axis=(1, 2))

    def __call__(self, x: Array, *, dropout_key: Array | None = None) -> Array:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# residual networks with batch normalisation (the active-learning paper's image models)
# ---------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs, param_dtype) -> nnx.Conv:
    # He initialisation (fan-in, ReLU gain), no bias: a batch norm follows or precedes every conv
    return nnx.Conv(c_in, c_out, kernel_size=(kernel, kernel), strides=(stride, stride), padding="SAME",
                    use_bias=False, kernel_init=nnx.initializers.he_normal(), param_dtype=param_dtype,
                    rngs=rngs)


def _bn(c: int, rngs: nnx.Rngs, param_dtype) -> nnx.BatchNorm:
    # momentum 0.9: running statistics settle within tens of steps (active-learning rounds are short)
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, param_dtype=param_dtype, rngs=rngs)


def _feature_dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate <= 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class _ImageNet(nnx.Module):
    """Shared plumbing: flat or image inputs, ``train`` switch for batch norm, feature dropout.

    ``model(x)`` is the deterministic network with batch norm using its running statistics:
    the function whose eNTK the kernels compute (the statistics are constants there, not
    parameters).  ``model(x, train=True)`` normalises with the batch statistics and updates
    the running ones (what :func:`ntk_tutorial.train.train` does through
    :meth:`Model.train_apply`).  ``dropout_key`` drops features before the readout
    (MC dropout for BALD).
    """

    image_shape: tuple
    dropout: float
    readout_scale = 1.0

    def _image(self, x: Array) -> Array:
        if x.ndim == 2:
            x = x.reshape((x.shape[0],) + self.image_shape)
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"{type(self).__name__} expects images {self.image_shape} (or flat "
                             f"vectors of that size), got {x.shape[1:]}")
        # compute in the parameters' dtype (float64 inputs would write float64 batch statistics
        # into float32 variables)
        return x.astype(self.stem.kernel.dtype)

    def __call__(self, x: Array, *, dropout_key: Array | None = None, train: bool = False) -> Array:
        h = self.features(x, train=train)
        return self.head(_feature_dropout(h, self.dropout, dropout_key))


class _PreActBlock(nnx.Module):
    """Wide-ResNet block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs, param_dtype):
        self.bn1 = _bn(c_in, rngs, param_dtype)
        self.conv1 = _conv(c_in, c_out, 3, stride, rngs, param_dtype)
        self.bn2 = _bn(c_out, rngs, param_dtype)
        self.conv2 = _conv(c_out, c_out, 3, 1, rngs, param_dtype)
        self.shortcut = (_conv(c_in, c_out, 1, stride, rngs, param_dtype)
                         if (stride != 1 or c_in != c_out) else None)

    def __call__(self, x: Array, train: bool) -> Array:
        o = jax.nn.relu(self.bn1(x, use_running_average=not train))
        skip = x if self.shortcut is None else self.shortcut(o)
        h = self.conv1(o)
        h = self.conv2(jax.nn.relu(self.bn2(h, use_running_average=not train)))
        return h + skip


class WideResNet(_ImageNet):
    """WRN-(6n+4)-k: a 3x3 stem with 16 channels, three groups of ``n = blocks`` pre-activation
    blocks with ``16k, 32k, 64k`` channels (strides 1, 2, 2), BN-ReLU, global average pooling,
    a dense readout.

    The active-learning paper's "1-block" (SVHN) and "2-block" (CIFAR-10) wide ResNets are
    ``blocks=1`` (WRN-10-k) and ``blocks=2`` (WRN-16-k).  The widening factor is not given in
    our notes of the paper; ``widen=2`` is this package's choice (``--widen`` changes it).
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, blocks: int = 1, widen: int = 2,
                 dropout: float = 0.0, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape}")
        if blocks < 1 or widen < 1:
            raise ValueError(f"blocks and widen must be >= 1, got blocks={blocks}, widen={widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.blocks, self.widen, self.dropout = int(blocks), int(widen), float(dropout)
        self.stem = _conv(self.image_shape[-1], 16, 3, 1, rngs, param_dtype)
        layers, c_in = [], 16
        for group, stride in zip((16, 32, 64), (1, 2, 2)):
            for b in range(self.blocks):
                layers.append(_PreActBlock(c_in, group * self.widen, stride if b == 0 else 1, rngs,
                                           param_dtype))
                c_in = group * self.widen
        self.layers = nnx.List(layers)
        self.bn = _bn(c_in, rngs, param_dtype)
        self.head = nnx.Linear(c_in, num_classes, param_dtype=param_dtype, rngs=rngs)

    def features(self, x: Array, *, train: bool = False) -> Array:
        h = self.stem(self._image(x))
        for layer in self.layers:
            h = layer(h, train)
        h = jax.nn.relu(self.bn(h, use_running_average=not train))
        return h.mean(axis=(1, 2))


def _torch_conv(c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs, param_dtype) -> nnx.Conv:
    """A conv with bias initialised as PyTorch's ``nn.Conv2d`` default (what the released code
    trains): weights and bias uniform in ``+-1/sqrt(fan_in)``."""
    fan_in = c_in * kernel * kernel
    bound = 1.0 / math.sqrt(fan_in)
    return nnx.Conv(c_in, c_out, kernel_size=(kernel, kernel), strides=(stride, stride), padding="SAME",
                    use_bias=True, kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                    bias_init=lambda key, shape, dtype=param_dtype: jax.random.uniform(
                        key, shape, dtype, -bound, bound),
                    param_dtype=param_dtype, rngs=rngs)


def _torch_linear(c_in: int, c_out: int, rngs: nnx.Rngs, param_dtype) -> nnx.Linear:
    """A dense layer initialised as PyTorch's ``nn.Linear`` default."""
    bound = 1.0 / math.sqrt(c_in)
    return nnx.Linear(c_in, c_out, kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                      bias_init=lambda key, shape, dtype=param_dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
                      param_dtype=param_dtype, rngs=rngs)


class _ReleasedBlock(nnx.Module):
    """``wide_basic`` of the released look-ahead code: BN-ReLU-conv3x3-BN-ReLU-conv3x3(stride),
    plus a 1x1 conv of the block's *input* when the shape changes (identity otherwise)."""

    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs, param_dtype):
        self.bn1 = _bn(c_in, rngs, param_dtype)
        self.conv1 = _torch_conv(c_in, c_out, 3, 1, rngs, param_dtype)
        self.bn2 = _bn(c_out, rngs, param_dtype)
        self.conv2 = _torch_conv(c_out, c_out, 3, stride, rngs, param_dtype)
        self.shortcut = (_torch_conv(c_in, c_out, 1, stride, rngs, param_dtype)
                         if (stride != 1 or c_in != c_out) else None)

    def __call__(self, x: Array, train: bool) -> Array:
        h = self.conv1(jax.nn.relu(self.bn1(x, use_running_average=not train)))
        h = self.conv2(jax.nn.relu(self.bn2(h, use_running_average=not train)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class LookaheadWRN(_ImageNet):
    """The wide ResNet of the look-ahead active-learning paper's released code
    (``Wide_ResNet(num_layers, depth, widen_factor)`` in mohamad-amin/ntk-lookahead-active-learning,
    ``src/core/models/wide_resnet.py``), which its MNIST, SVHN and CIFAR-10 experiments train.

    A 3x3 stem to ``16 k`` channels, then ``stages`` stages of ``n = (depth - 4) / 6`` blocks
    (:class:`_ReleasedBlock`) with ``32 k, 64 k, 128 k`` channels (stride 1 for the first
    stage, 2 for the others, on each stage's first block), BN-ReLU, global average pooling and a
    dense readout; every conv has a bias; weights are initialised as PyTorch's defaults.

    The paper's "one-/two-layer WideResNet with maximum width 640" is ``stages=1, widen=20``
    (MNIST, SVHN) and ``stages=2, widen=10`` (CIFAR-10): ``stages`` counts stages, not blocks, so
    this is *not* WRN-10-k / WRN-16-k (:class:`WideResNet`, three stages of 16k, 32k, 64k).
    The paper does not state the depth; ``depth=10`` (one block per stage) is this package's
    choice: the smallest network of that description.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, stages: int = 1, depth: int = 10,
                 widen: int = 20, dropout: float = 0.0, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape}")
        if stages not in (1, 2, 3):
            raise ValueError(f"stages must be 1, 2 or 3 (the released code's num_layers), got {stages}")
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"widen must be >= 1, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.stages, self.depth, self.widen, self.dropout = int(stages), int(depth), int(widen), float(dropout)
        n = (self.depth - 4) // 6
        c_in = 16 * self.widen
        self.stem = _torch_conv(self.image_shape[-1], c_in, 3, 1, rngs, param_dtype)
        layers = []
        for s in range(self.stages):
            c_out = (32, 64, 128)[s] * self.widen
            for b in range(n):
                layers.append(_ReleasedBlock(c_in, c_out, (1 if s == 0 else 2) if b == 0 else 1, rngs,
                                             param_dtype))
                c_in = c_out
        self.layers = nnx.List(layers)
        self.bn = _bn(c_in, rngs, param_dtype)
        self.head = _torch_linear(c_in, num_classes, rngs, param_dtype)

    def features(self, x: Array, *, train: bool = False) -> Array:
        h = self.stem(self._image(x))
        for layer in self.layers:
            h = layer(h, train)
        return jax.nn.relu(self.bn(h, use_running_average=not train)).mean(axis=(1, 2))


class _BasicBlock(nnx.Module):
    """ResNet basic block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs, param_dtype):
        self.conv1 = _conv(c_in, c_out, 3, stride, rngs, param_dtype)
        self.bn1 = _bn(c_out, rngs, param_dtype)
        self.conv2 = _conv(c_out, c_out, 3, 1, rngs, param_dtype)
        self.bn2 = _bn(c_out, rngs, param_dtype)
        if stride != 1 or c_in != c_out:
            self.short_conv = _conv(c_in, c_out, 1, stride, rngs, param_dtype)
            self.short_bn = _bn(c_out, rngs, param_dtype)
        else:
            self.short_conv = self.short_bn = None

    def __call__(self, x: Array, train: bool) -> Array:
        h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        h = self.bn2(self.conv2(h), use_running_average=not train)
        skip = x if self.short_conv is None else self.short_bn(self.short_conv(x),
                                                               use_running_average=not train)
        return jax.nn.relu(h + skip)


class ResNet18(_ImageNet):
    """ResNet18 for 32x32 images (the CIFAR variant: 3x3 stem, no max-pool): four stages of two
    basic blocks with ``width, 2 width, 4 width, 8 width`` channels (``width=64``: 11.2 M
    parameters), global average pooling, dense readout."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, width: int = 64, dropout: float = 0.0,
                 *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.width, self.dropout = int(width), float(dropout)
        self.stem = _conv(self.image_shape[-1], width, 3, 1, rngs, param_dtype)
        self.stem_bn = _bn(width, rngs, param_dtype)
        layers, c_in = [], width
        for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            for b in range(2):
                layers.append(_BasicBlock(c_in, mult * width, stride if b == 0 else 1, rngs, param_dtype))
                c_in = mult * width
        self.layers = nnx.List(layers)
        self.head = nnx.Linear(c_in, num_classes, param_dtype=param_dtype, rngs=rngs)

    def features(self, x: Array, *, train: bool = False) -> Array:
        h = jax.nn.relu(self.stem_bn(self.stem(self._image(x)), use_running_average=not train))
        for layer in self.layers:
            h = layer(h, train)
        return h.mean(axis=(1, 2))


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@dataclass(frozen=True, eq=False)
class Model:
    """An nnx network as functions of plain data: ``model(params, x[, state])`` -> logits.

    ``params`` is a plain nested dict of arrays (``nnx.to_pure_dict``): it can be
    differentiated, stored with ``numpy.savez`` and printed.  ``state`` holds what is not
    differentiated: the running statistics of the batch norms (a plain dict as well), ``None``
    for a network without batch norm.  Both are passed explicitly to every function, the way
    flax linen passed ``{"params", "batch_stats"}``; the record itself holds only the
    architecture (the nnx graph definition and the shapes of its variables), so two models of
    the same architecture are equal and share every compiled function: a new seed or new
    statistics do not recompile.

    * ``model(params, x, state, dropout_key=None)``: evaluation mode (batch norm with the
      running statistics, constants for the kernels);
    * ``model.train_apply(params, state, x, dropout_key)`` -> ``(logits, new state)``: training
      mode (batch statistics, running ones updated);
    * ``model.features(params, x, state)``: the readout layer's input (BADGE, core-set);
    * ``model.population_stats(params, state, x, batch_size)``: running statistics recomputed
      from data.
    """

    graphdef: Any
    params_template: Any  # nnx.State of shapes: where a pure dict of parameters is poured
    state_template: Any  # nnx.State of the other variables (shapes; batch-norm statistics)
    stateful: bool  # has batch-norm statistics (state must be passed)
    has_features: bool
    readout_scale: float = 1.0

    def _merge(self, params: Any, state: Any) -> nnx.Module:
        if self.stateful and state is None:
            raise ValueError("this network has batch-norm statistics: pass its state "
                             "(model, params, state = models.split(nnx_model))")
        values = jax.tree.map(lambda v: v, self.params_template)
        nnx.replace_by_pure_dict(values, params)
        rest = jax.tree.map(lambda v: v, self.state_template)
        if self.stateful:
            nnx.replace_by_pure_dict(rest, state)
        return nnx.merge(self.graphdef, values, rest)

    def __call__(self, params: Any, x: Array, state: Any = None, dropout_key: Array | None = None) -> Array:
        return self._merge(params, state)(x, dropout_key=dropout_key)

    def train_apply(self, params: Any, state: Any, x: Array,
                    dropout_key: Array | None = None) -> tuple[Array, Any]:
        """Training-mode forward pass: ``(logits, new state)``; batch norm normalises with the
        batch's statistics and updates the running ones."""
        model = self._merge(params, state)
        out = model(x, dropout_key=dropout_key, train=True)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return out, nnx.to_pure_dict(rest)

    def features(self, params: Any, x: Array, state: Any = None) -> Array:
        """``(n, h)`` inputs of the readout layer (evaluation mode)."""
        if not self.has_features:
            raise NotImplementedError("this network has no features() method (penultimate features); "
                                      "BADGE and core-set need one")
        return self._merge(params, state).features(x)

    def population_stats(self, params: Any, state: Any, x: Array, batch_size: int | None = None) -> Any:
        """Running statistics recomputed from ``x`` with these parameters: the batch statistics of
        ``x`` (one batch, ``batch_size=None``) or their average over batches of ``batch_size``.

        After training on a small labelled set the exponential running averages lag behind the
        parameters; with the recomputed statistics the network in evaluation mode is the network
        training saw (the released look-ahead code's ``adjust_batchnorm_stats`` does the same,
        averaging batch statistics over a pass of the data)."""
        if not self.stateful:
            raise ValueError("this model has no batch-norm statistics")
        fn = _population_fn(self)
        x = jnp.asarray(x)
        size = x.shape[0] if batch_size is None else int(batch_size)
        parts = [fn(params, state, x[i:i + size]) for i in range(0, x.shape[0], size)]
        return jax.tree.map(lambda *a: sum(a) / len(a), *parts)

    def _key(self):
        leaves, treedef = jax.tree.flatten(self.params_template)
        shapes = tuple((tuple(a.shape), str(a.dtype)) for a in leaves)
        return (self.graphdef, treedef, shapes, self.stateful)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Model) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@lru_cache(maxsize=64)
def _population_fn(model: Model) -> Callable:
    """Jitted ``(params, state, x) -> the batch statistics of x`` (batch norm in training mode
    with momentum 0, so the running statistics become the batch's)."""

    def fn(params, state, x):
        net = model._merge(params, state)
        for _, module in nnx.iter_modules(net):
            if isinstance(module, nnx.BatchNorm):
                module.momentum = 0.0
        net(x, train=True)
        _, _, rest = nnx.split(net, nnx.Param, ...)
        return nnx.to_pure_dict(rest)

    return jax.jit(fn)


def call(apply_fn: Callable, params: Any, x: Array, state: Any = None, dropout_key: Array | None = None) -> Array:
    """``apply_fn(params, x)``, with ``state`` and ``dropout_key`` passed only when given (a plain
    ``f(params, x)`` takes neither)."""
    args = () if state is None else (state,)
    if dropout_key is None:
        return apply_fn(params, x, *args)
    return apply_fn(params, x, *args, dropout_key=dropout_key)


def has_features(apply_fn: Callable) -> bool:
    """Whether ``apply_fn`` gives penultimate features: an MLP (:class:`~ntk_tutorial.kernels.DenseMLP`)
    or a :class:`Model` whose network has a ``features`` method."""
    return isinstance(apply_fn, DenseMLP) or (isinstance(apply_fn, Model) and apply_fn.has_features)


@lru_cache(maxsize=64)
def _jit(apply_fn: Callable, what: str) -> Callable:
    if what == "features":
        return jax.jit(lambda params, x, state: apply_fn.features(params, x, state))
    return jax.jit(lambda params, x, state, dropout_key: call(apply_fn, params, x, state, dropout_key))


def eval_fn(apply_fn: Callable, what: str = "logits") -> Callable:
    """Jitted ``f(params, x, state=None, dropout_key=None)`` for ``apply_fn``: its logits, or with
    ``what="features"`` the penultimate features (:func:`has_features`).

    Compiled once per architecture (``apply_fn`` compares by architecture), with the state as
    data, so models that differ only in their parameters or batch-norm statistics (every
    active-learning cycle) share one compiled function."""
    if what not in ("logits", "features"):
        raise ValueError(f"what must be 'logits' or 'features', got {what!r}")
    if what == "features" and not has_features(apply_fn):
        raise NotImplementedError("penultimate features need a model from ntk_tutorial.models "
                                  "(models.functional or models.split of an MLP, CNN or ResNet)")
    f = _jit(apply_fn, what)
    if what == "features":
        return lambda params, x, state=None, dropout_key=None: f(params, x, state)
    return lambda params, x, state=None, dropout_key=None: f(params, x, state, dropout_key)


def split(model: nnx.Module) -> tuple[Callable, Any, Any]:
    """Split an nnx model into ``(apply_fn, params, state)``: its functions and its data.

    ``apply_fn`` is a :class:`~ntk_tutorial.kernels.DenseMLP` for an :class:`MLP` (the kernels'
    dense route applies) and a :class:`Model` otherwise; ``state`` is the batch-norm running
    statistics (a pure dict), or ``None`` for a network without batch norm.
    """
    graphdef, values, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(values)
    if isinstance(model, MLP):
        scales = tuple((float(layer.w_scale), float(layer.b_scale)) for layer in model.layers)
        return DenseMLP(model.activation, scales, float(model.dropout)), params, None
    stateful = bool(jax.tree.leaves(rest))
    # the record only gives the structure: shapes, not arrays (compiled functions are cached
    # per architecture, and a wide network's initial weights should not stay alive)
    record = Model(graphdef, _shapes(values), _shapes(rest) if stateful else rest, stateful,
                   hasattr(model, "features"), float(getattr(model, "readout_scale", 1.0)))
    return record, params, (nnx.to_pure_dict(rest) if stateful else None)


def functional(model: nnx.Module) -> tuple[Callable, Any]:
    """Split a network without state into ``(apply_fn, params)`` with ``apply_fn(params, x) -> logits``.

    Example::

        model = MLP((64, 256, 10), rngs=nnx.Rngs(params=key))
        apply_fn, params = functional(model)
        logits = apply_fn(params, x)          # (n, 10)

    Networks with batch norm have state as well: use :func:`split`.
    """
    apply_fn, params, state = split(model)
    if state is not None:
        raise ValueError(f"{type(model).__name__} has batch-norm statistics: use "
                         "apply_fn, params, state = models.split(model) and pass state= on")
    return apply_fn, params


def num_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
