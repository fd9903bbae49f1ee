"""Speed and memory of the kernels (a measurement, not a test): ``python benchmarks/kernels.py``.

For ``MLP(784 -> 512 -> 512 -> 10)`` (NTK parameterisation, float32) on n = 1000 and n = 4000
real MNIST digits (mnist-5k), measures the time after compilation (best of ``--repeat``) and the
peak resident memory of ``entk``, ``pntk`` (generic Jacobian route and dense fast route) and
``trace_ntk``; counts the FLOPs each route needs and reports the FLOP/s achieved as a fraction
of a plain ``jnp.dot`` of comparable size measured in the same run.  Each measurement runs in a
fresh process, so peak memory belongs to that kernel alone.  Prints a table with the targets as
ratios (``target / measured`` > 1 means the target is met) and writes JSON.

Targets on a 2-core laptop-class CPU (what neural-tangents' fastest implementation takes):
pNTK at n = 1000 < 0.35 s, eNTK at n = 1000 < 2.6 s, pNTK at n = 4000 < 5 s, and the dense fast
route >= 20x faster than the generic one at n = 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import RESULTS, finish, write_json

WIDTHS = (784, 512, 512, 10)
CASES = [  # (kernel, method, n)
    ("pntk", "dense", 1000),
    ("pntk", "jacobian", 1000),
    ("entk", "dense", 1000),
    ("trace", "dense", 1000),
    ("pntk", "dense", 4000),
    ("trace", "dense", 4000),
]
QUICK_CASES = [("pntk", "dense", 200), ("pntk", "jacobian", 200), ("entk", "dense", 200)]
TARGETS = {("pntk", "dense", 1000): 0.35, ("entk", "dense", 1000): 2.6, ("pntk", "dense", 4000): 5.0}


def flops(kind: str, method: str, n: int) -> float:
    """Multiply-adds x 2 of the dominant operations (kernel of n points with itself)."""
    layers = list(zip(WIDTHS[:-1], WIDTHS[1:]))
    k = WIDTHS[-1]
    n_params = sum(a * b + b for a, b in layers)
    if method == "jacobian":
        rows = k if kind in ("entk", "trace") else 1
        jac = 2 * 3 * n * rows * n_params  # forward + backward per row of the Jacobian
        contract = 2 * (n * rows) ** 2 * n_params if kind == "entk" else 2 * n * n * rows * n_params
        return jac + contract
    total = 2 * 2 * n * n_params  # forward pass and back-propagated vectors
    for i, (a, b) in enumerate(layers):
        total += 2 * n * n * a  # activation Gram matrix
        last = i == len(layers) - 1
        if kind == "entk":
            total += 0 if last else 2 * (n * k) ** 2 * b
        elif kind == "trace":
            total += 2 * n * n * k * b
        else:
            total += 2 * n * n * b
    return float(total)


def measure_one(kind: str, method: str, n: int, repeat: int) -> dict:
    """Runs inside a child process: time and peak memory of one kernel."""
    import resource

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ntk_tutorial import data, kernels, models

    ds = data.load("mnist-5k", seed=0)
    x_all = jnp.concatenate([jnp.asarray(ds.x_train), jnp.asarray(ds.x_test)])
    x = x_all[:n]
    apply_fn, params = models.functional(models.MLP(WIDTHS, rngs=nnx.Rngs(params=jax.random.key(0))))
    fn = {"entk": kernels.entk, "pntk": kernels.pntk, "trace": kernels.trace_ntk}[kind]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn(apply_fn, params, x, method=method).block_until_ready()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(apply_fn, params, x, method=method).block_until_ready()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return {
        "seconds": min(times),
        "first_call_seconds": first,
        "peak_rss_bytes": peak * scale,
        "peak_rss_above_data_bytes": (peak - base_rss) * scale,
    }


def matmul_reference(repeat: int) -> dict:
    """GFLOP/s of a plain float32 jnp.dot shaped like the eNTK's main product at n = 1000."""
    import jax

    a = jax.random.normal(jax.random.key(0), (10_000, 512))
    f = jax.jit(lambda a: a @ a.T)
    f(a).block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"shape": "(10000, 512) @ (512, 10000)", "gflops": 2 * 10_000**2 * 512 / min(times) / 1e9}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n = 200, one repeat: a smoke check (under a minute)")
    parser.add_argument("--output", "--out", dest="out", default=None,
                        help="JSON path (default benchmarks/results/kernels[-quick].json)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, method, n = args.child
        print(json.dumps(measure_one(kind, method, int(n), args.repeat)))
        return
    if args.matmul:
        print(json.dumps(matmul_reference(args.repeat)))
        return

    import jax

    if args.quick:
        args.repeat = 1
    out_path = args.out or str(RESULTS / ("kernels-quick.json" if args.quick else "kernels.json"))
    ref = run_child(["--matmul", "--repeat", str(args.repeat)])
    if "error" in ref:
        finish([f"matmul reference: {ref['error']}"], quick=args.quick)
    rows = []
    for kind, method, n in (QUICK_CASES if args.quick else CASES):
        res = run_child(["--child", kind, method, str(n), "--repeat", str(args.repeat)])
        res.update(kernel=kind, method=method, n=n, gflop=flops(kind, method, n) / 1e9)
        if "seconds" in res:
            res["gflops"] = res["gflop"] / res["seconds"]
            res["fraction_of_matmul"] = res["gflops"] / ref["gflops"]
            if (kind, method, n) in TARGETS:
                res["target_seconds"] = TARGETS[(kind, method, n)]
                res["target_over_measured"] = TARGETS[(kind, method, n)] / res["seconds"]
        rows.append(res)
        print(f"  measured {kind:5s} {method:8s} n={n}: {res.get('seconds', float('nan')):.3f} s",
              file=sys.stderr)

    by = {(r["kernel"], r["method"], r["n"]): r for r in rows}
    speedup = None
    n_cmp = 200 if args.quick else 1000
    if "seconds" in by[("pntk", "jacobian", n_cmp)] and "seconds" in by[("pntk", "dense", n_cmp)]:
        speedup = by[("pntk", "jacobian", n_cmp)]["seconds"] / by[("pntk", "dense", n_cmp)]["seconds"]

    print(f"\nMLP{WIDTHS} float32, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}; "
          f"plain jnp.dot {ref['shape']}: {ref['gflops']:.1f} GFLOP/s\n")
    head = f"{'kernel':6} {'route':8} {'n':>5} {'seconds':>8} {'peak MiB':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'of dot':>7} {'target/measured':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "seconds" not in r:
            print(f"{r['kernel']:6} {r['method']:8} {r['n']:>5}  error: {r['error']}")
            continue
        tgt = f"{r['target_over_measured']:.2f} ({r['target_seconds']} s)" if "target_seconds" in r else ""
        print(f"{r['kernel']:6} {r['method']:8} {r['n']:>5} {r['seconds']:8.3f} "
              f"{r['peak_rss_bytes'] / 2**20:9.0f} {r['gflop']:8.1f} {r['gflops']:8.1f} "
              f"{r['fraction_of_matmul']:7.2f} {tgt:>16}")
    if speedup is not None:
        print(f"\ndense fast route vs generic Jacobian route, pNTK n={n_cmp}: {speedup:.0f}x "
              f"(target >= 20x: ratio {speedup / 20:.2f})")

    write_json(out_path, {
        "benchmark": "kernels", "quick": args.quick, "widths": WIDTHS, "matmul_reference": ref, "rows": rows,
        "dense_over_generic_speedup_pntk": speedup, "speedup_n": n_cmp,
    })
    failures = [f"{r['kernel']} {r['method']} n={r['n']}: {r['error']}" for r in rows if "error" in r]
    if not args.quick:
        failures += [f"{r['kernel']} {r['method']} n={r['n']}: {r['seconds']:.3f} s > target {r['target_seconds']} s"
                     for r in rows if r.get("target_over_measured", 1.0) < 1.0]
        if speedup is not None and speedup < 20:
            failures.append(f"dense over generic pNTK speed-up {speedup:.1f}x < 20x")
    finish(failures, quick=args.quick)


if __name__ == "__main__":
    main()
