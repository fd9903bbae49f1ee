"""Per-example gradients of a batched network from one backward pass (structured derivatives).

``vmap(grad)`` differentiates every example separately, and for a convolution the per-example
weight gradient it asks XLA for is a grouped convolution that runs far below the machine's
matrix-multiply rate.  When examples are processed independently (every network in evaluation
mode), the per-example gradients can be had from **one** backward pass of the batch instead:

1. trace ``f(params, x)`` on a batch into a jaxpr and follow which values depend on the
   parameters, which on the examples;
2. at each *boundary* operation, where a parameter-derived value ``v`` meets the batch (a
   convolution's kernel, a dense layer's weight, a batch-norm scale or a bias broadcast against
   the activations), record the batched operand ``a`` and add a zero perturbation ``e`` to the
   output; the cotangent of ``e`` in one batched backward pass is every example's
   back-propagated vector ``delta_n`` at once (examples do not interact);
3. every example's gradient with respect to ``v`` is then local to that operation: for a
   convolution ``dW_n = patches(a_n)^T delta_n``, one batched matrix product of image patches
   with back-propagated vectors (Goodfellow 2015; Novak et al. 2022 derive the same structure);
   for any other operation the ``vjp`` of that one operation on example ``n``, vectorised;
4. the gradients with respect to the boundary values are mapped back to the parameters through
   the (example-free) operations that made them from the parameters.

The result equals ``vmap(grad)`` to float round-off (tests/test_pergrad.py).  :func:`analyse`
says whether a function qualifies: every operation the examples flow through must be one of a
known list that keeps examples apart (no reduction, contraction, transposition or reshape over
the example axis, convolutions with the example axis as batch axis, ...); anything else (a
custom derivative rule with parameters inside, an operation that could mix examples) and the
caller falls back to ``vmap(grad)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_HIGHEST = jax.lax.Precision.HIGHEST

# Operations applied position by position (examples stay apart whatever their shapes).
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "rsqrt", "sqrt", "cbrt", "integer_pow", "pow", "abs", "sign", "erf",
    "erfc", "erf_inv", "sin", "cos", "tan", "square", "select_n", "convert_element_type", "copy",
    "copy_p", "stop_gradient", "clamp", "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not",
    "is_finite", "floor", "ceil", "round", "nextafter", "atan2", "asinh", "acosh", "atanh",
    "sinh", "cosh", "asin", "acos", "atan", "reduce_precision", "add_any", "rem",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
               "reduce_and", "reduce_or"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"}
_CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}


class Unsupported(Exception):
    """The function uses an operation on the examples this module cannot prove per-example."""


def _sub_jaxpr(eqn) -> jcore.ClosedJaxpr | None:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub
        if isinstance(sub, jcore.Jaxpr):
            return jcore.ClosedJaxpr(sub, ())
    return None


def _check_batched_eqn(eqn, batched: list[bool], n: int) -> None:
    """Raise :class:`Unsupported` unless ``eqn`` keeps the examples of its batched operands apart
    (example axis 0 of size ``n`` in, example axis 0 out)."""
    name = eqn.primitive.name
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
    for b, s in zip(batched, shapes):
        if b and (len(s) == 0 or s[0] != n):
            raise Unsupported(f"{name}: a batched operand of shape {s} has no leading example axis")
    out_shapes = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
    p = eqn.params
    if name in _ELEMENTWISE:
        for b, s in zip(batched, shapes):
            if not b and len(s) == max(len(t) for t in shapes) and len(s) > 0 and s[0] not in (1,) and n != 1:
                raise Unsupported(f"{name}: an example-free operand of shape {s} spans the example axis")
    elif name in _REDUCTIONS:
        if 0 in tuple(p.get("axes", ())):
            raise Unsupported(f"{name} reduces over the example axis")
    elif name == "reshape":
        if out_shapes[0][:1] != (n,) or p.get("dimensions") is not None:
            raise Unsupported("reshape changes the example axis")
    elif name == "transpose":
        if p["permutation"][0] != 0:
            raise Unsupported("transpose moves the example axis")
    elif name == "broadcast_in_dim":
        if not p["broadcast_dimensions"] or p["broadcast_dimensions"][0] != 0:
            raise Unsupported("broadcast_in_dim moves the example axis")
    elif name == "squeeze":
        if 0 in tuple(p["dimensions"]):
            raise Unsupported("squeeze removes the example axis")
    elif name == "expand_dims":
        if 0 in tuple(p["dimensions"]):
            raise Unsupported("expand_dims moves the example axis")
    elif name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        if (batched[0] and (0 in lc or lb)) or (batched[1] and (0 in rc or rb)) or (batched[1] and not batched[0]):
            raise Unsupported("dot_general contracts, batches or moves the example axis")
    elif name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        if batched[1] or not batched[0] or dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0 \
                or p["batch_group_count"] != 1:
            raise Unsupported("conv_general_dilated with examples outside its batch axis")
    elif name == "reduce_window" or name.startswith("reduce_window_"):
        dims = p.get("window_dimensions", ())
        strides = p.get("window_strides", ())
        pad = p.get("padding", ())
        if not dims or dims[0] != 1 or (strides and strides[0] != 1) or (pad and tuple(pad[0]) != (0, 0)):
            raise Unsupported("a pooling window spans the example axis")
    elif name == "concatenate":
        if p["dimension"] == 0:
            raise Unsupported("concatenate along the example axis")
    elif name == "pad":
        if tuple(p["padding_config"][0]) != (0, 0, 0):
            raise Unsupported("pad along the example axis")
    elif name == "slice":
        if p["start_indices"][0] != 0 or p["limit_indices"][0] != n or (p["strides"] or (1,))[0] != 1:
            raise Unsupported("slice along the example axis")
    elif name == "cumsum" or name in ("cumprod", "cummax", "cummin", "cumlogsumexp"):
        if p["axis"] == 0:
            raise Unsupported(f"{name} along the example axis")
    else:
        raise Unsupported(f"operation {name!r} on the examples")


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` found: ``boundaries`` (operations where parameters meet the
    examples), ``activation_bytes`` (per example, every batched value of the forward pass: a
    bound on what the backward pass keeps) and ``patch_bytes`` (per example, the largest image
    patch matrix of a convolution's weight gradient)."""

    boundaries: int
    activation_bytes: int
    patch_bytes: int
    layers: tuple = ()

    def gram_flops(self, kind: str = "pntk", k: int = 1) -> dict:
        """FLOPs of one kernel entry (one pair of examples) summed over the boundaries, two ways:
        ``"jacobian"`` (dot products of the per-example gradients, what every route does) and
        ``"rule"`` (each layer in the cheaper of its gradient form and its structured form, the
        per-layer choice of Novak et al. 2022), with ``"structured_layers"`` (how many layers the
        rule puts in structured form) and ``"layers"`` (the count of boundaries). See
        :class:`Layer`; ``kind`` is ``"entk"`` (k x k entries per pair) or another kernel (one)."""
        outputs = k * k if kind == "entk" else 1
        jac = rule = 0.0
        chosen = 0
        for layer in self.layers:
            j, st = layer.flops(outputs)
            jac += j
            rule += min(j, st)
            chosen += st < j
        return {"jacobian": jac, "rule": rule, "structured_layers": chosen, "layers": len(self.layers)}


@dataclass(frozen=True)
class Layer:
    """One boundary as the per-layer FLOP rule sees it: ``op`` (the primitive), ``params`` (its
    parameter-derived operand's size: one example's gradient has this many entries),
    ``positions`` (per example, the output positions sharing those parameters: spatial
    positions of a convolution, 1 for a dense layer on vectors), and for contractions ``fan_in``
    (a position's input patch: channels x filter size) and ``fan_out`` (its output channels).

    Per pair of examples, the gradient form costs ``2 params`` FLOPs per output; the structured
    form (Gram matrices of the two examples' input patches and of their back-propagated vectors
    over positions, multiplied elementwise and summed) ``2 P^2 fan_in`` once plus
    ``2 P^2 fan_out + P^2`` per output, ``P`` the positions. It pays when ``P^2`` is small
    against ``fan_in fan_out / (fan_in + fan_out)``: dense layers, or convolutions on a few
    positions with many channels. Element-wise boundaries (biases, batch-norm scales) have no
    cheaper structured form here."""

    op: str
    params: int
    positions: int = 1
    fan_in: int = 0
    fan_out: int = 0

    def flops(self, outputs: int = 1) -> tuple[float, float]:
        """``(gradient form, structured form)`` FLOPs of one pair of examples for ``outputs``
        kernel entries (``inf`` where there is no structured form)."""
        jac = 2.0 * self.params * outputs
        if not (self.fan_in and self.fan_out):
            return jac, math.inf
        p2 = float(self.positions) ** 2
        return jac, 2.0 * p2 * self.fan_in + outputs * (2.0 * p2 * self.fan_out + p2)


def _layer(eqn, bs: list[bool], ps: list[bool]) -> Layer:
    """The :class:`Layer` of a boundary equation (operands batched ``bs``, parameter-derived ``ps``)."""
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    which = next(i for i, (b, q) in enumerate(zip(bs, ps)) if q and not b)
    size = int(math.prod(shapes[which]))
    if name == "conv_general_dilated" and which == 1:
        dn = eqn.params["dimension_numbers"]
        rhs, out = shapes[1], tuple(eqn.outvars[0].aval.shape)
        fan_in = int(rhs[dn.rhs_spec[1]]) * int(math.prod(rhs[i] for i in dn.rhs_spec[2:]))
        positions = int(math.prod(out[i] for i in dn.out_spec[2:]))
        return Layer(name, size, positions, fan_in, int(rhs[dn.rhs_spec[0]]))
    if name == "dot_general" and which == 1 and bs[0]:
        (lc, rc), _ = eqn.params["dimension_numbers"]
        lhs, rhs = shapes
        fan_in = int(math.prod(lhs[i] for i in lc))
        positions = int(math.prod(d for i, d in enumerate(lhs) if i not in lc and i != 0))
        fan_out = int(math.prod(d for i, d in enumerate(rhs) if i not in rc))
        return Layer(name, size, positions, fan_in, fan_out)
    return Layer(name, size)


def _per_example_bytes(v) -> int:
    aval = v.aval
    shape = getattr(aval, "shape", ())
    return int(math.prod(shape[1:])) * int(getattr(aval.dtype, "itemsize", 4)) if shape else 0


def _conv_patch_bytes(eqn) -> int:
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    filt = math.prod(rhs.shape[i] for i in dn.rhs_spec[2:])
    spatial = math.prod(out.shape[i] for i in dn.out_spec[2:])
    return int(lhs.shape[dn.lhs_spec[1]]) * filt * spatial * lhs.dtype.itemsize


def _walk(closed: jcore.ClosedJaxpr, in_batched: list[bool], in_param: list[bool], n: int,
          counter: list[int]) -> tuple[list[bool], list[bool]]:
    """Check a jaxpr, counting in ``counter`` its boundary operations, the per-example bytes of
    its batched values and its largest patch matrix; returns (batched, param) of its outputs."""
    jaxpr = closed.jaxpr
    batched: dict[Any, bool] = {}
    param: dict[Any, bool] = {}
    for v in jaxpr.constvars:
        batched[v], param[v] = False, False
    for v, b, q in zip(jaxpr.invars, in_batched, in_param):
        batched[v], param[v] = b, q

    def flags(v):
        if isinstance(v, jcore.Literal):
            return False, False
        return batched[v], param[v]

    for eqn in jaxpr.eqns:
        fl = [flags(v) for v in eqn.invars]
        bs, ps = [f[0] for f in fl], [f[1] for f in fl]
        name = eqn.primitive.name
        if not any(bs):
            for v in eqn.outvars:
                batched[v], param[v] = False, any(ps)
            continue
        sub = _sub_jaxpr(eqn)
        if name in _CALLS and sub is not None:
            ob, op = _walk(sub, bs, ps, n, counter)
            for v, b, q in zip(eqn.outvars, ob, op):
                batched[v], param[v] = b, q
            continue
        if name in _CUSTOM:
            if any(q and not b for b, q in zip(bs, ps)):
                raise Unsupported(f"{name} with parameters inside")
            if sub is None:
                raise Unsupported(f"{name} without a readable jaxpr")
            inner_b, _ = _walk(sub, bs, ps, n, [0, 0, 0, []])
            for v, b in zip(eqn.outvars, inner_b):
                batched[v], param[v] = b, any(ps)
            continue
        _check_batched_eqn(eqn, bs, n)
        if any(p and not b for b, p in zip(bs, ps)):
            if eqn.primitive.multiple_results:
                raise Unsupported(f"{name}: parameters meet the examples in a multi-output operation")
            counter[0] += 1
            counter[3].append(_layer(eqn, bs, ps))
            if name == "conv_general_dilated":
                counter[2] = max(counter[2], _conv_patch_bytes(eqn))
        for v in eqn.outvars:
            batched[v], param[v] = True, any(ps)
            counter[1] += _per_example_bytes(v)
    return [flags(v)[0] for v in jaxpr.outvars], [flags(v)[1] for v in jaxpr.outvars]


def analyse(fn: Callable, params: Any, x: Any, aux: Any = None) -> Analysis:
    """The :class:`Analysis` of ``fn(params, x[, aux]) -> (n, k)``; raises
    :class:`Unsupported` (saying why) when per-example gradients cannot be had from one backward
    pass.  ``params``, ``x`` and ``aux`` may be ``jax.ShapeDtypeStruct``."""
    n = int(x.shape[0])
    closed = jax.make_jaxpr(lambda p, xx, a: fn(p, xx, a) if a is not None else fn(p, xx))(params, x, aux)
    n_p = len(jax.tree.leaves(params))
    n_in = len(closed.jaxpr.invars)
    in_param = [i < n_p for i in range(n_in)]
    in_batched = [i == n_p for i in range(n_in)]
    counter = [0, 0, 0, []]
    out_b, _ = _walk(closed, in_batched, in_param, n, counter)
    if len(out_b) != 1 or not out_b[0]:
        raise Unsupported("the function must return one batched (n, k) array")
    if counter[0] == 0:
        raise Unsupported("no parameter meets the examples")
    return Analysis(counter[0], counter[1], counter[2], tuple(counter[3]))


# ---------------------------------------------------------------------------------------------
# evaluation with perturbations at the boundaries
# ---------------------------------------------------------------------------------------------


@dataclass
class _Boundary:
    eqn: Any
    operands: list  # values of the eqn's operands (batched ones and parameter-derived ones)
    which: list  # per operand: "b" (batched), "p" (parameter-derived, differentiated), "c"


def _eval(closed, args, in_batched, in_param, perturb, record):
    """Evaluate a jaxpr; boundary outputs get ``perturb[i]`` added (in the order met)."""
    jaxpr = closed.jaxpr
    env, batched, param = {}, {}, {}
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v], batched[v], param[v] = c, False, False
    for v, a, b, q in zip(jaxpr.invars, args, in_batched, in_param):
        env[v], batched[v], param[v] = a, b, q

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def flags(v):
        return (False, False) if isinstance(v, jcore.Literal) else (batched[v], param[v])

    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        fl = [flags(v) for v in eqn.invars]
        bs, ps = [f[0] for f in fl], [f[1] for f in fl]
        sub = _sub_jaxpr(eqn)
        name = eqn.primitive.name
        if any(bs) and name in _CALLS and sub is not None:
            outs, ob, op = _eval(sub, vals, bs, ps, perturb, record)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            ans = eqn.primitive.bind(*vals, **bind_params)
            outs = list(ans) if eqn.primitive.multiple_results else [ans]
            ob = [any(bs)] * len(outs)
            op = [any(ps)] * len(outs)
            if any(bs) and name not in _CUSTOM and any(p and not b for b, p in zip(bs, ps)):
                i = len(record)
                record.append(_Boundary(eqn, vals, ["b" if b else ("p" if p else "c") for b, p in zip(bs, ps)]))
                outs = [outs[0] + perturb[i]] if perturb is not None else outs
        for v, o, b, q in zip(eqn.outvars, outs, ob, op):
            env[v], batched[v], param[v] = o, b, q
    return [read(v) for v in jaxpr.outvars], [flags(v)[0] for v in jaxpr.outvars], \
        [flags(v)[1] for v in jaxpr.outvars]


def _conv_rhs_grads(bnd: _Boundary, delta: jax.Array) -> jax.Array | None:
    """Per-example kernel gradients of a convolution, ``(n, *rhs.shape)``: image patches of the
    input times the back-propagated vectors, one batched matrix product (``None``: not this case)."""
    p = bnd.eqn.params
    if bnd.which != ["b", "p"] or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    lhs, rhs = bnd.operands
    dn = p["dimension_numbers"]
    a = jnp.transpose(lhs, dn.lhs_spec)  # (n, C, spatial...)
    d = jnp.transpose(delta, dn.out_spec)  # (n, O, spatial...)
    filt = [rhs.shape[i] for i in dn.rhs_spec[2:]]
    out_spatial = [delta.shape[i] for i in dn.out_spec[2:]]
    patches = _patches(a, filt, p["window_strides"], p["padding"], p["lhs_dilation"],
                       p["rhs_dilation"], out_spatial)
    n = a.shape[0]
    patches = patches.reshape(n, patches.shape[1], -1)
    d = d.reshape(n, d.shape[1], -1)
    g = jnp.einsum("nfs,nos->nfo", patches, d, precision=_HIGHEST)  # (n, C*prod(filt), O)
    g = g.reshape((n, a.shape[1], *filt, d.shape[1]))  # (n, I, spatial..., O)
    # to the kernel's own layout: rhs axis rhs_spec[0] is O, rhs_spec[1] is I, then spatial
    src = {dn.rhs_spec[0]: len(filt) + 1, dn.rhs_spec[1]: 0}
    for j, axis in enumerate(dn.rhs_spec[2:]):
        src[axis] = 1 + j
    return jnp.transpose(g, (0, *[1 + src[axis] for axis in range(rhs.ndim)]))


def _patches(a, filt, strides, padding, lhs_dilation, rhs_dilation, out_spatial) -> jax.Array:
    """Image patches ``(n, C*prod(filt), out spatial...)`` (patch order ``(C, spatial...)``) of
    ``a`` ``(n, C, spatial...)``, as ``conv_general_dilated`` sees them.  Built from strided
    slices of the padded input (memory moves only): ``lax.conv_general_dilated_patches`` computes
    them as a convolution with an identity kernel, ten times slower on the CPU."""
    if any(d != 1 for d in (lhs_dilation or ())):
        return jax.lax.conv_general_dilated_patches(
            a, filt, strides, padding, lhs_dilation, rhs_dilation, precision=_HIGHEST)
    rhs_dilation = rhs_dilation or (1,) * len(filt)
    pad = [(0, 0), (0, 0)] + [(int(lo), int(hi)) for lo, hi in padding]
    if any(lo < 0 or hi < 0 for lo, hi in pad):
        return jax.lax.conv_general_dilated_patches(
            a, filt, strides, padding, lhs_dilation, rhs_dilation, precision=_HIGHEST)
    a = jnp.pad(a, pad)
    n, c = a.shape[:2]
    slices = []
    for offset in itertools.product(*[range(f) for f in filt]):
        start = [0, 0] + [o * d for o, d in zip(offset, rhs_dilation)]
        limit = [n, c] + [st + (m - 1) * s + 1 for st, m, s in zip(start[2:], out_spatial, strides)]
        slices.append(jax.lax.slice(a, start, limit, [1, 1, *strides]))
    stacked = jnp.stack(slices, axis=2)  # (n, C, prod(filt), out spatial...)
    return stacked.reshape(n, c * len(slices), *out_spatial)


def _local_grads(bnd: _Boundary, delta: jax.Array) -> list[jax.Array]:
    """Per-example gradients of the boundary's parameter-derived operands, each ``(n, *shape)``."""
    if bnd.eqn.primitive.name == "conv_general_dilated":
        g = _conv_rhs_grads(bnd, delta)
        if g is not None:
            return [g]
    prim = bnd.eqn.primitive
    bind_params = prim.get_bind_params(bnd.eqn.params)
    pidx = [i for i, w in enumerate(bnd.which) if w == "p"]
    bidx = [i for i, w in enumerate(bnd.which) if w == "b"]

    def one(batched_rows, d_row):
        def op(*pvals):
            vals = list(bnd.operands)
            for i, v in zip(pidx, pvals):
                vals[i] = v
            for i, v in zip(bidx, batched_rows):
                vals[i] = v[None]
            return prim.bind(*vals, **bind_params)

        _, vjp = jax.vjp(op, *[bnd.operands[i] for i in pidx])
        return vjp(d_row[None])

    return list(jax.vmap(one)([bnd.operands[i] for i in bidx], delta))


def per_example_grads(fn: Callable, params: Any, x: jax.Array, aux: Any, cotangents: jax.Array) -> Any:
    """Per-example gradients of ``<cotangents[n], fn(params, x)[n]>`` with respect to ``params``:
    a pytree like ``params`` with a leading example axis.  ``cotangents``: ``(n, k)``, or
    ``(m, n, k)`` for ``m`` sets at once (then two leading axes, ``(m, n, ...)``).
    Call :func:`analyse` first: it raises when the function does not qualify."""
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda p, xx, a: fn(p, xx, a) if a is not None else fn(p, xx))(params, x, aux)
    flat_aux = jax.tree.leaves(aux)
    n_p = len(leaves)
    in_b = [False] * n_p + [True] + [False] * len(flat_aux)
    in_p = [True] * n_p + [False] * (1 + len(flat_aux))

    record: list[_Boundary] = []
    _eval(closed, [*leaves, x, *flat_aux], in_b, in_p, None, record)  # shapes of the boundaries
    zeros = [jnp.zeros(b.eqn.outvars[0].aval.shape, b.eqn.outvars[0].aval.dtype) for b in record]

    def forward(es):
        rec: list[_Boundary] = []
        outs, _, _ = _eval(closed, [*leaves, x, *flat_aux], in_b, in_p, es, rec)
        return outs[0], [b.operands for b in rec]

    out, vjp, operands = jax.vjp(forward, zeros, has_aux=True)
    rec = [_Boundary(b.eqn, ops, b.which) for b, ops in zip(record, operands)]

    def param_values(ls):
        # the boundaries' parameter-derived operands as functions of the parameters
        r: list[_Boundary] = []
        _eval(closed, [*ls, x, *flat_aux], in_b, in_p, None, r)
        return [[b.operands[i] for i, w in enumerate(b.which) if w == "p"] for b in r]

    pvals, pvjp = jax.vjp(param_values, leaves)
    identity = _identity_map(closed, n_p, rec)

    def for_cotangent(ct):
        (deltas,) = vjp(ct)
        gs = [_local_grads(b, d) for b, d in zip(rec, deltas)]
        if identity is not None:  # every boundary operand is a parameter leaf: no map back
            out_leaves = [None] * n_p
            for (bi, oi), leaf_i in identity.items():
                g = gs[bi][oi]
                out_leaves[leaf_i] = g if out_leaves[leaf_i] is None else out_leaves[leaf_i] + g
            return [g if g is not None else jnp.zeros((x.shape[0],) + l.shape, l.dtype)
                    for g, l in zip(out_leaves, leaves)]
        return jax.vmap(lambda g: pvjp(g)[0])(gs)

    if cotangents.ndim == 3:
        grads = jax.vmap(for_cotangent)(cotangents)
    else:
        grads = for_cotangent(cotangents)
    return jax.tree.unflatten(treedef, grads)


def _identity_map(closed, n_p, rec) -> dict | None:
    """``{(boundary, operand): leaf}`` when every parameter-derived boundary operand is a
    parameter leaf itself, each used once (then the gradients need no mapping back)."""
    invars = closed.jaxpr.invars[:n_p]
    index = {v: i for i, v in enumerate(invars)}
    found: dict = {}
    seen = set()
    for bi, b in enumerate(rec):
        k = 0
        for v, w in zip(b.eqn.invars, b.which):
            if w != "p":
                continue
            if isinstance(v, jcore.Literal) or v not in index or index[v] in seen:
                return None
            seen.add(index[v])
            found[(bi, k)] = index[v]
            k += 1
    return found
