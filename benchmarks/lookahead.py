"""Speed of look-ahead scoring (a measurement, not a test): ``python benchmarks/lookahead.py``.

Scores a pool of m = 4000 candidates with n = 100 and n = 300 labelled points, the paper's
MNIST setting (Mohamadi, Bae & Sutherland 2022: pools of 4000, 100 initial labels), for
``MLP(784 -> 512 -> 512 -> 10)`` on the 5 000 real MNIST digits of mnist-5k (float32 network and
kernel, float64 algebra).  The network is first trained on the labelled points by SGD.
For each n it measures (after compilation, best of ``--repeat``):

* ``kernel``: the pNTK on L u U (``kernels.pntk``, the dense route), which scoring needs;
* ``vectorised``: ``fit_proxy`` + ``posterior_change(..., reduce="l2")``, the MLMOC score of
  every one of the m candidates (pseudo-labels), Eq. (12) in its posterior-covariance form;
* ``block loop``: ``schur_update`` per candidate on the whole pool (Eq. 12 one candidate at a
  time), timed on ``--loop-candidates`` candidates and reported per candidate;
* ``SGD``: 15 epochs of SGD (batch 32) on L u {x'} from the trained parameters, per candidate,
  one jitted run per candidate (the paper's naive look-ahead), timed on ``--sgd-candidates``.

Targets (as ratios; ``>= 1`` means met): vectorised time <= 0.5 x kernel time, and the proxy's
time per candidate (kernel + vectorised, divided by m) >= 1000 x faster than SGD retraining.
Also printed: the block-update loop per candidate against the vectorised form per candidate.
NumPy's BLAS runs single-threaded by default (``--blas-threads``): JAX's and OpenBLAS's thread
pools otherwise compete for the cores (see notebook 03, "Threads").  Writes JSON to
``benchmarks/results/lookahead.json``.
"""

from __future__ import annotations

import argparse
import os
import time

from common import RESULTS, finish, write_json

WIDTHS = (784, 512, 512, 10)
POOL = 4000
LABELLED = (100, 300)
SGD_LR, BATCH, EPOCHS_L, RETRAIN_EPOCHS = 0.02, 32, 50, 15
TARGET_VECTORISED_OVER_KERNEL = 0.5
TARGET_SPEEDUP_OVER_SGD = 1000.0


def best_of(fn, repeat: int) -> tuple[float, object]:
    import jax

    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pool", type=int, default=POOL)
    parser.add_argument("--labelled", type=int, nargs="+", default=list(LABELLED))
    parser.add_argument("--loop-candidates", type=int, default=200)
    parser.add_argument("--sgd-candidates", type=int, default=5)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="threads for NumPy's BLAS (0: leave the library default)")
    parser.add_argument("--quick", action="store_true",
                        help="pool 300, 50 labels, one repeat: a smoke check (under a minute)")
    parser.add_argument("--output", "--out", dest="out", default=None,
                        help="JSON path (default benchmarks/results/lookahead[-quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.pool, args.labelled, args.loop_candidates, args.sgd_candidates = 1, 300, [50], 20, 2
    out_path = args.out or str(RESULTS / ("lookahead-quick.json" if args.quick else "lookahead.json"))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ntk_tutorial import data, kernels, lookahead, models

    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")

    ds = data.load("mnist-5k", seed=0, normalize="unit-norm")
    x_all = jnp.concatenate([jnp.asarray(ds.x_train), jnp.asarray(ds.x_test)])
    y_all = np.concatenate([ds.y_train, ds.y_test])
    model = models.MLP(WIDTHS, parameterization="standard", w_std=1.0,
                       rngs=nnx.Rngs(params=jax.random.key(0)))
    apply_fn, params0 = models.functional(model)

    def mse(p, x, y):
        return 0.5 * jnp.mean(jnp.sum((apply_fn(p, x) - y) ** 2, axis=-1))

    def sgd(params, x, y, key, epochs):
        n = x.shape[0]
        steps = -(-n // BATCH)
        grad = jax.grad(mse)

        def epoch(p, epoch_key):
            order = jax.random.permutation(epoch_key, n)
            batches = jnp.concatenate([order, order[: steps * BATCH - n]]).reshape(steps, BATCH)

            def step(p, idx):
                return jax.tree.map(lambda a, g: a - SGD_LR * g, p, grad(p, x[idx], y[idx])), None

            return jax.lax.scan(step, p, batches)[0], None

        return jax.lax.scan(epoch, params, jax.random.split(key, epochs))[0]

    sgd_jit = jax.jit(sgd, static_argnums=4)
    rows = []
    for n in args.labelled:
        m = args.pool
        if n + m > x_all.shape[0]:
            raise SystemExit(f"n + m = {n + m} exceeds the {x_all.shape[0]} digits of mnist-5k")
        x_L, x_U = x_all[:n], x_all[n:n + m]
        y_L = jnp.asarray(data.one_hot(y_all[:n], 10))
        params = sgd_jit(params0, x_L, y_L, jax.random.key(1), EPOCHS_L)
        z = jnp.concatenate([x_L, x_U])

        kernels.pntk(apply_fn, params, z).block_until_ready()  # compile
        kernel_s, theta = best_of(lambda: kernels.pntk(apply_fn, params, z), args.repeat)
        theta = np.asarray(theta, np.float64)
        f_L = np.asarray(apply_fn(params, x_L), np.float64)
        f_U = np.asarray(apply_fn(params, x_U), np.float64)
        y_np = np.asarray(y_L, np.float64)
        pseudo = lookahead.pseudo_labels(f_U)
        t_LL, t_UL, t_UU = theta[:n, :n], theta[n:, :n], theta[n:, n:]

        def vectorised():
            proxy = lookahead.fit_proxy(t_LL, y_np, f_L)
            return lookahead.posterior_change(proxy, t_UL, t_UU, f_U, pseudo, reduce="l2")

        vector_s, scores = best_of(vectorised, args.repeat)

        proxy = lookahead.fit_proxy(t_LL, y_np, f_L)
        f_lin = proxy.predict(t_UL, f_U)
        n_loop = min(args.loop_candidates, m)
        start = time.perf_counter()
        loop_scores = []
        for c in range(n_loop):
            f_plus = lookahead.schur_update(proxy, t_UL[c], t_UU[c, c], pseudo[c], t_UL, t_UU[:, c],
                                            f_cand=f_U[c], f_test=f_U)
            loop_scores.append(np.linalg.norm(f_plus - f_lin, axis=1).sum())
        loop_per_candidate = (time.perf_counter() - start) / n_loop
        agree = float(np.max(np.abs(np.array(loop_scores) - scores[:n_loop]) / np.abs(scores[:n_loop])))

        def retrain(c, key):
            x_plus = jnp.concatenate([x_L, x_U[c:c + 1]])
            y_plus = jnp.concatenate([y_L, jnp.asarray(pseudo[c:c + 1], jnp.float32)])
            return sgd_jit(params, x_plus, y_plus, key, RETRAIN_EPOCHS)

        jax.block_until_ready(retrain(0, jax.random.key(2)))  # compile
        start = time.perf_counter()
        for c in range(args.sgd_candidates):
            jax.block_until_ready(retrain(c, jax.random.key(3 + c)))
        sgd_per_candidate = (time.perf_counter() - start) / args.sgd_candidates

        proxy_per_candidate = (kernel_s + vector_s) / m
        row = {
            "n_labelled": n, "pool": m,
            "kernel_seconds": kernel_s,
            "vectorised_seconds": vector_s,
            "vectorised_over_kernel": vector_s / kernel_s,
            "target_vectorised_over_kernel": TARGET_VECTORISED_OVER_KERNEL,
            "proxy_seconds_per_candidate": proxy_per_candidate,
            "sgd_seconds_per_candidate": sgd_per_candidate,
            "speedup_over_sgd": sgd_per_candidate / proxy_per_candidate,
            "target_speedup_over_sgd": TARGET_SPEEDUP_OVER_SGD,
            "block_loop_seconds_per_candidate": loop_per_candidate,
            "block_loop_over_vectorised_per_candidate": loop_per_candidate / (vector_s / m),
            "loop_vs_vectorised_max_relative_difference": agree,
            "jitter": proxy.jitter,
        }
        rows.append(row)
        print(f"  n={n}: kernel {kernel_s:.3f} s, vectorised {vector_s:.3f} s, "
              f"SGD {sgd_per_candidate:.3f} s/candidate, loop {loop_per_candidate * 1e3:.2f} ms/candidate",
              flush=True)

    print(f"\nMLP{WIDTHS}, pNTK, pool m = {args.pool}, {os.cpu_count()} CPU cores, "
          f"{jax.devices()[0].platform}, BLAS threads {args.blas_threads or 'default'}\n")
    head = (f"{'n':>4} {'kernel s':>9} {'vector s':>9} {'vec/kernel':>10} {'target/meas':>11} "
            f"{'SGD s/cand':>10} {'proxy ms/cand':>13} {'speedup':>8} {'target/meas':>11} "
            f"{'loop/vec':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['n_labelled']:>4} {r['kernel_seconds']:9.3f} {r['vectorised_seconds']:9.3f} "
              f"{r['vectorised_over_kernel']:10.2f} "
              f"{TARGET_VECTORISED_OVER_KERNEL / r['vectorised_over_kernel']:11.2f} "
              f"{r['sgd_seconds_per_candidate']:10.3f} {r['proxy_seconds_per_candidate'] * 1e3:13.3f} "
              f"{r['speedup_over_sgd']:8.0f} {r['speedup_over_sgd'] / TARGET_SPEEDUP_OVER_SGD:11.2f} "
              f"{r['block_loop_over_vectorised_per_candidate']:8.0f}")
    print("\ntarget/meas >= 1 means the target is met: vectorised <= "
          f"{TARGET_VECTORISED_OVER_KERNEL} x kernel, proxy >= {TARGET_SPEEDUP_OVER_SGD:.0f} x faster "
          "than 15-epoch SGD per candidate. loop/vec: block-update loop per candidate over the "
          "vectorised form per candidate.")
    write_json(out_path, {
        "benchmark": "lookahead", "quick": args.quick, "widths": WIDTHS, "kernel": "pntk", "rows": rows,
        "settings": {"sgd_lr": SGD_LR, "batch": BATCH, "epochs_on_L": EPOCHS_L,
                     "retrain_epochs": RETRAIN_EPOCHS, "repeat": args.repeat,
                     "loop_candidates": args.loop_candidates, "sgd_candidates": args.sgd_candidates,
                     "blas_threads": args.blas_threads},
    })
    failures = [f"n={r['n_labelled']}: the loop and the vectorised scores differ by "
                f"{r['loop_vs_vectorised_max_relative_difference']:.1e}" for r in rows
                if not r["loop_vs_vectorised_max_relative_difference"] < 1e-6]
    if not args.quick:
        failures += [f"n={r['n_labelled']}: vectorised/kernel {r['vectorised_over_kernel']:.2f} > "
                     f"{TARGET_VECTORISED_OVER_KERNEL}" for r in rows
                     if r["vectorised_over_kernel"] > TARGET_VECTORISED_OVER_KERNEL]
        failures += [f"n={r['n_labelled']}: speed-up over SGD {r['speedup_over_sgd']:.0f}x < "
                     f"{TARGET_SPEEDUP_OVER_SGD:.0f}x" for r in rows
                     if r["speedup_over_sgd"] < TARGET_SPEEDUP_OVER_SGD]
    finish(failures, quick=args.quick)


if __name__ == "__main__":
    main()
