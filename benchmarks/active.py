"""Speed of active-learning query rounds (a measurement, not a test): ``python benchmarks/active.py``.

The paper's MNIST round (Mohamadi, Bae & Sutherland 2022, Sec. 5) in the fast offline demo
(preset ``demo-mnist-5k``: ``MLP(784 -> 512 -> 512 -> 10)``, full-batch GD on the square loss):
a network trained on 100 labels, a random subset of ``--subset`` (default 4000) unlabelled
candidates, 20 queries.  On mnist-5k (4 000 training digits) the subset is the whole unlabelled
pool (3 900 points).  Everything goes through the runner's own functions
(:func:`ntk_tutorial.active.run.build_model`, ``_train``, ``strategies.select`` and
``_sequential_query``), so the numbers are those of ``ntk-tutorial al``.

For each strategy it times one query round (building the :class:`Context` and ``select``) after
one warm-up round (which compiles), best of ``--repeat``, as a ratio of the network's training
time in the same round.  BALD is timed on the same architecture trained with dropout 0.2.

It also times one *sequential* cycle of the released objective (``mlmoc-flips``: 20 picks, each
rescoring every candidate through the conditioned proxy, true labels) against one batch round of
the same strategy.  Target: sequential cycle <= ``TARGET_SEQUENTIAL_OVER_BATCH`` x batch round.

``--quick``: subset 300, one repeat, four strategies (under a minute); targets are not checked.
Exits non-zero when a round fails (and, in a full run, when the sequential target is missed).
NumPy's BLAS runs single-threaded (``--blas-threads``), as in notebooks 03-04.  Writes JSON to
``benchmarks/results/active[-quick].json``.
"""

from __future__ import annotations

import argparse
import time

from common import RESULTS, finish, write_json

PRESET = "demo-mnist-5k"
TARGET_SEQUENTIAL_OVER_BATCH = 5.0
QUICK_STRATEGIES = ["random", "entropy", "mlmoc", "mlmoc-flips"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="subset 300, one repeat, four strategies")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/active[-quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.repeat = 300, 1
        args.strategies = args.strategies or QUICK_STRATEGIES

    import jax
    import numpy as np
    from threadpoolctl import threadpool_limits

    from ntk_tutorial.active import run as al
    from ntk_tutorial.active import strategies as st

    threadpool_limits(args.blas_threads, user_api="blas")
    names = args.strategies or list(st.STRATEGIES)
    cfg = al.config_from_preset(PRESET, subset=args.subset, seed=args.seed)
    ds = al.load_data(cfg)
    rng = np.random.default_rng([args.seed, 0xA1])
    lab = rng.choice(len(ds.x_train), cfg.init, replace=False)
    unl = np.setdiff1d(np.arange(len(ds.x_train)), lab)
    cand = np.sort(rng.choice(unl, min(cfg.subset, len(unl)), replace=False))
    in_dim = int(np.prod(ds.x_train.shape[1:]))
    print(f"{ds}; |L| = {len(lab)}, |S| = {len(cand)}, query {cfg.query}, MLP {cfg.hidden}, "
          f"devices {jax.devices()}")

    def trained(dropout: float):
        c = al.config_from_preset(PRESET, subset=args.subset, seed=args.seed, dropout=dropout)
        apply_fn, params0, state0 = al.build_model(c, in_dim, ds.num_classes)
        times, net = [], None
        for _ in range(1 + args.repeat):  # first run compiles
            start = time.perf_counter()
            net = al._train(apply_fn, params0, state0, ds.x_train[lab], ds.y_train[lab], c,
                            jax.random.key(args.seed))
            jax.block_until_ready(net[0])
            times.append(time.perf_counter() - start)
        return apply_fn, net[0], net[1], min(times[1:])

    nets = {0.0: trained(0.0)}
    if "bald" in names:
        nets[0.2] = trained(0.2)
    for d, (_, _, _, t) in nets.items():
        print(f"training (dropout {d}): {t:.2f} s for {cfg.epochs} epochs on {len(lab)} labels")

    def one_round(name: str, i: int) -> float:
        apply_fn, params, state, _ = nets[0.2 if name == "bald" else 0.0]
        c = al.config_from_preset(PRESET, subset=args.subset, seed=args.seed, strategy=name,
                                  dropout=0.2 if name == "bald" else None)
        start = time.perf_counter()
        ctx = st.Context(apply_fn, params, ds.x_train[lab], ds.y_train[lab], ds.x_train[cand], ds.num_classes,
                         kernel=c.kernel, relative_to=c.relative_to, proxy=c.proxy,
                         probabilities=c.probabilities, lr=c.lr, state=state)
        st.select(name, ctx, cfg.query, jax.random.key(i))
        return time.perf_counter() - start

    rounds, failures = {}, []
    for name in names:
        try:
            one_round(name, 0)  # warm-up (compiles)
            best = min(one_round(name, i + 1) for i in range(args.repeat))
        except Exception as err:  # noqa: BLE001 - a measurement: report, go on, fail at the end
            print(f"{name:12s} failed: {type(err).__name__}: {err}")
            rounds[name] = {"error": f"{type(err).__name__}: {err}"}
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        train_s = nets[0.2 if name == "bald" else 0.0][3]
        rounds[name] = {"query_s": best, "train_s": train_s, "ratio_to_training": best / train_s}
        print(f"{name:12s} query round {best:8.3f} s   = {best / train_s:7.2f} x training", flush=True)

    # one sequential cycle of the released objective against its batch round
    sequential = None
    apply_fn, params, state, _ = nets[0.0]
    seq_cfg = al.config_from_preset(PRESET, subset=args.subset, seed=args.seed, strategy="mlmoc-flips",
                                    mode="sequential")
    try:
        times = []
        for i in range(1 + args.repeat):
            start = time.perf_counter()
            al._sequential_query(apply_fn, params, state, seq_cfg, ds, lab, cand, jax.random.key(i))
            times.append(time.perf_counter() - start)
        batch_s = rounds.get("mlmoc-flips", {}).get("query_s")
        if batch_s is None:
            one_round("mlmoc-flips", 0)
            batch_s = min(one_round("mlmoc-flips", i + 1) for i in range(args.repeat))
        seq_s = min(times[1:])
        sequential = {"sequential_cycle_s": seq_s, "batch_round_s": batch_s, "ratio": seq_s / batch_s,
                      "target_ratio": TARGET_SEQUENTIAL_OVER_BATCH, "picks": cfg.query}
        print(f"sequential cycle ({cfg.query} picks, mlmoc-flips) {seq_s:.3f} s = {seq_s / batch_s:.2f} x its "
              f"batch round ({batch_s:.3f} s; target <= {TARGET_SEQUENTIAL_OVER_BATCH:g}x: ratio "
              f"{TARGET_SEQUENTIAL_OVER_BATCH / (seq_s / batch_s):.2f})")
        if not args.quick and seq_s / batch_s > TARGET_SEQUENTIAL_OVER_BATCH:
            failures.append(f"sequential cycle {seq_s / batch_s:.1f}x the batch round > {TARGET_SEQUENTIAL_OVER_BATCH:g}x")
    except Exception as err:  # noqa: BLE001
        failures.append(f"sequential cycle: {type(err).__name__}: {err}")
    if "mlmoc" in rounds and "query_s" in rounds["mlmoc"]:
        print(f"MLMOC round / training time in the same round: {rounds['mlmoc']['ratio_to_training']:.2f}")

    write_json(args.output or RESULTS / ("active-quick.json" if args.quick else "active.json"), {
        "benchmark": "active", "quick": args.quick, "preset": PRESET,
        "setting": {"subset": int(len(cand)), "seed": args.seed, "repeat": args.repeat,
                    "blas_threads": args.blas_threads, "config": cfg.to_dict()},
        "rounds": rounds, "sequential": sequential})
    finish(failures, quick=args.quick)


if __name__ == "__main__":
    main()
