"""What the active-learning presets cost (a measurement, not a test): ``python benchmarks/presets.py``.

For each preset it runs the real runner, :func:`ntk_tutorial.active.run.run_experiment`, for one
cycle at two reduced sizes (labelled ``n``, candidates ``m``, a few epochs) on a stand-in of the
preset's data with the same image shape and classes (``synthetic-<set>``: timings do not depend
on pixel values; ``cpu-mnist-5k`` uses its own offline digits), the same network and settings,
twice per size (the second run is timed: everything is compiled by then).  From the timings the
runner records per cycle it fits

* training: seconds per example and epoch (``train_s / (epochs n)``);
* evaluation: seconds per test image;
* the kernel on ``L u S``: ``g N + h N^2`` (``N = n + m``: one gradient per point, the Gram
  product), fitted on the two sizes;
* the look-ahead scoring: ``a m^2 (n + k)``, fitted on the larger size;

and extrapolates one seed of the preset's protocol (every cycle's ``n``, its ``subset``, its
``epochs``, its test set).  At full size the kernel may no longer fit the features route (every
gradient once, then one product: :mod:`ntk_tutorial.kernels`); then the block route recomputes
gradients, about ``N (N / B + 1)`` of them for blocks of ``B``, and the estimate says so.
Everything beyond the measured sizes is an extrapolation, labelled as such in the output.

``--quick``: ``cpu-mnist-5k`` at two tiny sizes (a smoke check, under a minute; no estimate is
printed as a claim).  Exits non-zero when a run fails.  Writes JSON to
``benchmarks/results/presets[-quick].json``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

from common import RESULTS, finish, write_json

PRESETS = ("cpu-mnist-5k", "mnist", "svhn", "cifar10", "cifar100")
SIZES = {"cifar100": ((16, 32), (32, 64))}  # ResNet18: 11 M parameters per gradient
DEFAULT_SIZES = ((32, 64), (64, 128))
QUICK_SIZES = ((8, 16), (16, 32))
EPOCHS = 2
N_TEST = 64
JACOBIAN_ENV = "NTK_TUTORIAL_JACOBIAN_BYTES"
MEASURE_BUDGET = 8 * 2**30  # bytes of per-example gradients allowed while measuring
FULL_TEST = {"cpu-mnist-5k": 1000, "mnist": 10_000, "svhn": 26_032, "cifar10": 10_000, "cifar100": 10_000}


def measure(preset: str, n: int, m: int, seed: int, quick: bool) -> dict:
    """One cycle of the real runner at ``(n, m)``, timed on its second run."""
    from ntk_tutorial.active import run as al

    base = al.config_from_preset(preset)
    dataset = base.dataset if base.dataset in ("mnist-5k", "digits") else f"synthetic-{base.dataset}"
    cfg = al.config_from_preset(preset, dataset=dataset, init=n, query=min(8, m), subset=m, cycles=1,
                                epochs=1 if quick else EPOCHS, strategy="mlmoc-flips", seed=seed,
                                n_test=N_TEST, n_train=None if dataset == "mnist-5k" else n + m + 8)
    rec = None
    # measure on the features route (every gradient once) whatever the default budget: the
    # estimate then counts the gradient evaluations of the route the full size would take
    old = os.environ.get(JACOBIAN_ENV)
    os.environ[JACOBIAN_ENV] = str(MEASURE_BUDGET)
    try:
        for _ in range(2):  # the first run compiles
            with tempfile.TemporaryDirectory() as out:
                rec = al.run_experiment(cfg, out)[0]
    finally:
        if old is None:
            os.environ.pop(JACOBIAN_ENV, None)
        else:
            os.environ[JACOBIAN_ENV] = old
    t = rec["timings"]
    return {"n": n, "m": m, "epochs": cfg.epochs, "n_test": N_TEST, **t,
            "scoring_s": t["query_s"] - t["kernel_s"]}


def estimate(preset: str, rows: list[dict]) -> dict:
    """Extrapolate one seed of the preset from the measured rows (see the module docstring)."""
    import jax
    import numpy as np

    from ntk_tutorial import kernels
    from ntk_tutorial.active import run as al

    cfg = al.config_from_preset(preset)
    image = {"mnist-5k": (28, 28, 1), "mnist": (28, 28, 1)}.get(cfg.dataset, (32, 32, 3))
    classes = 100 if cfg.dataset == "cifar100" else 10
    _, params, _ = al.build_model(cfg, int(np.prod(image)), classes, image)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    small, big = rows[0], rows[-1]
    per_example_epoch = big["train_s"] / (big["epochs"] * big["n"])
    per_test = big["evaluate_s"] / big["n_test"]
    (n1, n2) = (small["n"] + small["m"], big["n"] + big["m"])
    # kernel_s = g N + h N^2 on the two sizes
    a = np.array([[n1, n1**2], [n2, n2**2]], float)
    g, h = np.linalg.solve(a, [small["kernel_s"], big["kernel_s"]])
    if g <= 0 or h < 0:  # noisy at small sizes: all of it per gradient
        g, h = big["kernel_s"] / n2, 0.0
    scoring_coef = big["scoring_s"] / (big["m"] ** 2 * (big["n"] + classes))
    budget = kernels._jacobian_budget()
    total = {"train_s": 0.0, "evaluate_s": 0.0, "kernel_s": 0.0, "scoring_s": 0.0}
    gradient_evals = 0.0
    routes = set()
    for c in range(cfg.cycles):
        n = cfg.init + c * cfg.query
        big_n = n + cfg.subset
        total["train_s"] += cfg.epochs * n * per_example_epoch
        total["evaluate_s"] += FULL_TEST[preset] * per_test
        if n_params * 4 * big_n <= budget:
            evals, route = big_n, "features (each gradient once)"
        else:
            block = max(1, min(1024, budget // (n_params * 4 * 2)))
            evals, route = big_n * (math.ceil(big_n / block) + 1), f"blocks of {block} (gradients recomputed)"
        routes.add(route)
        gradient_evals += evals
        total["kernel_s"] += g * evals + h * big_n**2
        total["scoring_s"] += scoring_coef * cfg.subset**2 * (n + classes)
    return {"parameters": n_params, "per_example_epoch_s": per_example_epoch, "per_gradient_s": g,
            "gram_s_per_pair": h, "kernel_route": sorted(routes), "gradient_evaluations": gradient_evals,
            "cycles": cfg.cycles, **{k: float(v) for k, v in total.items()},
            "one_seed_s": float(sum(total.values())), "extrapolated": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=None, choices=PRESETS)
    parser.add_argument("--quick", action="store_true", help="cpu-mnist-5k at two tiny sizes (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=1, help="NumPy BLAS threads (0: library default)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    presets = args.presets or (["cpu-mnist-5k"] if args.quick else list(PRESETS))

    import jax

    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    results, failures = {}, []
    for preset in presets:
        sizes = QUICK_SIZES if args.quick else SIZES.get(preset, DEFAULT_SIZES)
        try:
            start = time.perf_counter()
            rows = [measure(preset, n, m, args.seed, args.quick) for n, m in sizes]
            est = estimate(preset, rows)
            results[preset] = {"measured": rows, "estimate": est, "wall_s": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001 - a measurement: report, go on, fail at the end
            failures.append(f"{preset}: {type(err).__name__}: {err}")
            print(f"{preset}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        for r in rows:
            print(f"{preset:13s} n={r['n']:4d} m={r['m']:4d}: train {r['train_s']:.2f} s ({r['epochs']} epochs), "
                  f"kernel {r['kernel_s']:.2f} s, scoring {r['scoring_s']:.2f} s, evaluate {r['evaluate_s']:.2f} s",
                  flush=True)

    print(f"\n{os.cpu_count()} CPU cores, {jax.devices()[0].platform}; one seed of each preset's protocol, "
          "EXTRAPOLATED from the two reduced runs above" + (" (quick: tiny sizes, not a claim)" if args.quick else ""))
    head = f"{'preset':13s} {'params':>9s} {'train h':>8s} {'kernel h':>9s} {'scoring h':>9s} {'total h':>8s}  kernel route"
    print(head)
    print("-" * len(head))
    for preset, res in results.items():
        e = res["estimate"]
        print(f"{preset:13s} {e['parameters'] / 1e6:8.2f}M {e['train_s'] / 3600:8.2f} {e['kernel_s'] / 3600:9.2f} "
              f"{e['scoring_s'] / 3600:9.2f} {e['one_seed_s'] / 3600:8.2f}  {'; '.join(e['kernel_route'])}")
    write_json(args.output or RESULTS / ("presets-quick.json" if args.quick else "presets.json"),
               {"benchmark": "presets", "quick": args.quick, "results": results})
    finish(failures, quick=args.quick)


if __name__ == "__main__":
    main()
