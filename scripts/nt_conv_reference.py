"""neural-tangents' side of ``benchmarks/conv_kernels.py --nt-python PYTHON`` (issue 17).

Runs ONLY in the pinned legacy environment (``environment-nt.yml``: jax 0.4.25, neural-tangents
0.6.5; neural-tangents does not import with current JAX).  ``conv_kernels.py`` writes one case
(model name, kernel kind, the package's parameters, batch-norm statistics and inputs) to an
``.npz`` file and starts this script with the legacy Python::

    PYTHON scripts/nt_conv_reference.py case.npz result.npz --repeat 2

The network is rebuilt here in plain JAX from the same parameters (the package's CNN and
WideResNet in evaluation mode: flax's SAME-padded convolutions, batch norm with frozen
statistics and epsilon 1e-5, global average pooling, a dense readout), so both sides compute the
kernel of the same function at the same point.  Each of neural-tangents' three implementations of
``empirical_ntk_fn`` (1 Jacobian contraction, 2 NTK-vector products, 3 structured derivatives;
``vmap_axes=0``, float32) is jitted, run once to compile, then timed (best of ``--repeat``).  The
result file holds each implementation's seconds (NaN when it failed, with the error in
``errors``) and the kernel of the fastest one, which ``conv_kernels.py`` compares with its own.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *head, last = key.split("/")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _network(name: str, image_shape: tuple, stats: dict, strides: list):
    import jax
    import jax.numpy as jnp

    def conv(x, w, stride=1):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(x, p, s):
        return (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]

    if name == "cnn":
        def f(params, x):
            h = x.reshape((x.shape[0],) + image_shape)
            for i in range(len(params["convs"])):
                layer = params["convs"][str(i)]
                h = jax.nn.relu(conv(h, layer["kernel"]) + layer["bias"])
            h = h.mean(axis=(1, 2))
            return h @ params["head"]["kernel"] + params["head"]["bias"]
        return f

    def f(params, x):  # WideResNet: pre-activation blocks, strides 1, 2, 2 at each group's start
        h = conv(x.reshape((x.shape[0],) + image_shape), params["stem"]["kernel"])
        for i, stride in enumerate(strides):
            p, s = params["layers"][str(i)], stats["layers"][str(i)]
            o = jax.nn.relu(bn(h, p["bn1"], s["bn1"]))
            skip = h if "shortcut" not in p else conv(o, p["shortcut"]["kernel"], stride)
            y = conv(o, p["conv1"]["kernel"], stride)
            y = conv(jax.nn.relu(bn(y, p["bn2"], s["bn2"])), p["conv2"]["kernel"])
            h = y + skip
        h = jax.nn.relu(bn(h, params["bn"], stats["bn"])).mean(axis=(1, 2))
        return h @ params["head"]["kernel"] + params["head"]["bias"]
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case")
    parser.add_argument("result")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--implementations", default="1,2,3",
                        help="which of neural-tangents' implementations to run (comma-separated)")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt

    case = np.load(args.case, allow_pickle=False)
    if case["x"].dtype == np.float64:  # a float64 case (a reference check) computes in float64
        jax.config.update("jax_enable_x64", True)
    name, kind = str(case["model"]), str(case["kind"])
    image_shape = tuple(int(v) for v in case["image_shape"])
    params = _unflatten({k[len("param/"):]: jnp.asarray(case[k]) for k in case.files if k.startswith("param/")})
    stats = _unflatten({k[len("stat/"):]: jnp.asarray(case[k]) for k in case.files if k.startswith("stat/")})
    x = jnp.asarray(case["x"])
    f = _network(name, image_shape, stats, [int(v) for v in case["strides"]])
    k = f(params, x[:1]).shape[-1]
    if kind == "pntk":
        def g(p, xx):
            return f(p, xx).sum(-1, keepdims=True) / math.sqrt(k)
        fn, trace = g, (-1,)  # one output: the trace is the kernel itself
    else:
        fn, trace = f, ()
    seconds, errors, best = {}, {}, (math.inf, None)
    for impl in (int(v) for v in args.implementations.split(",")):
        try:
            ntk = jax.jit(nt.empirical_ntk_fn(fn, trace_axes=trace, vmap_axes=0, implementation=impl))
            out = np.asarray(ntk(x, None, params))  # compile
            t_best = math.inf
            for _ in range(args.repeat):
                t = time.perf_counter()
                out = np.asarray(ntk(x, None, params))
                t_best = min(t_best, time.perf_counter() - t)
            seconds[str(impl)] = t_best
            if t_best < best[0]:
                best = (t_best, out)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: report, go on
            seconds[str(impl)] = float("nan")
            errors[str(impl)] = f"{type(err).__name__}: {str(err)[:300]}"
    np.savez(args.result, kernel=np.asarray(best[1] if best[1] is not None else np.zeros(0)),
             meta=json.dumps({"seconds": seconds, "errors": errors, "jax": jax.__version__,
                              "neural_tangents": nt.__version__, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
    main()
