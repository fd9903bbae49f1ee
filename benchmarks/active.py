"""Speed of active-learning query rounds (a measurement, not a test): ``python benchmarks/active.py``.

The paper's MNIST round (Mohamadi, Bae & Sutherland 2022, Sec. 5): a network trained on 100
labels, a random subset of ``--subset`` (default 4000) unlabelled candidates, 20 queries.  On
mnist-5k (4 000 training digits) the subset is the whole unlabelled pool (3 900 points).  Network
``MLP(784 -> 512 -> 512 -> 10)`` as notebook 04 (pixels in [0, 1], full-batch GD on the square
loss, lr 5, 100 epochs), one seed.

For each strategy of ``ntk_tutorial.active.STRATEGIES`` it times one query round — building the
:class:`Context` (network outputs on L and S) and ``select`` — after one warm-up round (which
compiles), best of ``--repeat``.  It also times the network's training in the same round (the
100 epochs on the 100 labels, after a compiling warm-up) and prints every round as a ratio of
it; the headline number is MLMOC's ratio.  BALD is timed on the same architecture trained with
dropout 0.2 (MC dropout needs it).  ``--strategies`` restricts the list (the eNTK is not
included: at 4 000 candidates its posterior covariance alone is 40 000 x 40 000 float64).

``--preset-all`` also runs the whole CPU preset with run_experiment — every strategy x 6 seeds x
``--cycles`` cycles of ``cpu-mnist-5k`` (with notebook 04's lr/normalisation) — into a temporary
folder (or ``--preset-out DIR``, kept: ``results/al/mnist-5k-paper`` is the folder notebook 04
reads) and reports its wall time (long: tens of minutes to hours on a laptop CPU).

NumPy's BLAS runs single-threaded (``--blas-threads``), as in notebooks 03-04.  Prints, never
asserts.  Writes JSON to ``benchmarks/results/active.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

NETWORK = dict(dataset="mnist-5k", hidden=(512, 512), lr=5.0, epochs=100, normalize="none",
               init=100, query=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--preset-all", action="store_true",
                        help="also run every strategy x 6 seeds of the cpu-mnist-5k preset")
    parser.add_argument("--cycles", type=int, default=10, help="cycles of --preset-all")
    parser.add_argument("--preset-out", default=None,
                        help="keep --preset-all's results in this folder (e.g. results/al/mnist-5k-paper, "
                             "which notebook 04 reads) instead of a temporary one; resumes what is there")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "active.json"))
    args = parser.parse_args()

    import jax
    import numpy as np
    from threadpoolctl import threadpool_limits

    from ntk_tutorial.active import run as al
    from ntk_tutorial.active import strategies as st
    from ntk_tutorial.plotting import versions

    threadpool_limits(args.blas_threads, user_api="blas")
    names = args.strategies or list(st.STRATEGIES)
    cfg = al.config_from_preset(None, **NETWORK, subset=args.subset, seed=args.seed)
    ds = al.load_data(cfg)
    rng = np.random.default_rng([args.seed, 0xA1])
    lab = rng.choice(len(ds.x_train), cfg.init, replace=False)
    unl = np.setdiff1d(np.arange(len(ds.x_train)), lab)
    cand = np.sort(rng.choice(unl, min(cfg.subset, len(unl)), replace=False))
    in_dim = int(np.prod(ds.x_train.shape[1:]))
    print(f"{ds}; |L| = {len(lab)}, |S| = {len(cand)}, query {cfg.query}, MLP {cfg.hidden}, "
          f"devices {jax.devices()}")

    def trained(dropout: float):
        c = al.config_from_preset(None, **NETWORK, subset=args.subset, seed=args.seed, dropout=dropout)
        apply_fn, params0 = al.build_model(c, in_dim, ds.num_classes)
        times, params = [], None
        for _ in range(1 + args.repeat):  # first run compiles
            start = time.perf_counter()
            params = al._train(apply_fn, params0, ds.x_train[lab], ds.y_train[lab], c,
                               jax.random.key(args.seed))
            jax.block_until_ready(params)
            times.append(time.perf_counter() - start)
        return apply_fn, params, min(times[1:])

    nets = {0.0: trained(0.0)}
    if "bald" in names:
        nets[0.2] = trained(0.2)
    for d, (_, _, t) in nets.items():
        print(f"training (dropout {d}): {t:.2f} s for {cfg.epochs} epochs on {len(lab)} labels")

    def one_round(name: str, i: int) -> float:
        apply_fn, params, _ = nets[0.2 if name == "bald" else 0.0]
        start = time.perf_counter()
        ctx = st.Context(apply_fn, params, ds.x_train[lab], ds.y_train[lab], ds.x_train[cand],
                         ds.num_classes)
        st.select(name, ctx, cfg.query, jax.random.key(i))
        return time.perf_counter() - start

    rounds = {}
    for name in names:
        try:
            one_round(name, 0)  # warm-up (compiles)
            best = min(one_round(name, i + 1) for i in range(args.repeat))
        except Exception as err:  # noqa: BLE001 - a measurement: report and go on
            print(f"{name:12s} failed: {err}")
            rounds[name] = {"error": str(err)}
            continue
        train_s = nets[0.2 if name == "bald" else 0.0][2]
        rounds[name] = {"query_s": best, "train_s": train_s, "ratio_to_training": best / train_s}
        print(f"{name:12s} query round {best:8.3f} s   = {best / train_s:7.2f} x training", flush=True)
    if "mlmoc" in rounds and "query_s" in rounds["mlmoc"]:
        print(f"MLMOC round / training time in the same round: {rounds['mlmoc']['ratio_to_training']:.2f}")

    result = {"setting": {**NETWORK, "hidden": list(NETWORK["hidden"]), "subset": int(len(cand)),
                          "seed": args.seed, "repeat": args.repeat, "blas_threads": args.blas_threads},
              "rounds": rounds, "machine": platform.platform(), "processor": platform.processor(),
              "devices": [str(d) for d in jax.devices()], "versions": versions()}

    if args.preset_all:
        out = Path(args.preset_out) if args.preset_out else Path(tempfile.mkdtemp(prefix="al-preset-"))
        start = time.perf_counter()
        per = {}
        try:
            for name in st.STRATEGIES:
                t0 = time.perf_counter()
                for seed in range(6):
                    c = al.config_from_preset("cpu-mnist-5k", strategy=name, seed=seed, cycles=args.cycles,
                                              lr=NETWORK["lr"], normalize=NETWORK["normalize"],
                                              dropout=0.2 if name == "bald" else None)
                    al.run_experiment(c, out)
                per[name] = time.perf_counter() - t0
                print(f"preset {name:12s} 6 seeds x {args.cycles} cycles: {per[name]:.0f} s", flush=True)
        finally:
            if not args.preset_out:
                shutil.rmtree(out, ignore_errors=True)
        result["preset_all"] = {"preset": "cpu-mnist-5k", "cycles": args.cycles, "seeds": 6,
                                "per_strategy_s": per, "total_s": time.perf_counter() - start}
        print(f"whole preset: {result['preset_all']['total_s']:.0f} s")

    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
