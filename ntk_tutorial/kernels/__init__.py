"""Empirical and infinite-width neural tangent kernels in plain JAX.

One model interface: ``apply_fn(params, x) -> (n, k)`` logits, for any JAX function; a model
with state (batch-norm statistics) is ``apply_fn(params, x, state)`` and every kernel takes
``state=``, the way neural-tangents passes ``f(params, x, **kwargs)``: the state is data beside
the parameters (not differentiated), so one compiled kernel serves every set of statistics.
With ``J(x) = d f(x; params) / d params`` (a ``k x P`` matrix):

* :func:`entk`   ``Theta(x, x') = J(x) J(x')^T``, shape ``(n1, n2, k, k)``;
* :func:`pntk`   the kernel of ``g(x) = (1/sqrt(k)) sum_j f_j(x)``, equal to
  ``(1/k) sum_ij Theta_ij``, shape ``(n1, n2)`` (Mohamadi, Bae & Sutherland 2023);
* :func:`trace_ntk` ``(1/k) sum_i Theta_ii`` (what neural-tangents' default ``trace_axes=(-1,)``
  returns: it averages over the traced axis) and :func:`single_logit_ntk` ``Theta_11``;
* :func:`infinite_ntk`, :func:`infinite_nngp`: the analytic infinite-width kernels of a fully
  connected network in NTK parameterisation (Jacot et al. 2018; Arora et al. 2019).

Two exact routes compute the empirical kernels:

* the *generic* route computes every per-example gradient once and contracts them in float32
  matrix products; it works for any model.  The gradients of a chunk of examples come from one
  batched backward pass where :mod:`ntk_tutorial.kernels.pergrad` proves the examples independent (its
  convolution weight gradients are products of image patches with back-propagated vectors),
  else from ``vmap(grad)``.  When they do not fit the Jacobian budget they are written once to a
  scratch file and streamed against a resident block (the ``"stream"`` route), or, when the
  scratch file would not fit on disk either, recomputed block by block (``"recompute"``);
* the *dense* route, chosen automatically when ``apply_fn`` is a :class:`DenseMLP` (what
  :func:`ntk_tutorial.models.functional` returns for an MLP), never forms a
  ``P``-sized Jacobian.  For a dense layer ``z = a W c + b c_b`` the Jacobian with respect to
  ``W`` is ``c a (x) delta`` with ``delta = d f / d z``, so each layer contributes
  ``(c^2 <a(x), a(x')> + c_b^2) * <delta_i(x), delta_j(x')>``: a product of two Gram
  matrices, one of the activations entering the layer and one of the back-propagated vectors
  leaving it.  Cost per layer ``O(n^2 (n_in + k^2 n_out))`` instead of ``O(n^2 k^2 n_in n_out)``.

Every function takes ``batch_size`` to compute the kernel in blocks, so the Jacobian of a large
set never sits in memory whole; results do not depend on it.  With several visible JAX devices
the gradient passes and the products are split over them by rows (``jax.shard_map``), each
gradient still computed once, and ``out="kernel.npy"`` writes a kernel larger than
memory block by block into a memory-mapped file.  A memory guard refuses, before allocating, a
kernel whose computation cannot fit and names these routes (:class:`KernelTooLargeError`): it
counts the route's real peak (:func:`plan_kernel`: intermediates, Jacobian blocks or features in
flight, copies), against the available memory, a container's cgroup limit included
(:func:`available_memory`).

Every input goes through one validation layer (:func:`_validate`): integer and boolean inputs
(raw uint8 pixels) are cast to the working float dtype, complex or non-numeric ones, empty
batches, NaN/inf and inputs the model cannot take raise a ``TypeError``/``ValueError`` that says
what was wrong.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import pergrad

Array = jax.Array
ApplyFn = Callable[..., Array]  # apply_fn(params, x) or, with state, apply_fn(params, x, state)

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "erf": jax.scipy.special.erf,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "linear": lambda z: z,
}


def activation_fn(name: str) -> Callable[[Array], Array]:
    """Look up an activation by name; unknown names list the available ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def dense_forward(layers: Sequence[tuple[Array, Array, float, float]], x: Array, activation: str,
                  dropout: float = 0.0, dropout_key: Array | None = None, features: bool = False) -> Array:
    """The forward pass of a fully connected network, the one :class:`DenseMLP` and
    :class:`ntk_tutorial.models.MLP` both run: layer ``l`` computes ``a @ W_l * w_scale_l + b_l *
    b_scale_l`` for ``layers[l] = (W_l, b_l, w_scale_l, b_scale_l)``; every layer but the last is
    followed by ``activation`` and, with a ``dropout_key``, by dropout at rate ``dropout``.
    ``features``: stop before the readout (the penultimate features, no dropout)."""
    phi = activation_fn(activation)
    a = x.reshape(x.shape[0], -1)
    last = len(layers) - 1
    for i, (w, b, cw, cb) in enumerate(layers):
        if features and i == last:
            break
        a = (a @ w) * cw + b * cb
        if i < last:
            a = phi(a)
            if dropout_key is not None and dropout > 0 and not features:
                dropout_key, sub = jax.random.split(dropout_key)
                keep = jax.random.bernoulli(sub, 1.0 - dropout, a.shape)
                a = jnp.where(keep, a / (1.0 - dropout), 0.0)
    return a


@dataclass(frozen=True)
class DenseMLP:
    """The forward pass of a fully connected network as plain data: ``apply_fn(params, x)``.

    Layer ``l`` computes ``z = a @ W_l * w_scale_l + b_l * b_scale_l`` with ``W_l, b_l =
    params["layers"][l]["w"], params["layers"][l]["b"]``; every layer but the last is followed by
    ``activation`` (and, when a ``dropout_key`` is passed, by dropout at rate ``dropout``).
    Kernels of a ``DenseMLP`` take the dense route (Gram matrices, no Jacobian).  Two MLPs of the
    same widths' scales and activation are equal, so compiled kernels and training steps are
    shared by every seed.  :func:`ntk_tutorial.models.functional` of a
    :class:`~ntk_tutorial.models.MLP` returns one.
    """

    activation: str
    scales: tuple  # ((w_scale, b_scale), ...) per layer
    dropout: float = 0.0

    def layers(self, params: Any) -> list[tuple[Array, Array, float, float]]:
        """``[(W, b, w_scale, b_scale), ...]``, one entry per layer."""
        return [(params["layers"][i]["w"], params["layers"][i]["b"], cw, cb)
                for i, (cw, cb) in enumerate(self.scales)]

    @property
    def readout_scale(self) -> float:
        """The readout computes ``features @ W * readout_scale + ...``."""
        return float(self.scales[-1][0])

    def features(self, params: Any, x: Array, state: Any = None) -> Array:
        """Penultimate features: the input of the readout layer (no dropout)."""
        return dense_forward(self.layers(params), x, self.activation, features=True)

    def __call__(self, params: Any, x: Array, dropout_key: Array | None = None) -> Array:
        return dense_forward(self.layers(params), x, self.activation, self.dropout, dropout_key)


def bind(apply_fn: ApplyFn, state: Any = None) -> Callable[[Any, Array], Array]:
    """``(params, x) -> apply_fn(params, x[, state])``: the function whose kernel is taken."""
    if state is None:
        return apply_fn
    return lambda params, x: apply_fn(params, x, state)

KINDS = ("entk", "pntk", "trace", "single")
MEMORY_ENV = "NTK_TUTORIAL_MAX_BYTES"
# Budget for the Jacobians held in memory at once on the generic route when batch_size is not
# given: on the CPU a quarter of the available memory, at least 512 MiB and at most 8 GiB; a
# quarter of an accelerator's memory; NTK_TUTORIAL_JACOBIAN_BYTES overrides both.  Jacobians that
# do not fit are computed once each and streamed through a scratch file (the "stream" route).
_JACOBIAN_BLOCK_BYTES = 512 * 2**20
_JACOBIAN_BLOCK_MAX = 8 * 2**30
JACOBIAN_ENV = "NTK_TUTORIAL_JACOBIAN_BYTES"
# Folder of the stream route's scratch file of Jacobians (default: the system's temporary folder)
SCRATCH_ENV = "NTK_TUTORIAL_SCRATCH"
# Most bytes the stream route may write there (default: the folder's free space).  Jacobians
# larger than that take the "recompute" route: the gradients of each streamed block are computed
# again for every resident block instead of being read back (no scratch file; more gradient
# passes, which an accelerator can afford better than a disk it does not have).
SCRATCH_BYTES_ENV = "NTK_TUTORIAL_SCRATCH_BYTES"


def _env_bytes(name: str, low: int, rule: str) -> int | None:
    """The byte count in environment variable ``name`` (``None`` when unset or empty); a value
    that is not a number, or is below ``low``, raises ``ValueError`` saying it must be ``rule``."""
    env = os.environ.get(name)
    if not env:
        return None
    try:
        value = int(float(env))
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {env!r}") from None
    if value < low:
        raise ValueError(f"{name} must be {rule}, got {env!r}")
    return value


def _jacobian_budget() -> int:
    """Bytes of Jacobians the generic route may hold in memory at once (see ``JACOBIAN_ENV``)."""
    value = _env_bytes(JACOBIAN_ENV, 1, "positive")
    if value is not None:
        return value
    device = jax.devices()[0]
    if device.platform != "cpu":
        try:
            return int(device.memory_stats()["bytes_limit"]) // 4
        except Exception:  # backends without memory statistics
            pass
    return int(min(max(available_memory() // 4, _JACOBIAN_BLOCK_BYTES), _JACOBIAN_BLOCK_MAX))


class KernelTooLargeError(MemoryError):
    """A kernel (or the memory needed to compute it) does not fit in the available memory."""


# ---------------------------------------------------------------------------------------------
# memory accounting
# ---------------------------------------------------------------------------------------------


def kernel_nbytes(n1: int, n2: int, k: int, kind: str = "entk", itemsize: int = 4) -> int:
    """Bytes of a kernel's output: ``n1*n2*k*k`` entries for ``"entk"``, ``n1*n2`` otherwise.

    Example: CIFAR-10 (n = 50 000, k = 10) in float64 needs ``kernel_nbytes(50_000, 50_000, 10,
    "entk", 8)`` = 2.0e12 B (1.8 TiB) for the eNTK and 2.0e10 B (18.6 GiB) for the pNTK.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {KINDS}")
    entries = int(n1) * int(n2) * (int(k) ** 2 if kind == "entk" else 1)
    return entries * int(itemsize)


# What the memory guard refuses above: this fraction of the available memory (room for the
# interpreter, compiled code and the caller's own arrays).
MEMORY_FRACTION = 0.8
# Where the memory cgroups are mounted and which one this process is in (module attributes, so
# that tests can point them at a fake tree).
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def _read_number(path: Any) -> int | None:
    from pathlib import Path

    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:  # "max": no limit
        return None


def _stat_value(path: Any, key: str) -> int:
    from pathlib import Path

    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs() -> list[tuple[str, Any]]:
    """``(version, folder)`` of every memory cgroup this process is in, innermost first, and of
    their ancestors (a limit set on a parent applies too); the mount roots last, for containers
    whose cgroup namespace shows their own cgroup as the root."""
    from pathlib import Path, PurePosixPath

    root = Path(CGROUP_ROOT)
    try:
        lines = Path(PROC_CGROUP).read_text().splitlines()
    except OSError:
        lines = []
    found: list[tuple[str, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        rel_path = PurePosixPath(rel.lstrip("/") or ".")
        if hierarchy == "0" and controllers == "":
            version, base = "v2", root
        elif "memory" in controllers.split(","):
            version, base = "v1", root / "memory"
        else:
            continue
        for anc in (rel_path, *rel_path.parents):
            found.append((version, base / str(anc)))
    found += [("v2", root), ("v1", root / "memory")]
    out, seen = [], set()
    for version, folder in found:
        key = (version, str(Path(folder)))
        if key not in seen:
            seen.add(key)
            out.append((version, Path(folder)))
    return out


def cgroup_available_memory() -> int | None:
    """Bytes this process may still allocate under its memory cgroup's limit (the tightest of its
    cgroup and their parents; cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``): the limit
    minus the usage plus the reclaimable page cache (``inactive_file``).  ``None`` without a
    limit (or outside Linux).  A container's limit is what kills a process, whatever the machine
    has free."""
    best = None
    for version, folder in _cgroup_dirs():
        if version == "v2":
            limit = _read_number(folder / "memory.max")
            usage = _read_number(folder / "memory.current")
            reclaimable = _stat_value(folder / "memory.stat", "inactive_file")
        else:
            limit = _read_number(folder / "memory.limit_in_bytes")
            usage = _read_number(folder / "memory.usage_in_bytes")
            reclaimable = _stat_value(folder / "memory.stat", "total_inactive_file")
        if limit is None or limit >= _NO_LIMIT:
            continue
        free = max(0, limit - (usage or 0) + reclaimable)
        best = free if best is None else min(best, free)
    return best


def _system_available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 8 * 2**30


def _available() -> tuple[int, str]:
    """``(bytes, where the number comes from)`` (see :func:`available_memory`)."""
    value = _env_bytes(MEMORY_ENV, 0, "a number of bytes >= 0")
    if value is not None:
        return value, f"${MEMORY_ENV}"
    system = _system_available_memory()
    cgroup = cgroup_available_memory()
    if cgroup is not None and cgroup < system:
        return cgroup, "under this container's memory cgroup limit"
    return system, "free on this machine"


def available_memory() -> int:
    """Bytes this process may use for a kernel: ``$NTK_TUTORIAL_MAX_BYTES`` if set, else the
    smaller of the system's available memory (``MemAvailable`` on Linux, physical memory
    elsewhere) and what the memory cgroup's limit leaves (:func:`cgroup_available_memory`)."""
    return _available()[0]


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def check_memory(need: int, what: str, advice: str = "") -> None:
    """Raise :class:`KernelTooLargeError` when ``need`` bytes (a computation's estimated peak) do
    not fit in ``MEMORY_FRACTION`` of the available memory; call it *before* allocating.

    ``what`` names the computation, ``advice`` says what to do instead (ending in ``"; "``)."""
    have, source = _available()
    if need > MEMORY_FRACTION * have:
        raise KernelTooLargeError(
            f"{what} needs about {_gib(need)} at its peak but only {_gib(have)} is available "
            f"({source}). {advice}set ${MEMORY_ENV} (bytes) to change the limit."
        )


def check_disk_space(path: Any, nbytes: int) -> None:
    """Raise :class:`KernelTooLargeError` when the folder of ``path`` lacks ``nbytes`` free."""
    import shutil
    from pathlib import Path

    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise ValueError(f"cannot write the kernel to {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write the kernel to {path}: folder {folder} is not writable; "
                         "choose another path for out=")
    if Path(path).expanduser().is_dir():
        raise ValueError(f"cannot write the kernel to {path}: it is a folder; give a file name "
                         "such as out='kernel.npy'")
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise KernelTooLargeError(
            f"the kernel needs {_gib(nbytes)} on disk but {folder} has {_gib(free)} free; "
            "choose another folder for out=, fewer points, or the pNTK"
        )


def check_kernel_memory(n1: int, n2: int, k: int, kind: str, itemsize: int,
                        peak: int | None = None) -> None:
    """Raise :class:`KernelTooLargeError` when computing the kernel would not fit in
    ``MEMORY_FRACTION`` (80%) of the available memory.

    ``peak`` is the estimated peak of the computation (:func:`kernel_memory`: the output plus the
    intermediates and copies of the route that computes it); without it only the output counts.
    """
    out_bytes = kernel_nbytes(n1, n2, k, kind, itemsize)
    need = out_bytes if peak is None else max(int(peak), out_bytes)
    hint = (
        f"the pNTK of the same points needs only {_gib(kernel_nbytes(n1, n2, k, 'pntk', itemsize))}"
        " for its output (use ntk_tutorial.kernels.pntk); "
        if kind == "entk"
        else ""
    )
    check_memory(
        need,
        f"a {kind} kernel of {n1} x {n2} points" + (f" with k={k} outputs" if kind == "entk" else "")
        + f" ({_gib(out_bytes)} of output)",
        hint + "compute it for fewer points (a random pool subset), in float32, in smaller blocks "
        "(batch_size=), or write it block by block to a memory-mapped file on disk with "
        "out='kernel.npy'; ",
    )


# ---------------------------------------------------------------------------------------------
# input validation: the one layer every kernel's inputs go through
# ---------------------------------------------------------------------------------------------


def _default_float() -> Any:
    """The float dtype JAX computes in by default: float64 with ``jax_enable_x64``, else float32."""
    return jnp.result_type(float)


def working_dtype(params: Any = None) -> Any:
    """The float dtype a kernel computes in: that of the parameters' floating leaves (promoted
    together), or JAX's default float dtype when there are none (the infinite-width kernels)."""
    leaves = [leaf for leaf in jax.tree.leaves(params)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else _default_float()


def _as_input(x: Any, name: str, working: Any) -> Any:
    """One input batch as a JAX array in the working float dtype.

    Integer and boolean inputs (raw uint8 pixels, one-hot booleans) are cast to the working
    dtype, and so are half-precision floats (float16, bfloat16) narrower than it: products of
    activations computed in the input's dtype overflow (uint8: the pNTK 54% off) or lose digits.
    float32 and float64 inputs are used as they are (what the kernels always computed).  Complex,
    string and object inputs raise ``TypeError``.  A ``jax.ShapeDtypeStruct`` passes through
    (cast in dtype only), for :func:`kernel_memory`."""
    if isinstance(x, jax.ShapeDtypeStruct):
        dtype = np.dtype(x.dtype)
        a = x
    else:
        dtype = getattr(x, "dtype", None)
        dtype = np.dtype(dtype) if dtype is not None else np.asarray(x).dtype
        a = None
    if dtype.kind == "c":
        raise TypeError(
            f"{name} is complex ({dtype}); kernels take real inputs: pass x.real if the imaginary "
            "part is zero, or stack real and imaginary parts as features"
        )
    if dtype.kind not in "biuf" and dtype != jnp.bfloat16:
        raise TypeError(
            f"{name} must be a numeric array of shape (n, ...), got dtype {dtype} "
            f"({type(x).__name__}); convert it with numpy.asarray(x, dtype=float)"
        )
    if dtype.kind in "biu":
        target = working
    elif dtype.itemsize < 4 and dtype.itemsize < np.dtype(working).itemsize:  # float16, bfloat16
        target = working
    else:
        target = jax.dtypes.canonicalize_dtype(dtype)  # float64 is float32 without jax_enable_x64
    if a is not None:  # a ShapeDtypeStruct
        return jax.ShapeDtypeStruct(a.shape, target)
    try:
        a = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array of shape (n, ...): {err}") from None
    return a if a.dtype == target else a.astype(target)


def _validate(x1: Array, x2: Array | None, working: Any = None) -> tuple[Array, Array]:
    """The input layer of every kernel: dtype (:func:`_as_input`), shape, size and finiteness."""
    working = _default_float() if working is None else working
    x1 = _as_input(x1, "x1", working)
    x2 = x1 if x2 is None else _as_input(x2, "x2", working)
    if x1.ndim < 2 or x2.ndim < 2:
        raise ValueError(
            f"inputs must be batches with a leading example axis, got shapes {x1.shape} and "
            f"{x2.shape}; for one example use x[None]"
        )
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 must have the same per-example shape, got {x1.shape[1:]} and {x2.shape[1:]}"
        )
    for name, x in (("x1", x1), ("x2", x2)):
        if x.shape[0] == 0:
            raise ValueError(f"{name} has no examples (shape {x.shape}); pass at least one")
        if math.prod(x.shape[1:]) == 0:
            raise ValueError(f"{name} has no features (shape {x.shape}); each example needs at least one")
        if isinstance(x, jax.ShapeDtypeStruct):
            continue
        if not bool(jnp.all(jnp.isfinite(x))):
            bad = int(jnp.sum(~jnp.isfinite(x)))
            raise ValueError(
                f"{name} contains {bad} NaN or infinite values; clean or impute the inputs "
                "before computing a kernel"
            )
    return x1, x2


def _check_params(params: Any) -> None:
    for leaf in jax.tree.leaves(params):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(
                "the network parameters contain NaN or infinite values (did training diverge? "
                "lower the learning rate)"
            )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _output_shape(apply_fn: ApplyFn, params: Any, x: Any, state: Any = None) -> Any:
    """``jax.eval_shape`` of one example, with a clear error when the model cannot take it."""
    one = jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)
    try:
        out = jax.eval_shape(bind(apply_fn, state), params, one)
    except Exception as err:  # noqa: BLE001 - models raise TypeError, ValueError, ...
        expected = ""
        if isinstance(apply_fn, DenseMLP):
            try:
                d_in = int(apply_fn.layers(params)[0][0].shape[0])
                expected = f"; this MLP takes {d_in} features per example"
            except Exception:  # noqa: BLE001
                pass
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"apply_fn cannot take inputs of per-example shape {tuple(x.shape[1:])} "
            f"({type(err).__name__}: {first[:200]}){expected}; pass inputs of the shape the model "
            "was built for"
        ) from None
    if len(getattr(out, "shape", ())) != 2:
        raise ValueError(
            f"apply_fn(params, x) must return (n, k) logits, got per-batch shape {getattr(out, 'shape', out)}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# the generic route: per-example Jacobians
# ---------------------------------------------------------------------------------------------


def _single(apply_fn: ApplyFn) -> Callable[[Any, Array, Any], Array]:
    # aux: the model's state (batch-norm statistics) passed as data, else None (not passed)
    return lambda p, xi, aux: (apply_fn(p, xi[None]) if aux is None else apply_fn(p, xi[None], aux))[0]


# Examples per gradient pass (64-256 were fastest per gradient on the CPU; much larger chunks
# cost more per gradient); fewer when one example's activations, patches and features are large.
_GRADIENT_CHUNK = 64
# How per-example gradients are computed on the Jacobian route: "auto" (one batched backward
# pass, :mod:`ntk_tutorial.kernels.pergrad`, wherever it applies, else vmap(grad)), "structured" (the
# same, but a model it does not apply to raises) or "vmap" (always vmap(grad); benchmarks
# compare the two).
GRADIENTS = "auto"
_EVALUATIONS = [0]


def gradient_evaluations() -> int:
    """Per-example gradient evaluations of the Jacobian route since this process started (one
    per example and pass; the eNTK's ``k`` logits of one example count as one).  A kernel of
    ``n`` points costs ``n`` of them when every gradient is computed once (:class:`KernelPlan`
    states how many a kernel will take)."""
    return _EVALUATIONS[0]


def _struct(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def _struct_key(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in leaves)


_ANALYSES: dict = {}


def _gradient_analysis(apply_fn: ApplyFn, params: Any, chunk_shape: tuple, dtype: Any, aux: Any):
    """``(pergrad.Analysis or None, reason)`` for ``apply_fn`` on chunks of this shape, cached
    per architecture and shapes (the jaxpr is traced once)."""
    key = (apply_fn, _struct_key(params), tuple(chunk_shape), str(dtype), _struct_key(aux))
    if key not in _ANALYSES:
        if len(_ANALYSES) > 256:
            _ANALYSES.clear()
        x = jax.ShapeDtypeStruct(tuple(chunk_shape), dtype)
        try:
            found = (pergrad.analyse(apply_fn, _struct(params), x, None if aux is None else _struct(aux)), "")
        except pergrad.Unsupported as err:
            found = (None, str(err))
        except Exception as err:  # noqa: BLE001 - a model the analysis cannot trace: vmap(grad)
            found = (None, f"{type(err).__name__}: {str(err)[:200]}")
        _ANALYSES[key] = found
    return _ANALYSES[key]


def _gradient_mode(apply_fn: ApplyFn, params: Any, chunk_shape: tuple, dtype: Any, aux: Any) -> str:
    """``"structured"`` or ``"vmap"`` (see ``GRADIENTS``)."""
    if GRADIENTS not in ("auto", "structured", "vmap"):
        raise ValueError(f"kernels.GRADIENTS must be 'auto', 'structured' or 'vmap', got {GRADIENTS!r}")
    if GRADIENTS == "vmap":
        return "vmap"
    found, reason = _gradient_analysis(apply_fn, params, chunk_shape, dtype, aux)
    if found is None and GRADIENTS == "structured":
        raise ValueError(f"per-example gradients from one backward pass do not apply to this model "
                         f"({reason}); set kernels.GRADIENTS = 'auto'")
    return "vmap" if found is None else "structured"


@lru_cache(maxsize=64)
def _features_fn(apply_fn: ApplyFn, kind: str, gradients: str = "vmap") -> Callable:
    """A jitted ``(params, x, aux) -> features`` with every leaf's gradient flattened into one
    axis: ``(c, P)`` for the pNTK and single-logit kernel (one gradient per example), ``(c, k, P)``
    for the eNTK and trace kernel (one per example and logit).  ``gradients="structured"``: all
    examples' gradients from one batched backward pass (:mod:`ntk_tutorial.kernels.pergrad`); else
    ``vmap`` of each example's own gradient."""
    if gradients == "structured":
        def features(p, x, aux):
            out = jax.eval_shape(lambda q, xx, a: apply_fn(q, xx) if a is None else apply_fn(q, xx, a), p, x, aux)
            c, k = out.shape
            if kind == "pntk":
                ct = jnp.full((c, k), 1.0 / math.sqrt(k), out.dtype)
            elif kind == "single":
                ct = jnp.zeros((c, k), out.dtype).at[:, 0].set(1.0)
            else:  # one cotangent per logit: the rows of the Jacobian
                ct = jnp.broadcast_to(jnp.eye(k, dtype=out.dtype)[:, None, :], (k, c, k))
            grads = jax.tree.leaves(pergrad.per_example_grads(apply_fn, p, x, aux, ct))
            if ct.ndim == 2:
                return jnp.concatenate([g.reshape(c, -1) for g in grads], axis=1)
            return jnp.concatenate([g.reshape(k, c, -1) for g in grads], axis=2).transpose(1, 0, 2)

        return jax.jit(features)
    f = _single(apply_fn)
    if kind in ("entk", "trace"):
        def per_example(p, xi, aux):
            jac = jax.jacrev(f)(p, xi, aux)
            return jnp.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)
    else:
        def scalar(p, xi, aux):
            out = f(p, xi, aux)
            return out.sum() / jnp.sqrt(out.shape[-1]) if kind == "pntk" else out[0]

        def per_example(p, xi, aux):
            return jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(jax.grad(scalar)(p, xi, aux))])
    return jax.jit(jax.vmap(per_example, (None, 0, None)))


def _all_features(apply_fn: ApplyFn, kind: str, params: Any, x: Array, aux: Any, chunk: int,
                  gradients: str, devices: Any = ()) -> Array:
    """Per-example gradients of every point of ``x``, each computed once, in chunks of ``chunk``
    examples (the last chunk padded, so one compilation serves every chunk); with several
    ``devices`` each takes one chunk of every group of ``chunk x len(devices)`` examples."""
    fn = _features_fn(apply_fn, kind, gradients)
    d = max(len(devices), 1)
    if d > 1:
        fn = _sharded_rows(fn, tuple(devices), 3, split=1)
    n = x.shape[0]
    c = min(chunk, -(-n // d)) * d
    parts = []
    for i in range(0, n, c):
        xb = x[i:i + c]
        pad = c - xb.shape[0]
        if pad:
            xb = jnp.concatenate([xb, jnp.repeat(xb[-1:], pad, axis=0)])
        parts.append(fn(params, xb, aux)[:c - pad])
        _EVALUATIONS[0] += c - pad
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


@lru_cache(maxsize=64)
def _sharded_rows(fn: Callable, devices: tuple, n_args: int, split: int) -> Callable:
    """``fn`` with the rows of its argument number ``split`` (and of its result) split across
    ``devices`` (``jax.shard_map`` over a 1-D mesh; the other arguments replicated, rows are
    independent so nothing is communicated).  The caller pads the rows to a multiple of
    ``len(devices)``."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("rows",))
    specs = tuple(P("rows") if i == split else P() for i in range(n_args))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("rows"), check_vma=False))


def _product(f1: Array, f2: Array, kind: str, devices: Any = ()) -> Array:
    """:func:`_contract`, with ``f1``'s rows split across several ``devices``."""
    d = len(devices)
    if d <= 1:
        return _contract(f1, f2, kind)
    n = f1.shape[0]
    pad = (-n) % d
    if pad:
        f1 = jnp.concatenate([f1, jnp.zeros((pad, *f1.shape[1:]), f1.dtype)])
    return _sharded_rows(_contractor(kind), tuple(devices), 2, split=0)(f1, f2)[:n]


@lru_cache(maxsize=8)
def _contractor(kind: str) -> Callable:
    """``_contract`` for one kind as a function of the two feature blocks (one object per kind,
    so that :func:`_sharded_rows` compiles it once)."""
    return lambda f1, f2: _contract(f1, f2, kind)


def _feature_bytes(apply_fn: ApplyFn, params: Any, x: Array, kind: str, state: Any = None) -> int:
    """Bytes of one example's features on the features route (``k`` gradients for the eNTK)."""
    n_params = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    k = _output_shape(apply_fn, params, x, state).shape[-1]
    return n_params * (k if kind in ("entk", "trace") else 1) * np.dtype(x.dtype).itemsize


def _chunk_size(apply_fn: ApplyFn, params: Any, x: Any, aux: Any, kind: str, k: int,
                budget: int | None = None) -> tuple[int, str, int]:
    """``(examples per gradient pass, "structured" or "vmap", transient bytes per example)``:
    at most ``_GRADIENT_CHUNK``, fewer when one example's activations (``k`` backward passes for
    the eNTK), image patches and features in flight would exceed half the Jacobian budget."""
    chunk_shape = (min(_GRADIENT_CHUNK, int(x.shape[0])), *x.shape[1:])
    gradients = _gradient_mode(apply_fn, params, chunk_shape, x.dtype, aux)
    found, _ = _gradient_analysis(apply_fn, params, chunk_shape, x.dtype, aux)
    kk = k if kind in ("entk", "trace") else 1
    feats = sum(int(leaf.size) for leaf in jax.tree.leaves(params)) * kk * np.dtype(x.dtype).itemsize
    act = patches = 0
    if found is not None:
        act, patches = found.activation_bytes, found.patch_bytes
    else:  # without the analysis: the input and its first layer's worth, per example
        act = 8 * math.prod(x.shape[1:]) * np.dtype(x.dtype).itemsize
    transient = (1 + kk) * act + 2 * patches + 3 * feats
    budget = _jacobian_budget() if budget is None else budget
    chunk = int(max(1, min(_GRADIENT_CHUNK, int(x.shape[0]), (budget // 2) // max(transient, 1))))
    return chunk, gradients, int(transient)


_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 products on accelerators too (no TF32)


@partial(jax.jit, static_argnames="kind")
def _contract(f1: Array, f2: Array, kind: str) -> Array:
    """The kernel from per-example gradients: one matrix product (two for the trace kernel)."""
    if kind in ("pntk", "single"):
        return jnp.matmul(f1, f2.T, precision=_HIGHEST)
    if kind == "trace":
        return jnp.einsum("aip,bip->ab", f1, f2, precision=_HIGHEST) / f1.shape[1]
    n1, k, p = f1.shape
    n2 = f2.shape[0]
    prod = jnp.matmul(f1.reshape(n1 * k, p), f2.reshape(n2 * k, p).T, precision=_HIGHEST)
    return prod.reshape(n1, k, n2, k).transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# the dense route: Gram matrices of activations and back-propagated vectors
# ---------------------------------------------------------------------------------------------


def _dense_feats(apply_fn: Any, p: Any, x: Array, kind: str):
    """Per-layer (activation into the layer, back-propagated vectors out of it, scales)."""
    layers = apply_fn.layers(p)
    phi = activation_fn(apply_fn.activation)
    dphi = jax.grad(lambda z: phi(z).sum())
    a = x.reshape(x.shape[0], -1)
    acts, pres = [], []
    for i, (w, b, cw, cb) in enumerate(layers):
        acts.append(a)
        z = jnp.matmul(a, w, precision=_HIGHEST) * cw + b * cb
        pres.append(z)
        if i < len(layers) - 1:
            a = phi(z)
    n, k = x.shape[0], layers[-1][0].shape[1]
    dtype = pres[-1].dtype
    if kind in ("entk", "trace"):
        delta = jnp.broadcast_to(jnp.eye(k, dtype=dtype), (n, k, k))  # (n, logit, unit)
    elif kind == "pntk":
        delta = jnp.full((n, k), 1.0 / math.sqrt(k), dtype=dtype)  # (n, unit)
    else:
        delta = jnp.broadcast_to(jnp.eye(k, dtype=dtype)[0], (n, k))
    deltas = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        deltas[i] = delta
        if i > 0:
            w, _, cw, _ = layers[i]
            gate = dphi(pres[i - 1])
            delta = jnp.matmul(delta, w.T, precision=_HIGHEST) * cw * (gate[:, None, :] if delta.ndim == 3 else gate)
    scales = [(cw, cb) for (_, _, cw, cb) in layers]
    return acts, deltas, scales


@lru_cache(maxsize=64)
def _dense_block_fn(apply_fn: Any, kind: str) -> Callable:
    @jax.jit
    def block(p, x1, x2, aux=None):  # aux: unused (MLPs have no batch norm)
        a1, d1, scales = _dense_feats(apply_fn, p, x1, kind)
        a2, d2, _ = _dense_feats(apply_fn, p, x2, kind)
        last = len(scales) - 1
        out = 0.0
        for l, (u1, v1, u2, v2, (cw, cb)) in enumerate(zip(a1, d1, a2, d2, scales)):
            gram_in = cw**2 * jnp.matmul(u1, u2.T, precision=_HIGHEST) + cb**2  # (n1, n2)
            if kind == "entk":
                n1, k, m = v1.shape
                n2 = v2.shape[0]
                if l == last:  # readout: delta is the identity, its Gram matrix is I_k
                    gram_out = jnp.eye(k, dtype=gram_in.dtype)[None, :, None, :]
                else:
                    gram_out = jnp.matmul(v1.reshape(n1 * k, m), v2.reshape(n2 * k, m).T,
                                          precision=_HIGHEST).reshape(n1, k, n2, k)
                # accumulate in (n1, k, n2, k) layout; transposed once at the end
                out = out + gram_in[:, None, :, None] * gram_out
            elif kind == "trace":
                gram_out = jnp.einsum("aio,bio->ab", v1, v2, precision=_HIGHEST) / v1.shape[1]
                out = out + gram_in * gram_out
            else:
                out = out + gram_in * jnp.matmul(v1, v2.T, precision=_HIGHEST)
        return out.transpose(0, 2, 1, 3) if kind == "entk" else out

    return block


# ---------------------------------------------------------------------------------------------
# public kernels
# ---------------------------------------------------------------------------------------------


def _choose_method(apply_fn: Any, method: str, state: Any = None) -> str:
    if method not in ("auto", "dense", "jacobian"):
        raise ValueError(f"method must be 'auto', 'dense' or 'jacobian', got {method!r}")
    dense_ok = isinstance(apply_fn, DenseMLP)
    if dense_ok and state is not None:
        raise ValueError("a DenseMLP has no state; call the kernel without state=")
    if method == "dense" and not dense_ok:
        raise ValueError(
            "method='dense' needs an apply_fn that describes its dense layers (a kernels.DenseMLP: "
            "models.functional of an MLP); use method='jacobian' for other models"
        )
    if method == "auto":
        return "dense" if dense_ok else "jacobian"
    return method


def _auto_batch_size(apply_fn: ApplyFn, params: Any, x: Array, kind: str, method: str,
                     budget: int | None = None, state: Any = None) -> int:
    """Examples per block of Jacobians on the generic route: the resident block and the one
    streamed against it fit the budget (:func:`_jacobian_budget`) together."""
    n = x.shape[0]
    if method == "dense":
        return n
    per_example = _feature_bytes(apply_fn, params, x, kind, state) * 2
    budget = _jacobian_budget() if budget is None else budget
    return int(max(1, min(n, budget // max(per_example, 1))))


# ---------------------------------------------------------------------------------------------
# the peak memory of each route (measured against peak RSS in tests/test_faults.py)
# ---------------------------------------------------------------------------------------------


def _dense_peak(apply_fn: Any, params: Any, n1: int, n2: int, k: int, kind: str, s: int) -> int:
    """One jitted block of the dense route: per side the activations, pre-activations and
    back-propagated vectors of every layer; then per layer the Gram matrices, which XLA may
    keep alive together (the eNTK's ``(n1, k, n2, k)`` Gram matrix of the back-propagated
    vectors per hidden layer plus two accumulators; two ``(n1, n2)`` matrices per layer
    otherwise), and the transposed result."""
    layers = apply_fn.layers(params)
    kk = k if kind in ("entk", "trace") else 1
    width_in = sum(int(w.shape[0]) for w, *_ in layers)
    width_out = sum(int(w.shape[1]) for w, *_ in layers)
    side = s * (width_in + width_out + kk * width_out)
    features = (n1 + n2) * side
    pair = n1 * n2 * s
    if kind == "entk":
        grams = (len(layers) - 1 + 2) * pair * k * k + len(layers) * pair
    elif kind == "trace":
        grams = (2 * len(layers) + 1) * pair + (n1 + n2) * kk * width_out * s
    else:
        grams = (2 * len(layers) + 1) * pair
    return features + grams


# per-example gradients run at about this fraction of the float32 matmul rate (measured on a
# 2-core CPU by benchmarks/kernels.py: 0.3-0.6); KernelPlan.seconds uses it when not told
GRADIENT_EFFICIENCY = 0.4


@lru_cache(maxsize=1)
def matmul_rate() -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s (on the first JAX device, best of
    five: a 1024 x 1024 product on a CPU, 4096 x 4096 on an accelerator, where a smaller one
    measures the launch rather than the arithmetic; full float32 precision, no TF32)."""
    import time

    size = 1024 if jax.devices()[0].platform == "cpu" else 4096
    a = jnp.ones((size, size), jnp.float32)
    mm = jax.jit(lambda u: jnp.matmul(u, u, precision=_HIGHEST))
    mm(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


@dataclass(frozen=True)
class KernelPlan:
    """How a kernel will be computed and what it costs (:func:`plan_kernel`; ``print(plan)``).

    Attributes:
      route: ``"dense"`` (one block of Gram matrices, MLPs), ``"features"`` (every per-example
        gradient once, then one product), ``"stream"`` (every per-example gradient once, written
        to a scratch file; blocks of ``batch_size`` rows stay resident and the others are
        streamed against them), ``"recompute"`` (as ``"stream"``, when the scratch file would not
        fit on disk or in ``$NTK_TUTORIAL_SCRATCH_BYTES``: the streamed blocks' gradients are
        computed again for each resident block, so ``gradient_evaluations`` exceeds ``points``),
        ``"blocks"`` (the dense route block by block into a host
        array) or ``"disk"`` (the dense route into ``out=``).  On the features and stream
        routes several devices each take a share of every chunk and of every product's rows.
      method: ``"dense"`` or ``"jacobian"``.
      batch_size: examples per block.
      k: outputs of the network; itemsize: bytes per kernel entry.
      output_bytes: the kernel itself; peak_bytes: the estimated peak of the whole computation
        (output, intermediates, blocks in flight and copies), what the memory guard checks.
      gradients: ``"structured"`` (one batched backward pass per chunk, :mod:`ntk_tutorial.kernels.pergrad`),
        ``"vmap"`` (``vmap`` of each example's gradient) or ``"dense"`` (Gram matrices, no
        per-example gradients); chunk: examples per gradient pass.
      points: distinct examples; gradient_evaluations: per-example gradient passes in all
        (``points``: each is computed once; 0 on the dense route, which forms none);
        block_pairs: products of two blocks.
      scratch_bytes: bytes the stream route writes to its scratch file (deleted afterwards).
      gradient_flops, gram_flops: FLOPs of the gradient passes (XLA's count for one chunk) and
        of the products (``None`` when the plan was made without costs).
      rule_gram_flops, structured_layers, layers: what the products would cost if each layer took
        the cheaper of its gradient form and its structured form (Gram matrices of input patches
        and back-propagated vectors over positions; :class:`pergrad.Layer`), and how many of the
        ``layers`` boundaries that rule would put in structured form. This package forms the
        gradient of every layer: the numbers say what the structured form would save (with
        structured gradients and costs only; ``None`` / 0 otherwise).
    """

    route: str
    method: str
    batch_size: int
    k: int
    itemsize: int
    output_bytes: int
    peak_bytes: int
    gradients: str = "dense"
    chunk: int = 0
    points: int = 0
    gradient_evaluations: int = 0
    block_pairs: int = 1
    scratch_bytes: int = 0
    gradient_flops: float | None = None
    gram_flops: float | None = None
    rule_gram_flops: float | None = None
    structured_layers: int = 0
    layers: int = 0

    @property
    def evaluations_per_point(self) -> float:
        """Gradient evaluations per distinct example (1.0: each computed once)."""
        return self.gradient_evaluations / max(self.points, 1)

    def seconds(self, gemm_flops_per_s: float | None = None,
                gradient_flops_per_s: float | None = None) -> float | None:
        """Estimated seconds: the products at ``gemm_flops_per_s`` (default :func:`matmul_rate`)
        plus the gradient passes at ``gradient_flops_per_s`` (default ``GRADIENT_EFFICIENCY``
        times the matmul rate); ``None`` for a plan made without costs."""
        if self.gradient_flops is None or self.gram_flops is None:
            return None
        gemm = matmul_rate() if gemm_flops_per_s is None else float(gemm_flops_per_s)
        grad = GRADIENT_EFFICIENCY * gemm if gradient_flops_per_s is None else float(gradient_flops_per_s)
        return self.gram_flops / gemm + self.gradient_flops / grad

    def __str__(self) -> str:
        how = self.method if self.method == "dense" else f"{self.gradients} gradients, chunks of {self.chunk}"
        lines = [f"route {self.route} ({how}), blocks of {self.batch_size} examples, "
                 f"{self.block_pairs} block product(s)",
                 f"gradient evaluations {self.gradient_evaluations} for {self.points} points "
                 f"({self.evaluations_per_point:.2f} per point)",
                 f"output {_gib(self.output_bytes)}, peak {_gib(self.peak_bytes)}"
                 + (f", scratch on disk {_gib(self.scratch_bytes)}" if self.scratch_bytes else "")]
        if self.gradient_flops is not None:
            lines.append(f"{self.gradient_flops / 1e9:.3g} GFLOP of gradients + "
                         f"{self.gram_flops / 1e9:.3g} GFLOP of products: about {self.seconds():.3g} s here")
        if self.rule_gram_flops is not None:
            lines.append(f"per-layer rule: {self.structured_layers} of {self.layers} layers cheaper in structured "
                         f"form, products {self.rule_gram_flops / 1e9:.3g} GFLOP with it "
                         f"({self.rule_gram_flops / max(self.gram_flops, 1e-300):.2f} of the gradient form's; "
                         f"every layer is computed in gradient form)")
        return "\n".join(lines)


_FLOPS: dict = {}


def _chunk_flops(fn: Callable, params: Any, x: Any, aux: Any) -> float:
    """XLA's FLOP count of one call of the jitted ``fn(params, x, aux)`` (lowered, not compiled)."""
    key = (fn, _struct_key(params), tuple(x.shape), str(x.dtype), _struct_key(aux))
    if key not in _FLOPS:
        def flops(analysis: Any) -> float:
            analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
            value = (analysis or {}).get("flops", float("nan")) if isinstance(analysis, dict) else float("nan")
            return float(value) if value is not None and float(value) >= 0 else float("nan")

        try:
            lowered = fn.lower(_struct(params), jax.ShapeDtypeStruct(x.shape, x.dtype),
                               None if aux is None else _struct(aux))
            value = flops(lowered.cost_analysis())
            if not math.isfinite(value):  # GPU backends count only compiled programs
                value = flops(lowered.compile().cost_analysis())
            _FLOPS[key] = value
        except Exception:  # noqa: BLE001 - backends without a cost model
            _FLOPS[key] = float("nan")
    return _FLOPS[key]


def _pair_rows(n1: int, n2: int, b1: int, b2: int, symmetric: bool) -> tuple[int, int]:
    """``(block products, sum of rows1 * rows2 over them)``: with ``symmetric`` only the upper
    triangle of block pairs is multiplied."""
    s1 = [min(b1, n1 - i) for i in range(0, n1, b1)]
    if symmetric:
        return len(s1) * (len(s1) + 1) // 2, (sum(s1) ** 2 + sum(v * v for v in s1)) // 2
    s2 = [min(b2, n2 - j) for j in range(0, n2, b2)]
    return len(s1) * len(s2), sum(s1) * sum(s2)


def _plan(kind: str, apply_fn: ApplyFn, params: Any, x1: Any, x2: Any, symmetric: bool,
          batch_size: int | None, method: str, devices: list, out: Any, costs: bool = False,
          state: Any = None) -> KernelPlan:
    out_shape = _output_shape(apply_fn, params, x1, state)
    k = int(out_shape.shape[-1])
    n1, n2 = int(x1.shape[0]), int(x2.shape[0])
    itemsize = jnp.result_type(out_shape.dtype, x1.dtype).itemsize
    method = _choose_method(apply_fn, method, state)
    budget = _jacobian_budget() if method == "jacobian" else 0  # read once per plan
    given = batch_size is not None
    if given:
        batch_size = _positive_int("batch_size", batch_size)
    else:
        batch_size = _auto_batch_size(apply_fn, params, x1, kind, method, budget, state)
        if out is not None:  # keep each block's output under 256 MiB: the kernel lives on disk
            per_row = kernel_nbytes(1, n2, k, kind, itemsize)
            batch_size = int(max(1, min(batch_size, (256 * 2**20) // per_row)))
    output = kernel_nbytes(n1, n2, k, kind, itemsize)
    n_params = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    points = n1 + (0 if symmetric else n2)
    kk = k if kind in ("entk", "trace") else 1
    # FLOPs of one kernel entry from two examples' features (the eNTK: k x k dot products)
    entry_flops = 2.0 * n_params * (k * k if kind == "entk" else kk)
    # inputs cast by _validate are copies too (counted at the working itemsize)
    inputs = points * math.prod(x1.shape[1:]) * itemsize

    if method == "jacobian":
        compiled_for, aux = apply_fn, state
        chunk, gradients, transient = _chunk_size(compiled_for, params, x1, aux, kind, k, budget)
        f = n_params * kk * np.dtype(x1.dtype).itemsize  # one example's features (_feature_bytes)
        chunk_peak = chunk * transient * len(devices)  # one chunk per device in flight
        whole = batch_size >= max(n1, n2) if given else f * points <= budget
        gradient_flops = None
        rule: dict = {}  # the per-layer FLOP rule, as a fraction of the gradient form's products
        if costs:
            per_chunk = _chunk_flops(_features_fn(compiled_for, kind, gradients), params,
                                     jax.ShapeDtypeStruct((chunk, *x1.shape[1:]), x1.dtype), aux)
            gradient_flops = per_chunk * points / chunk
            found, _ = (_gradient_analysis(compiled_for, params, (chunk, *x1.shape[1:]), x1.dtype, aux)
                        if gradients == "structured" else (None, ""))
            if found is not None and found.layers:
                g = found.gram_flops(kind, k)
                rule = {"fraction": g["rule"] / g["jacobian"], "structured_layers": g["structured_layers"],
                        "layers": g["layers"]}

        def with_rule(plan: KernelPlan) -> KernelPlan:
            if not rule or plan.gram_flops is None:
                return plan
            return dataclasses.replace(plan, rule_gram_flops=plan.gram_flops * rule["fraction"],
                                       structured_layers=rule["structured_layers"], layers=rule["layers"])
        if out is None and whole:
            feats = points * f
            # chunks and their concatenation, then the features and the product (eNTK: the
            # product, its transposed copy and XLA's temporary)
            peak = max(2 * feats + chunk_peak, feats + chunk_peak + (3 if kind == "entk" else 1.5) * output)
            return with_rule(KernelPlan("features", method, max(n1, n2), k, int(itemsize), int(output),
                                        int(peak + inputs), gradients, chunk, points, points, 1, 0, gradient_flops,
                                        entry_flops * n1 * n2 if costs else None))
        b1, b2 = min(batch_size, n1), min(batch_size, n2)
        pairs, rows = _pair_rows(n1, n2, b1, b2, symmetric)
        scratch = (n1 if symmetric else n2) * f
        # the resident block, the streamed one (read buffer and device copy), and either the
        # gradient pass (with its block of features and their host copy) or the block product
        # (on the device, its host copy, the transposed copy for the lower triangle)
        product = 3 * kernel_nbytes(b1, b2, k, kind, itemsize)
        blocks = b1 * f + 2 * b2 * f + max(chunk_peak + b2 * f, product)
        peak = blocks if out is not None else output + max(blocks, 2 * output)
        if scratch > _scratch_limit(out):
            # no room for the file: each resident block's partners are recomputed (symmetric: the
            # blocks after it; otherwise all of x2 per block of x1)
            s1 = [min(b1, n1 - i) for i in range(0, n1, b1)]
            evaluations = n1 + (sum(sum(s1[i + 1:]) for i in range(len(s1))) if symmetric else len(s1) * n2)
            flops = None if gradient_flops is None else gradient_flops * evaluations / points
            return with_rule(KernelPlan("recompute", method, int(batch_size), k, int(itemsize), int(output),
                                        int(peak + inputs), gradients, chunk, points, int(evaluations), pairs, 0,
                                        flops, entry_flops * rows if costs else None))
        return with_rule(KernelPlan("stream", method, int(batch_size), k, int(itemsize), int(output),
                                    int(peak + inputs), gradients, chunk, points, points, pairs, int(scratch),
                                    gradient_flops, entry_flops * rows if costs else None))

    # the dense route (MLPs): Gram matrices of activations and back-propagated vectors per block
    whole = batch_size >= max(n1, n2)
    if out is None and whole:
        # the jitted block, then jnp.asarray of its host view: a staged copy (2x the output)
        peak = max(_dense_peak(apply_fn, params, n1, n2, k, kind, itemsize), 3 * output)
        return KernelPlan("dense", method, int(batch_size), k, int(itemsize), int(output), int(peak + inputs),
                          "dense", 0, points, 0, 1, 0, None, None)
    b1, b2 = min(batch_size, n1), min(batch_size, n2)
    # blocks in flight: the one being computed and the host copy of the previous one (the
    # allocator keeps freed blocks); on the host route also the result and its staged copy
    # into a JAX array at the end
    blocks = 2 * _dense_peak(apply_fn, params, b1, b2, k, kind, itemsize)
    route = "disk" if out is not None else "blocks"
    peak = blocks if out is not None else max(3 * output, output + blocks) + blocks
    pairs, _ = _pair_rows(n1, n2, b1, b2, symmetric)
    return KernelPlan(route, method, int(batch_size), k, int(itemsize), int(output), int(peak + inputs),
                      "dense", 0, points, 0, pairs, 0, None, None)


def plan_kernel(kind: str, apply_fn: ApplyFn, params: Any, x1: Any, x2: Any = None, *,
                batch_size: int | None = None, method: str = "auto", devices: Any = None,
                out: Any = None, costs: bool = True, state: Any = None) -> KernelPlan:
    """The :class:`KernelPlan` of ``entk`` / ``pntk`` / ``trace_ntk`` / ``single_logit_ntk``
    (``kind``: ``"entk"``, ``"pntk"``, ``"trace"``, ``"single"``) with these arguments: the
    route, its blocks, gradient evaluations, bytes on disk, estimated peak memory and (with
    ``costs``) FLOPs and seconds, without computing anything (``print(plan)`` states them).
    ``x1`` and ``x2`` may be arrays or ``jax.ShapeDtypeStruct`` (sizes only), so the cost of a
    kernel can be checked before its inputs exist."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {KINDS}")
    symmetric = x2 is None
    x1, x2 = _validate(x1, x2, working_dtype(params))
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one JAX device")
    with jax.default_matmul_precision("highest"):  # the programs _kernel runs
        return _plan(kind, apply_fn, params, x1, x2, symmetric, batch_size, method, devices, out, costs=costs,
                     state=state)


def kernel_memory(kind: str, apply_fn: ApplyFn, params: Any, x1: Any, x2: Any = None, **options) -> int:
    """Estimated peak bytes of computing a kernel (:func:`plan_kernel`'s ``peak_bytes``)."""
    return plan_kernel(kind, apply_fn, params, x1, x2, costs=False, **options).peak_bytes


def _scratch_folder(out: Any) -> str:
    """Where the stream route writes its Jacobians: ``$NTK_TUTORIAL_SCRATCH``, else beside
    ``out=``, else the system's temporary folder."""
    import tempfile
    from pathlib import Path

    env = os.environ.get(SCRATCH_ENV)
    if env:
        folder = Path(env).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{SCRATCH_ENV}={env!r} is not a folder; point it at a folder with room "
                             "for the Jacobians")
        return str(folder)
    if out is not None:
        return str(Path(out).expanduser().resolve().parent)
    return tempfile.gettempdir()


def _scratch_limit(out: Any = None) -> int:
    """Bytes the stream route may write: ``$NTK_TUTORIAL_SCRATCH_BYTES``, else the free space of
    its folder (:func:`_scratch_folder`)."""
    import shutil

    value = _env_bytes(SCRATCH_BYTES_ENV, 0, "a byte count >= 0")
    if value is not None:
        return value
    return int(shutil.disk_usage(_scratch_folder(out)).free)


def _recompute(fn: Callable, kind: str, params: Any, x1: Array, x2: Array, symmetric: bool, aux: Any,
               plan: KernelPlan, result: Any, devices: Any = ()) -> None:
    """The recompute route: each block of ``x1``'s features stays resident while the blocks it
    is multiplied with are computed afresh (symmetric: the upper triangle only)."""
    b = plan.batch_size
    n1, n2 = x1.shape[0], x2.shape[0]

    def features(x: Array) -> Array:
        return _all_features(fn, kind, params, x, aux, plan.chunk, plan.gradients, devices)

    for i in range(0, n1, b):
        fi = features(x1[i:i + b])
        for j in range(i if symmetric else 0, n2, b):
            fj = fi if symmetric and j == i else features(x2[j:j + b])
            blk = np.asarray(_product(fi, fj, kind, devices))
            result[i:i + b, j:j + b] = blk
            if symmetric and j > i:
                result[j:j + b, i:i + b] = blk.transpose(1, 0, 3, 2) if kind == "entk" else blk.T
            del fj, blk


def _check_scratch(folder: str, nbytes: int) -> None:
    import shutil

    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise KernelTooLargeError(
            f"the Jacobians of this kernel ({_gib(nbytes)}, each computed once) do not fit in memory "
            f"and {folder} has only {_gib(free)} free for them; set ${SCRATCH_ENV} to a folder with "
            f"room, raise ${JACOBIAN_ENV}, compute the kernel for fewer points, or use the pNTK")


def _stream(fn: Callable, kind: str, params: Any, x1: Array, x2: Array, symmetric: bool, aux: Any,
            plan: KernelPlan, result: Any, folder: str, devices: Any = ()) -> None:
    """The stream route: every per-example gradient of ``x2`` (of ``x1`` when symmetric) is
    computed once and appended to a scratch file; then each block of ``x1``'s features stays
    resident while the blocks of the file are read back and multiplied with it (symmetric: the
    upper triangle only, the lower filled by transposition)."""
    import tempfile

    b = plan.batch_size
    n1, n2 = x1.shape[0], x2.shape[0]
    src = x1 if symmetric else x2
    with tempfile.TemporaryFile(dir=folder, prefix="ntk-jacobians-") as fh:  # deleted on close
        shape, dtype = None, None
        for j in range(0, n2, b):
            fj = np.asarray(_all_features(fn, kind, params, src[j:j + b], aux, plan.chunk, plan.gradients, devices))
            shape, dtype = fj.shape[1:], fj.dtype
            fj.tofile(fh)
            del fj
        per_row = math.prod(shape)

        def read(j: int) -> Array:
            m = min(b, n2 - j)
            fh.seek(j * per_row * dtype.itemsize)
            return jnp.asarray(np.fromfile(fh, dtype=dtype, count=m * per_row).reshape(m, *shape))

        for i in range(0, n1, b):
            fi = read(i) if symmetric else _all_features(fn, kind, params, x1[i:i + b], aux, plan.chunk,
                                                         plan.gradients, devices)
            for j in range(i if symmetric else 0, n2, b):
                fj = fi if symmetric and j == i else read(j)
                blk = np.asarray(_product(fi, fj, kind, devices))
                result[i:i + b, j:j + b] = blk
                if symmetric and j > i:
                    result[j:j + b, i:i + b] = blk.transpose(1, 0, 3, 2) if kind == "entk" else blk.T
                del fj, blk


def _run_block(block, params, xa, xb, devices) -> np.ndarray:
    """One block of the dense route; with several devices its rows are split across them
    (:func:`_sharded_rows`; rows padded to a multiple of the device count, padding dropped)."""
    if len(devices) == 1:
        return np.asarray(block(params, xa, xb, None))
    n = xa.shape[0]
    pad = (-n) % len(devices)
    if pad:
        xa = jnp.concatenate([xa, jnp.repeat(xa[-1:], pad, axis=0)])
    return np.asarray(_sharded_rows(block, tuple(devices), 4, split=1)(params, xa, xb, None))[:n]


def _kernel(
    kind: str,
    apply_fn: ApplyFn,
    params: Any,
    x1: Array,
    x2: Array | None,
    batch_size: int | None,
    method: str,
    devices: Any = None,
    out: Any = None,
    state: Any = None,
) -> Array:
    # every product and convolution of the kernel, the network's own included, in full float32
    # (or float64) precision: accelerators would otherwise run float32 ones in TF32
    with jax.default_matmul_precision("highest"):
        return _kernel_in_precision(kind, apply_fn, params, x1, x2, batch_size, method, devices, out, state)


def _kernel_in_precision(kind: str, apply_fn: ApplyFn, params: Any, x1: Array, x2: Array | None,
                         batch_size: int | None, method: str, devices: Any, out: Any, state: Any) -> Array:
    symmetric = x2 is None
    x1, x2 = _validate(x1, x2, working_dtype(params))
    _check_params(params)
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one JAX device")
    plan = _plan(kind, apply_fn, params, x1, x2, symmetric, batch_size, method, devices, out, state=state)
    n1, n2, k, itemsize = x1.shape[0], x2.shape[0], plan.k, plan.itemsize
    # checked before anything is allocated
    if out is None:
        check_kernel_memory(n1, n2, k, kind, itemsize, peak=plan.peak_bytes)
    else:
        check_disk_space(out, plan.output_bytes)
        check_memory(plan.peak_bytes, f"one block of {plan.batch_size} x {plan.batch_size} points of the {kind} "
                     "kernel written to out=", "pass a smaller batch_size=; ")
    folder = None
    if plan.route == "stream":
        folder = _scratch_folder(out)
        _check_scratch(folder, plan.scratch_bytes)
    batch_size = plan.batch_size
    compiled_for, aux = apply_fn, state
    if plan.route == "features":
        # every per-example gradient once, then one matrix product
        f1 = _all_features(compiled_for, kind, params, x1, aux, plan.chunk, plan.gradients, devices)
        f2 = f1 if symmetric else _all_features(compiled_for, kind, params, x2, aux, plan.chunk, plan.gradients,
                                                devices)
        return _product(f1, f2, kind, devices)
    block = _dense_block_fn(apply_fn, kind)
    if plan.route == "dense":
        return jnp.asarray(_run_block(block, params, x1, x2, devices))

    shape = (n1, n2) + ((k, k) if kind == "entk" else ())
    dtype = np.float64 if itemsize == 8 else np.float32
    if out is None:
        result = np.empty(shape, dtype=dtype)
    else:
        result = np.lib.format.open_memmap(str(out), mode="w+", dtype=dtype, shape=shape)
    if plan.route == "stream":
        _stream(compiled_for, kind, params, x1, x2, symmetric, aux, plan, result, folder, devices)
    elif plan.route == "recompute":
        _recompute(compiled_for, kind, params, x1, x2, symmetric, aux, plan, result, devices)
    else:
        for i in range(0, n1, batch_size):
            for j in range(0, n2, batch_size):
                if symmetric and j < i:
                    blk = result[j : j + batch_size, i : i + batch_size]
                    result[i : i + batch_size, j : j + batch_size] = (
                        blk.transpose(1, 0, 3, 2) if kind == "entk" else blk.T
                    )
                    continue
                xa, xb = x1[i : i + batch_size], x2[j : j + batch_size]
                result[i : i + batch_size, j : j + batch_size] = _run_block(block, params, xa, xb, devices)
    if out is not None:
        result.flush()
        return result
    return jnp.asarray(result)


_DOC_ARGS = """
    Args:
      apply_fn: ``apply_fn(params, x) -> (n, k)`` logits (any JAX function), or
        ``apply_fn(params, x, state)`` when ``state`` is given.
      params: the parameter pytree ``apply_fn`` takes (what the kernel differentiates).
      x1: ``(n1, ...)`` inputs.
      x2: ``(n2, ...)`` inputs; ``None`` means ``x1`` (the symmetric kernel).
      batch_size: compute in blocks of this many examples (``None``: the whole set, or blocks that
        keep the generic route's Jacobians in the budget: a quarter of the available memory on
        the CPU, 512 MiB to 8 GiB, a quarter of an accelerator's, or
        ``NTK_TUTORIAL_JACOBIAN_BYTES``).  The result does not depend on it.
      method: ``"auto"`` (dense route for MLPs, else Jacobians), ``"dense"`` or ``"jacobian"``.
      devices: JAX devices to split each block's rows over (default: all visible devices, so a
        multi-GPU machine computes one large kernel in parallel); the result does not change.
      out: a path (``.npy``): write the kernel block by block into a memory-mapped file and
        return the ``numpy.memmap``; for kernels larger than memory (the guard then checks
        the disk instead).
      state: data the model needs beside its parameters, not differentiated (batch-norm
        running statistics of :func:`ntk_tutorial.models.split`); ``None`` for stateless models.

    Raises:
      ValueError: shape mismatch, NaN/inf in the inputs or parameters.
      KernelTooLargeError: the result would not fit in memory (the message gives the size).
"""


def entk(apply_fn, params, x1, x2=None, *, batch_size=None, method="auto", devices=None,
         out=None, state=None) -> Array:
    """Full empirical NTK ``Theta[a, b, i, j] = <d f_i(x1_a), d f_j(x2_b)>``, shape ``(n1, n2, k, k)``."""
    return _kernel("entk", apply_fn, params, x1, x2, batch_size, method, devices, out, state)


def pntk(apply_fn, params, x1, x2=None, *, batch_size=None, method="auto", devices=None,
         out=None, state=None) -> Array:
    """Pseudo-NTK: the kernel of ``(1/sqrt(k)) sum_j f_j``, shape ``(n1, n2)``.

    Equals ``(1/k) sum_ij Theta_ij``
    (Eq. 2 of Mohamadi, Bae & Sutherland 2023), but is computed from one gradient per example,
    never through the full eNTK: ``k^2`` times less memory.
    """
    return _kernel("pntk", apply_fn, params, x1, x2, batch_size, method, devices, out, state)


def trace_ntk(apply_fn, params, x1, x2=None, *, batch_size=None, method="auto", devices=None,
              out=None, state=None) -> Array:
    """Trace kernel ``(1/k) sum_i Theta_ii``, shape ``(n1, n2)``.

    neural-tangents' default ``trace_axes=(-1,)`` returns the same (a mean, not a sum).
    """
    return _kernel("trace", apply_fn, params, x1, x2, batch_size, method, devices, out, state)


def single_logit_ntk(apply_fn, params, x1, x2=None, *, batch_size=None, method="auto", devices=None,
                     out=None, state=None) -> Array:
    """Single-logit kernel ``Theta_11 = <d f_1(x), d f_1(x')>``, shape ``(n1, n2)``."""
    return _kernel("single", apply_fn, params, x1, x2, batch_size, method, devices, out, state)


for _fn in (entk, pntk, trace_ntk, single_logit_ntk):
    _fn.__doc__ += _DOC_ARGS


# ---------------------------------------------------------------------------------------------
# infinite width
# ---------------------------------------------------------------------------------------------


def _relu_moments(s11, s12, s22):
    norm = jnp.sqrt(s11 * s22)
    safe = jnp.where(norm > 0, norm, 1.0)
    cos = jnp.clip(jnp.where(norm > 0, s12 / safe, 1.0), -1.0, 1.0)
    t = jnp.arccos(cos)
    e_phi = norm * (jnp.sin(t) + (jnp.pi - t) * cos) / (2 * jnp.pi)
    e_dphi = (jnp.pi - t) / (2 * jnp.pi)
    return e_phi, e_dphi


def _erf_moments(s11, s12, s22):
    # phi = erf: E[erf(u) erf(v)] = (2/pi) arcsin(2 s12 / sqrt((1 + 2 s11)(1 + 2 s22)))
    # phi' = (2/sqrt(pi)) exp(-u^2): E[phi'(u) phi'(v)] = (4/pi) / sqrt((1+2s11)(1+2s22) - 4 s12^2)
    d = (1 + 2 * s11) * (1 + 2 * s22)
    e_phi = (2 / jnp.pi) * jnp.arcsin(jnp.clip(2 * s12 / jnp.sqrt(d), -1.0, 1.0))
    e_dphi = (4 / jnp.pi) / jnp.sqrt(d - 4 * s12**2)
    return e_phi, e_dphi


_MOMENTS = {"relu": _relu_moments, "erf": _erf_moments}
# (n1, n2) arrays alive at the peak of the infinite-width recursion (measured: 7.5 to 8.7)
_INFINITE_PEAK = 11


def _infinite(x1, x2, depth, activation, w_std, b_std):
    if activation not in _MOMENTS:
        raise ValueError(
            f"infinite-width kernels are implemented for {sorted(_MOMENTS)}, got {activation!r}"
        )
    if isinstance(depth, (bool, np.bool_)) or not isinstance(depth, (int, np.integer)):
        raise TypeError(f"depth (number of hidden layers) must be an integer >= 0, got {depth!r}")
    if depth < 0:
        raise ValueError(f"depth (number of hidden layers) must be >= 0, got {depth}")
    for name, value in (("w_std", w_std), ("b_std", b_std)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number >= 0, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    x1, x2 = _validate(x1, x2)
    n1, n2 = x1.shape[0], x2.shape[0]
    # eager element-wise recursion on (n1, n2) arrays: about ten of them alive at once
    check_memory(_INFINITE_PEAK * n1 * n2 * x1.dtype.itemsize,
                 f"an infinite-width kernel of {n1} x {n2} points",
                 "compute it for fewer points or in blocks of rows; ")
    x1 = x1.reshape(x1.shape[0], -1)
    x2 = x2.reshape(x2.shape[0], -1)
    d = x1.shape[1]
    w2, b2 = w_std**2, b_std**2
    s12 = w2 * (x1 @ x2.T) / d + b2
    s11 = w2 * jnp.sum(x1**2, axis=1) / d + b2
    s22 = w2 * jnp.sum(x2**2, axis=1) / d + b2
    ntk = s12
    moments = _MOMENTS[activation]
    for _ in range(depth):
        e_phi, e_dphi = moments(s11[:, None], s12, s22[None, :])
        d11, _ = moments(s11, s11, s11)
        d22, _ = moments(s22, s22, s22)
        s12 = w2 * e_phi + b2
        ntk = ntk * (w2 * e_dphi) + s12
        s11 = w2 * d11 + b2
        s22 = w2 * d22 + b2
    return ntk, s12


def infinite_ntk(x1, x2=None, *, depth: int, activation: str = "relu",
                 w_std: float = math.sqrt(2.0), b_std: float = 0.1) -> Array:
    """Analytic infinite-width NTK of :class:`~ntk_tutorial.models.MLP` in NTK parameterisation.

    The network is ``depth`` hidden layers ``Dense -> activation`` and a dense readout, with
    neural-tangents' ``stax.Dense(W_std=w_std, b_std=b_std)`` conventions.  Recursion (Jacot et
    al. 2018; Arora et al. 2019)::

        Sigma^1 = w^2 x.x'/d + b^2,   Theta^1 = Sigma^1
        Sigma^{l+1} = w^2 E[phi(u) phi(v)] + b^2,   dSigma^{l+1} = w^2 E[phi'(u) phi'(v)]
        Theta^{l+1} = Theta^l dSigma^{l+1} + Sigma^{l+1}

    with ``(u, v)`` Gaussian of covariance ``Sigma^l`` on the pair; closed forms for ReLU
    (arc-cosine kernels) and erf.  Returns ``(n1, n2)``; the eNTK converges to
    ``infinite_ntk(...) (x) I_k`` as the widths grow.
    """
    return _infinite(x1, x2, depth, activation, w_std, b_std)[0]


def infinite_nngp(x1, x2=None, *, depth: int, activation: str = "relu",
                  w_std: float = math.sqrt(2.0), b_std: float = 0.1) -> Array:
    """Infinite-width NNGP kernel (covariance of the outputs at initialisation), ``(n1, n2)``.

    Same network and conventions as :func:`infinite_ntk`.
    """
    return _infinite(x1, x2, depth, activation, w_std, b_std)[1]


def as_matrix(theta: Array) -> Array:
    """Reshape an ``(n1, n2, k, k)`` eNTK into its ``(n1 k) x (n2 k)`` matrix (example-major)."""
    n1, n2, k1, k2 = theta.shape
    return theta.transpose(0, 2, 1, 3).reshape(n1 * k1, n2 * k2)
