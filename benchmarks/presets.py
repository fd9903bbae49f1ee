"""What the active-learning presets cost (a measurement, not a test): ``python benchmarks/presets.py``.

For each preset it runs the real runner, :func:`ntk_tutorial.active.run.run_experiment`, for one
cycle at two reduced sizes (labelled ``n``, candidates ``m``, a few epochs) on a stand-in of the
preset's data with the same image shape and classes (``synthetic-<set>``: timings do not depend
on pixel values; ``cpu-mnist-5k`` uses its own offline digits), the same network and settings,
twice per size (the second run is timed: everything is compiled by then).  From the timings the
runner records per cycle it fits

* training: seconds per example and epoch (``train_s / (epochs n)``);
* evaluation: seconds per test image;
* the kernel on ``L u S``: its FLOPs, split into gradient passes and Gram products (below);
* the look-ahead scoring: its FLOPs (:func:`scoring_flops`) at the matmul rate plus ``c + b m``
  for the rest, fitted through the two sizes;

and extrapolates one seed of the preset's protocol (every cycle's ``n``, its ``subset``, its
``epochs``, its test set).  The kernel on ``L u S`` is extrapolated through its plan
(:func:`ntk_tutorial.kernels.plan_kernel`, made for the full size with the Jacobian budget a real
run gets on this machine): its gradient FLOPs at the gradient rate measured in the largest
reduced run (XLA's FLOP count of the gradient passes over the seconds they took) plus its Gram
FLOPs at the float32 matmul rate measured in the same process.  The plan names the route: every
per-example gradient is computed once (``features``: kept in memory; ``stream``: written once to a
scratch file and streamed against a resident block, whose reads are not in the estimate), and the
script fails if a full-size plan evaluates more than 1.1 gradients per point.  Everything beyond
the measured sizes is an extrapolation, labelled as such in the output.

``--quick``: ``cpu-mnist-5k`` at two tiny sizes (a smoke check, under a minute; no estimate is
printed as a claim); ``--sizes 256:512 512:1024`` measures other sizes (a GPU needs larger ones
for its timings to mean anything).  Exits non-zero when a run fails.  Writes JSON to
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
# the step size does not change what a step costs; random images with random labels can make a
# preset's step diverge (lr 0.3 did within 8 steps; the runner stops a diverged run), so the
# timing runs use this small one
TIMING_LR = 0.01
FULL_TEST = {"cpu-mnist-5k": 1000, "mnist": 10_000, "svhn": 26_032, "cifar10": 10_000, "cifar100": 10_000}


def scoring_flops(n: int, m: int, k: int) -> float:
    """FLOPs of one batch round of look-ahead scoring with the pNTK (:mod:`ntk_tutorial.lookahead`):
    the posterior covariance of the ``m`` candidates given the ``n`` labels (``2 m^2 n`` for the
    product, ``2 n^2 m`` for the triangular solves) and the change of every candidate's ``k``
    hypothetical labels on all ``m`` candidates' ``k`` outputs (``2 m^2 k^2``)."""
    return 2.0 * m * m * n + 2.0 * n * n * m + 2.0 * m * m * k * k


def _model(cfg):
    """The preset's network as the runner builds it, and the per-example input shape."""
    from ntk_tutorial.active import run as al

    image = {"mnist-5k": (28, 28, 1), "mnist": (28, 28, 1)}.get(cfg.dataset, (32, 32, 3))
    classes = 100 if cfg.dataset == "cifar100" else 10
    return al.build_model(cfg, math.prod(image), classes, image), image, classes


def kernel_plan(cfg, points: int, model=None):
    """:func:`ntk_tutorial.kernels.plan_kernel` of the runner's kernel on ``points`` examples of
    the preset's network (``model``: :func:`_model` of ``cfg``, built here if not given), with the
    Jacobian budget in force now and a scratch disk with room for the stream route's file (its
    size is reported: without it the kernel takes the recompute route); sizes only, nothing is
    computed."""
    import jax
    import jax.numpy as jnp

    from ntk_tutorial import kernels
    from ntk_tutorial.active import strategies

    (apply_fn, params, state), image, _ = model or _model(cfg)
    x = jax.ShapeDtypeStruct((points, *image), jnp.float32)
    old = os.environ.get(kernels.SCRATCH_BYTES_ENV)
    os.environ[kernels.SCRATCH_BYTES_ENV] = str(2**62)
    try:
        return kernels.plan_kernel(strategies.KERNEL_KINDS[cfg.kernel], apply_fn, params, x, state=state)
    finally:
        if old is None:
            os.environ.pop(kernels.SCRATCH_BYTES_ENV, None)
        else:
            os.environ[kernels.SCRATCH_BYTES_ENV] = old


def measure(preset: str, n: int, m: int, seed: int, quick: bool) -> dict:
    """One cycle of the real runner at ``(n, m)``, timed on its second run, with the FLOPs of its
    kernel on ``L u S`` from the plan of the route it took."""
    from ntk_tutorial.active import run as al

    base = al.config_from_preset(preset)
    dataset = base.dataset if base.dataset in ("mnist-5k", "digits") else f"synthetic-{base.dataset}"
    cfg = al.config_from_preset(preset, dataset=dataset, init=n, query=min(8, m), subset=m, cycles=1,
                                epochs=1 if quick else EPOCHS, strategy="mlmoc-flips", seed=seed,
                                n_test=N_TEST, n_train=None if dataset == "mnist-5k" else n + m + 8,
                                lr=TIMING_LR)
    rec = None
    # measure on the features route (every gradient once, one product) whatever the default
    # budget: the full-size estimate then applies the rates to the plan of the route it takes
    from ntk_tutorial import kernels

    old = os.environ.get(JACOBIAN_ENV)
    os.environ[JACOBIAN_ENV] = str(max(MEASURE_BUDGET, kernels._jacobian_budget()))
    try:
        for _ in range(2):  # the first run compiles
            with tempfile.TemporaryDirectory() as out:
                rec = al.run_experiment(cfg, out)[0]
        plan = kernel_plan(cfg, n + m)
    finally:
        if old is None:
            os.environ.pop(JACOBIAN_ENV, None)
        else:
            os.environ[JACOBIAN_ENV] = old
    t = rec["timings"]
    return {"n": n, "m": m, "epochs": cfg.epochs, "n_test": N_TEST, **t,
            "scoring_s": t["query_s"] - t["kernel_s"], "route": plan.route,
            "gradient_flops": plan.gradient_flops, "gram_flops": plan.gram_flops,
            "gradient_evaluations": plan.gradient_evaluations}


def estimate(preset: str, rows: list[dict], gemm: float) -> dict:
    """Extrapolate one seed of the preset from the measured rows (see the module docstring)."""
    import jax

    from ntk_tutorial.active import run as al

    cfg = al.config_from_preset(preset)
    model = _model(cfg)  # built once: every cycle's plan is of the same network
    (_, params, _), _, classes = model
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    big = rows[-1]
    per_example_epoch = big["train_s"] / (big["epochs"] * big["n"])
    per_test = big["evaluate_s"] / big["n_test"]
    # the kernel's time = its gradient FLOPs at the measured gradient rate + its Gram FLOPs at
    # the measured matmul rate; the gradient rate is what the largest measured run leaves over
    gradient_s = big["kernel_s"] - big["gram_flops"] / gemm
    if gradient_s > 0 and big["gradient_flops"] and math.isfinite(big["gradient_flops"]):
        gradient_rate, rate_from = big["gradient_flops"] / gradient_s, "measured"
    else:  # the products took all of it (tiny sizes): the package's default efficiency
        from ntk_tutorial import kernels

        gradient_rate, rate_from = kernels.GRADIENT_EFFICIENCY * gemm, "assumed"
    # scoring: the look-ahead algebra's FLOPs at the matmul rate plus what the measured runs leave
    # over (network passes over the candidates, bookkeeping), fitted as c + b m through the two sizes
    rest = [r["scoring_s"] - scoring_flops(r["n"], r["m"], classes) / gemm for r in rows]
    per_candidate = (rest[-1] - rest[0]) / (big["m"] - rows[0]["m"]) if len(rows) > 1 and big["m"] > rows[0]["m"] else 0.0
    per_candidate = max(per_candidate, 0.0)
    scoring_fixed = max(rest[-1] - per_candidate * big["m"], 0.0)
    total = {"train_s": 0.0, "evaluate_s": 0.0, "kernel_s": 0.0, "scoring_s": 0.0}
    evaluations = points = scratch = 0
    gram = rule_gram = 0.0  # the products' FLOPs as computed, and with the per-layer FLOP rule
    structured_layers = layers = 0
    routes = set()
    for c in range(cfg.cycles):
        n = cfg.init + c * cfg.query
        plan = kernel_plan(cfg, n + cfg.subset, model)  # the budget of a real run on this machine
        routes.add(f"{plan.route} (blocks of {plan.batch_size})" if plan.route == "stream" else plan.route)
        evaluations += plan.gradient_evaluations
        points += plan.points
        scratch = max(scratch, plan.scratch_bytes)
        total["train_s"] += cfg.epochs * n * per_example_epoch
        total["evaluate_s"] += FULL_TEST[preset] * per_test
        seconds = plan.seconds(gemm, gradient_rate)
        if seconds is None or not math.isfinite(seconds):  # no FLOP count on this backend: per gradient
            seconds = max(gradient_s, 0.0) / (big["n"] + big["m"]) * plan.gradient_evaluations + plan.gram_flops / gemm
        total["kernel_s"] += seconds
        gram += plan.gram_flops or 0.0
        rule_gram += plan.rule_gram_flops if plan.rule_gram_flops is not None else plan.gram_flops or 0.0
        structured_layers, layers = plan.structured_layers, plan.layers
        total["scoring_s"] += scoring_fixed + per_candidate * cfg.subset + scoring_flops(n, cfg.subset, classes) / gemm
    return {"parameters": n_params, "per_example_epoch_s": per_example_epoch, "per_test_s": per_test,
            "gemm_flops_per_s": gemm, "gradient_flops_per_s": gradient_rate, "gradient_rate": rate_from,
            "kernel_route": sorted(routes), "gradient_evaluations_per_point": evaluations / max(points, 1),
            "largest_scratch_bytes": scratch, "cycles": cfg.cycles,
            # what the per-layer FLOP rule would save if structured forms were implemented (the
            # products' seconds at the matmul rate; every layer is computed in gradient form)
            "gram_s": gram / gemm, "rule_gram_s": rule_gram / gemm,
            "rule_structured_layers": structured_layers, "rule_layers": layers,
            **{k: float(v) for k, v in total.items()},
            "one_seed_s": float(sum(total.values())), "extrapolated": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=None, choices=PRESETS)
    parser.add_argument("--quick", action="store_true", help="cpu-mnist-5k at two tiny sizes (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=1, help="NumPy BLAS threads (0: library default)")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="N:M",
                        help="reduced sizes to measure, labelled:candidates (default 32:64 64:128; "
                             "on a GPU larger ones, e.g. 256:512 512:1024, extrapolate better)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="extrapolate again from the measurements recorded in a presets JSON "
                             "(rates and rows as measured there; nothing is rerun)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    presets = args.presets or (["cpu-mnist-5k"] if args.quick else list(PRESETS))

    import jax

    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    from ntk_tutorial import kernels

    results, failures = {}, []
    if args.from_json:
        import json

        recorded = json.loads(open(args.from_json).read())["results"]
        for preset in args.presets or list(recorded):
            rows = recorded[preset]["measured"]
            gemm = recorded[preset]["estimate"]["gemm_flops_per_s"]
            results[preset] = {"measured": rows, "estimate": estimate(preset, rows, gemm), "wall_s": 0.0,
                               "from": args.from_json}
        presets = []
    else:
        gemm = kernels.matmul_rate()
    for preset in presets:
        sizes = QUICK_SIZES if args.quick else SIZES.get(preset, DEFAULT_SIZES)
        if args.sizes:
            sizes = [tuple(int(v) for v in size.split(":")) for size in args.sizes]
        try:
            start = time.perf_counter()
            rows = [measure(preset, n, m, args.seed, args.quick) for n, m in sizes]
            est = estimate(preset, rows, gemm)
            results[preset] = {"measured": rows, "estimate": est, "wall_s": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001 - a measurement: report, go on, fail at the end
            failures.append(f"{preset}: {type(err).__name__}: {err}")
            print(f"{preset}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        for r in rows:
            print(f"{preset:13s} n={r['n']:4d} m={r['m']:4d}: train {r['train_s']:.2f} s ({r['epochs']} epochs), "
                  f"kernel {r['kernel_s']:.2f} s, scoring {r['scoring_s']:.2f} s, evaluate {r['evaluate_s']:.2f} s",
                  flush=True)
        e = results[preset]["estimate"]
        print(f"{preset:13s} gradients at {e['gradient_flops_per_s'] / 1e9:.1f} GFLOP/s ({e['gradient_rate']}), "
              f"products at {gemm / 1e9:.1f} GFLOP/s (float32 matmul, measured)", flush=True)

    print(f"\n{os.cpu_count()} CPU cores, {jax.devices()[0].platform}; one seed of each preset's protocol, "
          "EXTRAPOLATED from the two reduced runs above" + (" (quick: tiny sizes, not a claim)" if args.quick else ""))
    head = (f"{'preset':13s} {'params':>9s} {'train h':>8s} {'kernel h':>9s} {'scoring h':>9s} {'total h':>8s} "
            f"{'grad/pt':>7s}  kernel route (at full size)")
    print(head)
    print("-" * len(head))
    for preset, res in results.items():
        e = res["estimate"]
        print(f"{preset:13s} {e['parameters'] / 1e6:8.2f}M {e['train_s'] / 3600:8.2f} {e['kernel_s'] / 3600:9.2f} "
              f"{e['scoring_s'] / 3600:9.2f} {e['one_seed_s'] / 3600:8.2f} {e['gradient_evaluations_per_point']:7.2f}  "
              f"{'; '.join(e['kernel_route'])}"
              + (f", scratch up to {e['largest_scratch_bytes'] / 2**30:.0f} GiB" if e["largest_scratch_bytes"] else ""))
        if e.get("rule_layers"):
            print(f"{'':13s} products {e['gram_s'] / 3600:.2f} h of the kernel; with the per-layer FLOP rule "
                  f"{e['rule_gram_s'] / 3600:.2f} h ({e['rule_structured_layers']} of {e['rule_layers']} layers "
                  "cheaper in structured form; not implemented)")
        if not args.quick and e["gradient_evaluations_per_point"] > 1.1:
            failures.append(f"{preset}: {e['gradient_evaluations_per_point']:.2f} gradient evaluations per point "
                            "(each should be computed once)")
    write_json(args.output or RESULTS / ("presets-quick.json" if args.quick else "presets.json"),
               {"benchmark": "presets", "quick": args.quick, "results": results})
    finish(failures, quick=args.quick)


if __name__ == "__main__":
    main()
