"""Kernels of convolutional networks (issue 17): ``python benchmarks/conv_kernels.py``.

For the small CNN (2 conv layers of 32 channels on 28x28x1 images) and WRN-10-2 (on 32x32x3),
times each kernel after compilation (best of ``--repeat``) twice in the same run: with the
package's per-example gradients from one batched backward pass (``kernels.GRADIENTS = "auto"``,
:mod:`ntk_tutorial.kernels.pergrad`) and with ``vmap(grad)`` (``"vmap"``, what the package did before).
Prints for each case the seconds, the speed-up, the gradient evaluations per point
(``kernels.gradient_evaluations``), and the ratio to the *matmul limit*: the kernel's FLOPs
(XLA's count for the gradient passes, plus the products) divided by the float32 matmul rate
measured in the same run.  A case with ``--budget`` streams its Jacobians through a scratch file
(N points, a 512 MiB budget by default: gradient evaluations per point must stay <= 1.1).

With ``--nt-python PYTHON`` (the Python of the pinned legacy environment, ``environment-nt.yml``)
each case is also computed by neural-tangents 0.6.5 in that environment, from the same
parameters and inputs (``scripts/nt_conv_reference.py``: each of its three implementations,
best of ``--repeat``): the table then gives neural-tangents' best time, the ratio to it and the
relative difference of the two kernels (an independent reference).

Failures (exit status 1): an error, a kernel that differs from the ``vmap`` one by more than
1e-4 (relative), from neural-tangents' float32 kernel by more than 1e-2 or from its float64 eNTK
at 6 points (checked once per model) by more than 1e-10, or more than 1.1 gradient evaluations per
point.  Speed is printed as ratios,
not checked: issue 17's goals (>= 2.5x faster than the package before it, within 2x of the
matmul limit) are read off the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import RESULTS, finish, write_json

CASES = [  # (model, kernel, n)
    ("cnn", "pntk", 1024),
    ("cnn", "entk", 256),
    ("wrn-10-2", "pntk", 512),
    ("wrn-10-2", "pntk", 1024),
]
QUICK_CASES = [("cnn", "pntk", 64), ("cnn", "entk", 16)]
STREAM = ("cnn", "pntk", 16000)  # 0.6 GiB of Jacobians: with the 512 MiB budget, the stream route
QUICK_STREAM = ("cnn", "pntk", 300)


def _model(name: str):
    from flax import nnx

    from ntk_tutorial import models

    if name == "cnn":
        return models.CNN((28, 28, 1), 10, channels=32, depth=2, rngs=nnx.Rngs(0)), (28, 28, 1)
    return models.WideResNet((32, 32, 3), 10, blocks=1, widen=2, rngs=nnx.Rngs(0)), (32, 32, 3)


def build(name: str):
    import jax

    from ntk_tutorial import models

    model, shape = _model(name)
    apply_fn, params, state = models.split(model)
    return apply_fn, params, state, shape, jax


def _flat(tree, prefix: str) -> dict:
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out[prefix + "/".join(keys)] = np.asarray(leaf)
    return out


def neural_tangents(python: str, name: str, kind: str, n: int, repeat: int, float64: bool = False,
                    implementations: str = "1,2,3") -> dict:
    """neural-tangents' seconds per implementation and its kernel, computed by
    ``scripts/nt_conv_reference.py`` under the legacy ``python`` from this case's parameters and inputs
    (``float64``: parameters, statistics and inputs cast to float64, and the package's own kernel
    of the same case in float64 under ``"package"``)."""
    import numpy as np

    from ntk_tutorial import kernels

    apply_fn, params, stats, shape, jax = build(name)
    x = np.asarray(jax.random.normal(jax.random.key(1), (n, int(np.prod(shape)))))
    package = None
    if float64:
        with jax.enable_x64(True):
            cast = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
            params, x = cast(params), x.astype(np.float64)
            if stats is not None:
                stats = cast(stats)
            package = np.asarray(getattr(kernels, kind)(apply_fn, params, x, state=stats))
    strides = []
    if name != "cnn":
        strides = [int(layer.conv1.strides[0]) for layer in _model(name)[0].layers]
    case = {"model": np.array(name if name == "cnn" else "wrn"), "kind": np.array(kind), "x": x,
            "image_shape": np.asarray(shape), "strides": np.asarray(strides, int),
            **_flat(params, "param/"), **(_flat(stats, "stat/") if stats is not None else {})}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "case.npz", **case)
        script = Path(__file__).resolve().parents[1] / "scripts" / "nt_conv_reference.py"
        proc = subprocess.run([python, str(script), str(Path(tmp) / "case.npz"), str(Path(tmp) / "out.npz"),
                               "--repeat", str(repeat), "--implementations", implementations],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"neural-tangents run failed: {proc.stderr.strip().splitlines()[-1:]}")
        res = np.load(Path(tmp) / "out.npz")
        meta = json.loads(str(res["meta"]))
        kernel = np.asarray(res["kernel"])
    if kind == "entk":  # neural-tangents: (n1, n2, k, k), the package's axis order too
        kernel = kernel.reshape(n, n, *kernel.shape[2:])
    return {**meta, "kernel": kernel.reshape(n, n) if kind == "pntk" else kernel, "package": package}


def reference_check(python: str, name: str) -> float:
    """Relative difference of the package's and neural-tangents' eNTK of ``name`` at 6 points in
    float64: the same function at the same point, so round-off only (float32 kernels of these
    networks differ by up to ~1e-3 relative, from summation order over their parameters)."""
    import numpy as np

    ref = neural_tangents(python, name, "entk", 6, 1, float64=True, implementations="1")
    a, b = ref["package"], ref["kernel"]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def measure(name: str, kind: str, n: int, repeat: int, gradients: str, budget: int | None = None) -> dict:
    import numpy as np

    from ntk_tutorial import kernels

    apply_fn, params, state, shape, jax = build(name)
    x = jax.random.normal(jax.random.key(1), (n, int(np.prod(shape))))
    fn = {"pntk": kernels.pntk, "entk": kernels.entk}[kind]
    kernels.GRADIENTS = gradients
    old = kernels._jacobian_budget
    if budget is not None:
        kernels._jacobian_budget = lambda: budget
    try:
        plan = kernels.plan_kernel(kind, apply_fn, params, x, state=state)
        out = np.asarray(fn(apply_fn, params, x, state=state))  # compile
        best, evals = float("inf"), 0
        for _ in range(repeat):
            e0 = kernels.gradient_evaluations()
            t = time.perf_counter()
            out = np.asarray(fn(apply_fn, params, x, state=state))
            best = min(best, time.perf_counter() - t)
            evals = kernels.gradient_evaluations() - e0
    finally:
        kernels._jacobian_budget = old
        kernels.GRADIENTS = "auto"
    return {"seconds": best, "evaluations_per_point": evals / n, "route": plan.route, "chunk": plan.chunk,
            "gradient_flops": plan.gradient_flops, "gram_flops": plan.gram_flops, "kernel": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small n, one repeat: a smoke check (under a minute)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--budget", type=float, default=512 * 2**20, help="Jacobian budget of the stream case (bytes)")
    parser.add_argument("--output", default=str(RESULTS / "conv_kernels.json"))
    parser.add_argument("--nt-python", default=None, metavar="PYTHON",
                        help="the Python of the legacy environment with neural-tangents 0.6.5 "
                             "(environment-nt.yml): time its implementations on the same cases")
    args = parser.parse_args()
    import numpy as np

    from ntk_tutorial import kernels

    repeat = 1 if args.quick else args.repeat
    gemm = kernels.matmul_rate()
    print(f"float32 matmul rate here: {gemm / 1e9:.0f} GFLOP/s")
    head = (f"{'model':9} {'kernel':6} {'n':>5} {'route':8} {'new s':>7} {'vmap s':>7} {'speed-up':>8} "
            f"{'evals/pt':>8} {'limit s':>8} {'x limit':>7}" + (f" {'nt s':>7} {'x nt':>6}" if args.nt_python else ""))
    print(head + "\n" + "-" * len(head))
    rows, failures = [], []
    cases = QUICK_CASES if args.quick else CASES
    if args.nt_python:
        for name in dict.fromkeys(c[0] for c in cases):
            try:
                rel = reference_check(args.nt_python, name)
                print(f"{name}: the package's eNTK vs neural-tangents', float64, 6 points: {rel:.1e} relative")
                rows.append({"model": name, "reference_check_float64": rel})
                if not rel <= 1e-10:
                    failures.append(f"{name}: the package's and neural-tangents' float64 eNTKs differ by {rel:.1e}")
            except Exception as err:  # noqa: BLE001 - report and go on
                failures.append(f"{name}: neural-tangents reference check: {type(err).__name__}: {err}")
    for name, kind, n in cases:
        try:
            new = measure(name, kind, n, repeat, "auto")
            old = measure(name, kind, n, repeat, "vmap")
        except Exception as err:  # noqa: BLE001 - report and go on
            failures.append(f"{name} {kind} n={n}: {type(err).__name__}: {err}")
            continue
        a, b = new.pop("kernel"), old.pop("kernel")
        rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        limit = (new["gram_flops"] + new["gradient_flops"]) / gemm
        row = {"model": name, "kernel": kind, "n": n, "new": new, "vmap": old, "relative_difference": rel,
               "speedup": old["seconds"] / new["seconds"], "limit_seconds": limit,
               "ratio_to_limit": new["seconds"] / limit}
        rows.append(row)
        line = (f"{name:9} {kind:6} {n:5d} {new['route']:8} {new['seconds']:7.2f} {old['seconds']:7.2f} "
                f"{row['speedup']:7.2f}x {new['evaluations_per_point']:8.2f} {limit:8.2f} {row['ratio_to_limit']:6.2f}x")
        if args.nt_python:
            try:
                ref = neural_tangents(args.nt_python, name, kind, n, repeat)
                nt_kernel = ref.pop("kernel")
                ref.pop("package")
                times = [t for t in ref["seconds"].values() if t == t]
                nt_best = min(times) if times else float("nan")
                nt_rel = float(np.abs(a - nt_kernel).max() / max(np.abs(nt_kernel).max(), 1e-30))
                row["neural_tangents"] = {**ref, "best_seconds": nt_best, "relative_difference": nt_rel}
                line += f" {nt_best:7.2f} {new['seconds'] / nt_best:5.2f}x"
                if not nt_rel <= 1e-2:  # float32 (see reference_check for the float64 bound)
                    failures.append(f"{name} {kind} n={n}: the package's and neural-tangents' float32 kernels "
                                    f"differ by {nt_rel:.2e} (relative)")
            except Exception as err:  # noqa: BLE001 - report and go on
                failures.append(f"{name} {kind} n={n}: neural-tangents: {type(err).__name__}: {err}")
        print(line)
        if rel > 1e-4:
            failures.append(f"{name} {kind} n={n}: structured and vmap kernels differ by {rel:.2e} (relative)")
        if new["evaluations_per_point"] > 1.1:
            failures.append(f"{name} {kind} n={n}: {new['evaluations_per_point']:.2f} gradient evaluations per point")
    name, kind, n = QUICK_STREAM if args.quick else STREAM
    budget = int(args.budget if not args.quick else 2**20)
    try:
        s = measure(name, kind, n, 1, "auto", budget=budget)
        s.pop("kernel")
        print(f"\nstream case: {name} {kind} n={n}, budget {budget / 2**20:.0f} MiB: route {s['route']}, "
              f"{s['seconds']:.1f} s, {s['evaluations_per_point']:.2f} gradient evaluations per point")
        rows.append({"model": name, "kernel": kind, "n": n, "budget": budget, "stream": s})
        if s["evaluations_per_point"] > 1.1:
            failures.append(f"stream case: {s['evaluations_per_point']:.2f} gradient evaluations per point")
        if s["route"] != "stream":
            failures.append(f"stream case took route {s['route']!r}, not 'stream'")
    except Exception as err:  # noqa: BLE001
        failures.append(f"stream case: {type(err).__name__}: {err}")
    write_json(args.output, {"quick": args.quick, "matmul_flops_per_s": gemm, "cases": rows})
    finish(failures, quick=args.quick)


if __name__ == "__main__":
    main()
