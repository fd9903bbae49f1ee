"""What the paper-scale active-learning presets cost (a measurement, not a test): ``python benchmarks/presets.py``.

For the presets ``mnist``, ``svhn``, ``cifar10`` and ``cifar100`` of
``ntk_tutorial.active.run.PRESETS`` it estimates the wall time of one active-learning run (one
seed of MLMOC with the pNTK, the paper's method: ``config.cycles`` = 10 cycles; cycle ``c`` has
``n_c = init + c * query`` labels) and of the whole grid (every strategy x 6 seeds).  Nothing is
downloaded and nothing is run at full size: every part is **measured at reduced size and
extrapolated**, on random data of the right shape (784-pixel vectors for MNIST, 3072-long flat
32x32x3 images for the others; the models reshape them), with each preset's network built by
``run.build_model`` (float32).  Per cycle:

1. **training**: one optimiser step (``train.train`` with the preset's lr, momentum, weight
   decay and batch; timed through its ``callback`` after a compiling warm-up step, median of
   ``--repeat`` steps) times the cycle's steps, ``epochs * ceil(n_c / batch)`` (every step
   counted as a full batch).  The MLP preset trains by full-batch GD, one step per epoch whose
   time grows with ``n_c``: measured at the first and last cycle's ``n_c``, interpolated linearly;
2. **evaluation**: forward passes (``models.eval_fn``) on one batch, scaled linearly to the test
   set (10 000 images; SVHN 26 032) plus the network's logits on ``L u S`` that every strategy
   computes (``n_c + subset`` points).  The batch grows from 64 until a pass takes about
   ``--eval-target-s`` (at most 4096, ``train.predict``'s chunk);
3. **kernel**: ``kernels.pntk`` on ``L u S`` (``N_c = n_c + subset`` points) with the block size
   the package's own rule (``kernels._auto_batch_size``, which reads the device-aware Jacobian
   budget) picks at the largest ``N_c`` on this device.  Measured at ``N = j B`` for ``j`` in
   ``--blocks`` (1 2 3), where the number of blocks computed, ``j (j + 1) / 2``, makes the time
   exactly ``t(N) = a N + b N^2`` for ideal blocks; ``a, b >= 0`` fitted by non-negative least
   squares and extrapolated to each ``N_c``.  When the block is the whole set (the dense MLP
   route always; a large accelerator budget) it is measured at 1/8, 1/4, 1/2 of the largest
   ``N_c`` instead;
4. **look-ahead**: NumPy float64 ``lookahead.fit_proxy`` on ``n`` labels plus
   ``lookahead.posterior_change(..., reduce="l2")`` over ``m`` candidates (MLMOC's scores) on a
   random SPD kernel, at ``--lookahead-sizes`` (default ``n:m`` = 500:1000 and 1000:2000).  Flop
   model ``F(n, m) = n^3/3 + n^2 m + m^2 n`` (Cholesky; ``W = L^-1 K(X, S)``; the columns of the
   posterior covariance); seconds per flop fitted through the origin and extrapolated to
   ``n = n_c``, ``m = subset`` (the ``m^2 k`` term is left out of the model);
5. **compilation** (rough): the first-call overheads measured above times the shapes each cycle
   compiles anew (the training step per ``n_c`` and for the last partial batch; the kernel blocks
   ``(B, B)``, ``(B, r)``, ``(r, r)``, all again every cycle for batch-norm models, whose
   ``apply_fn`` changes each cycle; two evaluation shapes per cycle).

The grid estimate: every strategy trains and evaluates (``9 x``); the three MLMOC-family
strategies compute the kernel and fit the proxy (``3 x``); MLMOC and MLMOC-flips score once
(``posterior_change``), EMOC once per class (``k`` passes); BALD adds ``mc_samples x subset``
forward passes; all times 6 seeds.  Peak memory: the float64 kernel on ``L u S`` (``N^2 x 8``
bytes) and one block of Jacobians as the block rule counts it (``B x params x 4 x 2`` bytes;
the activations of the batched backward pass come on top).

Runs unchanged on an accelerator (it then measures that device; the block rule then allows much
larger blocks).  ``--quick`` is a smoke check (a couple of minutes on a laptop CPU): fewer steps,
small sizes, and the Jacobian block capped at ``--quick-block`` (16), so its kernel numbers are
not those of the target block.  Other work on the machine makes the numbers noisy: the load
average at start and end is recorded.  NumPy's BLAS runs single-threaded (``--blas-threads``, 0:
the library default), as in the other benchmarks: on a loaded 2-core machine OpenBLAS's default
two threads made ``fit_proxy`` at n = 200..1000 40-300x slower than one thread.  Prints, never
asserts.  Writes JSON to ``benchmarks/results/presets.json`` (``presets-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time

from common import RESULTS, write_json

PRESETS = ("mnist", "svhn", "cifar10", "cifar100")
# preset -> (input length, image shape, classes, test images)
DATA = {
    "mnist": (784, None, 10, 10_000),
    "svhn": (3072, (32, 32, 3), 10, 26_032),
    "cifar10": (3072, (32, 32, 3), 10, 10_000),
    "cifar100": (3072, (32, 32, 3), 100, 10_000),
}
SEEDS = 6  # the paper's seeds per strategy
MAX_EVAL_BATCH = 4096  # train.predict's chunk
LABEL = "measured at reduced size and extrapolated"
FLOP_MODEL = "F(n, m) = n^3/3 + n^2 m + m^2 n"
KERNEL_MODEL = "t(N) = a N + b N^2, a, b >= 0 by non-negative least squares"


def fmt(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def timed(fn):
    import jax

    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def measure_train(apply_fn, params, cfg, n: int, steps: int, d: int, k: int, seed: int) -> dict:
    """Times of ``steps`` optimiser steps of ``train.train`` on ``n`` random examples.

    The first step (compilation + the loop's setup) is reported apart; ``step_s`` is the median
    of the others."""
    import jax
    import numpy as np

    from ntk_tutorial import train

    rng = np.random.default_rng([seed, n])
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    stamps = []

    def callback(step, p):
        jax.block_until_ready(p)
        stamps.append(time.perf_counter())

    stochastic = cfg.batch_size is not None
    start = time.perf_counter()
    train.train(apply_fn, params, x, y, lr=cfg.lr, steps=1 + steps, loss=cfg.loss,
                batch_size=None if cfg.batch_size is None else min(cfg.batch_size, n),
                momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                key=jax.random.key(seed) if stochastic else None, callback=callback)
    per_step = np.diff(stamps).tolist()
    step_s = statistics.median(per_step)
    first = stamps[0] - start
    return {"n": n, "first_step_s": first, "steps_s": per_step, "step_s": step_s,
            "compile_s": max(first - step_s, 0.0)}


def measure_eval(apply_fn, params, d: int, target_s: float, repeat: int, fixed: int | None, seed: int) -> dict:
    """Forward time per example; the batch doubles from 64 until one pass takes ``target_s``."""
    import jax.numpy as jnp
    import numpy as np

    from ntk_tutorial.models import eval_fn

    f = eval_fn(apply_fn)
    rng = np.random.default_rng([seed, 7])
    rows = []

    def at(b):
        x = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
        first = timed(lambda: f(params, x))
        runs = [timed(lambda: f(params, x)) for _ in range(repeat)]
        t = statistics.median(runs)
        rows.append({"batch": b, "first_s": first, "runs_s": runs, "s": t, "per_example_s": t / b,
                     "compile_s": max(first - t, 0.0)})
        return t

    if fixed:
        at(fixed)
    else:
        t = at(64)
        b = 64
        if t < target_s:
            b = 64 * 2 ** math.floor(math.log2(max(target_s / max(t, 1e-9), 1.0)))
            b = int(min(MAX_EVAL_BATCH, b))
        if b > 64:
            at(b)
    best = rows[-1]
    return {"rows": rows, "per_example_s": best["per_example_s"], "batch": best["batch"],
            "compile_s": rows[0]["compile_s"]}


def kernel_block(apply_fn, params, d: int, n_max: int) -> dict:
    """The block the package's rule picks for the pNTK of ``n_max`` points here."""
    import numpy as np

    from ntk_tutorial import kernels

    method = kernels._choose_method(apply_fn, "auto")
    x = np.broadcast_to(np.zeros((1, d), np.float32), (n_max, d))  # shape only, no memory
    block = int(kernels._auto_batch_size(apply_fn, params, x, "pntk", method))
    budget_fn = getattr(kernels, "_jacobian_budget", None)
    budget = int(budget_fn()) if budget_fn else int(kernels._JACOBIAN_BLOCK_BYTES)
    return {"method": method, "block": block, "jacobian_budget_bytes": budget,
            "budget_env": os.environ.get(getattr(kernels, "JACOBIAN_ENV", "NTK_TUTORIAL_JACOBIAN_BYTES"))}


def measure_kernel(apply_fn, params, d: int, block: int, sizes: list[int], seed: int) -> dict:
    """``kernels.pntk`` times at ``sizes`` with ``batch_size=block``.

    A shape not compiled before is run twice (the first run's excess is the compile time);
    multiples of ``block`` reuse the ``(block, block)`` program, so only the first size repeats."""
    import jax.numpy as jnp
    import numpy as np

    from ntk_tutorial import kernels

    rng = np.random.default_rng([seed, 11])
    x_all = jnp.asarray(rng.standard_normal((max(sizes), d)).astype(np.float32))
    rows, compiled = [], set()
    for n in sizes:
        x = x_all[:n]
        bs = min(block, n)
        shapes = _block_shapes(n, bs)
        run = functools.partial(kernels.pntk, apply_fn, params, x, batch_size=bs)
        first = None
        if not shapes <= compiled:
            first = timed(run)
            compiled |= shapes
        t = timed(run)
        rows.append({"n": n, "batch_size": bs, "s": t, "first_s": first,
                     "blocks_computed": _blocks_computed(n, bs)})
        print(f"    pNTK n={n:6d} (block {bs}): {t:8.2f} s" + (f" (first {first:.2f} s)" if first else ""),
              flush=True)
    firsts = [r["first_s"] - r["s"] for r in rows if r["first_s"] is not None]
    return {"rows": rows, "compile_s": max(statistics.median(firsts), 0.0) if firsts else 0.0}


def _blocks_computed(n: int, bs: int) -> int:
    nb = -(-n // bs)
    return nb * (nb + 1) // 2


def _block_shapes(n: int, bs: int) -> set:
    """Distinct (rows, cols) block shapes the symmetric blocked kernel computes."""
    if bs >= n:
        return {(n, n)}
    r = n % bs
    return {(bs, bs)} | ({(bs, r), (r, r)} if r else set())


def fit_kernel(rows: list[dict]) -> dict:
    import numpy as np
    from scipy.optimize import nnls

    n = np.array([r["n"] for r in rows], float)
    t = np.array([r["s"] for r in rows], float)
    design = np.stack([n, n**2], 1)
    scale = np.array([1.0 / n.max(), 1.0 / n.max() ** 2])  # conditioning
    coef, _ = nnls(design * scale, t)
    a, b = (coef * scale).tolist()
    resid = (t - design @ np.array([a, b])).tolist()
    return {"a_s_per_point": a, "b_s_per_pair": b, "residuals_s": resid, "model": KERNEL_MODEL}


def measure_lookahead(sizes: list[tuple[int, int]], k: int, repeat: int, seed: int) -> dict:
    """fit_proxy + posterior_change(reduce='l2') on a random SPD kernel, at each ``(n, m)``."""
    import numpy as np

    from ntk_tutorial import lookahead

    rng = np.random.default_rng([seed, 13, k])
    rows = []
    for n, m in sizes:
        a = rng.standard_normal((n + m, n + m)) / math.sqrt(n + m)
        kern = a @ a.T + 1e-2 * np.eye(n + m)
        y = np.eye(k)[rng.integers(0, k, n)]
        f_l = 0.1 * rng.standard_normal((n, k))
        f_s = 0.1 * rng.standard_normal((m, k))
        pseudo = lookahead.pseudo_labels(f_s)
        k_ll, k_sl, k_ss = kern[:n, :n], kern[n:, :n], kern[n:, n:]
        fits, changes = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            proxy = lookahead.fit_proxy(k_ll, y, f_l)
            mid = time.perf_counter()
            lookahead.posterior_change(proxy, k_sl, k_ss, f_s, pseudo, reduce="l2")
            end = time.perf_counter()
            fits.append(mid - start)
            changes.append(end - mid)
        fit_s, change_s = statistics.median(fits), statistics.median(changes)
        rows.append({"n": n, "m": m, "k": k, "fit_proxy_s": fit_s, "posterior_change_s": change_s,
                     "total_s": fit_s + change_s, "flops": flops(n, m), "jitter": proxy.jitter})
        print(f"    look-ahead n={n} m={m} k={k}: fit_proxy {fit_s:.3f} s, posterior_change "
              f"{change_s:.3f} s ({flops(n, m) / (fit_s + change_s) / 1e9:.1f} GFLOP/s by {FLOP_MODEL})",
              flush=True)
    f = np.array([r["flops"] for r in rows])
    t = np.array([r["total_s"] for r in rows])
    rate = float(f @ t / (f @ f))  # seconds per flop, least squares through the origin
    return {"rows": rows, "seconds_per_flop": rate, "gflops": 1e-9 / rate, "model": FLOP_MODEL}


def flops(n: float, m: float) -> float:
    return n**3 / 3 + n**2 * m + m**2 * n


# ---------------------------------------------------------------------------------------------
# extrapolation
# ---------------------------------------------------------------------------------------------


def extrapolate(cfg, k: int, n_test: int, train: dict, ev: dict, kern: dict, kfit: dict, la: dict,
                bn: bool, n_strategies: int, n_lookahead: int) -> dict:
    cycles = []
    compiled_kernel: set = set()
    block = kern["block"]
    for c in range(cfg.cycles):
        n_c = cfg.init + c * cfg.query
        big_n = n_c + cfg.subset
        if cfg.batch_size is None:  # full-batch GD: one step per epoch, time linear in n
            (n0, t0), (n1, t1) = [(r["n"], r["step_s"]) for r in train["rows"]]
            step_s = t0 + (t1 - t0) * (n_c - n0) / (n1 - n0) if n1 != n0 else t0
            steps = cfg.epochs
            train_compiles = 1  # a new n each cycle
        else:
            bs = min(cfg.batch_size, n_c)
            step_s = train["rows"][0]["step_s"]
            steps = cfg.epochs * -(-n_c // bs)
            train_compiles = 1 + (n_c % bs != 0)
        train_s = steps * step_s
        eval_s = (n_test + big_n) * ev["per_example_s"]
        kernel_s = kfit["a_s_per_point"] * big_n + kfit["b_s_per_pair"] * big_n**2
        fit_s = la["seconds_per_flop"] * n_c**3 / 3
        change_s = la["seconds_per_flop"] * (n_c**2 * cfg.subset + cfg.subset**2 * n_c)
        shapes = _block_shapes(big_n, min(block, big_n))
        if bn:
            compiled_kernel = set()  # a new apply_fn (batch statistics) each cycle
        kernel_compiles = len(shapes - compiled_kernel)
        compiled_kernel |= shapes
        compile_train_eval = train_compiles * train["compile_s"] + 2 * ev["compile_s"]
        compile_kernel = kernel_compiles * kern["compile_s"]
        bald_s = cfg.mc_samples * cfg.subset * ev["per_example_s"]
        cycles.append({
            "cycle": c, "n_labelled": n_c, "kernel_points": big_n, "train_steps": steps,
            "train_s": train_s, "eval_s": eval_s, "kernel_s": kernel_s,
            "lookahead_s": fit_s + change_s, "fit_proxy_s": fit_s, "posterior_change_s": change_s,
            "compile_s": compile_train_eval + compile_kernel,
            "compile_train_eval_s": compile_train_eval, "compile_kernel_s": compile_kernel,
            "bald_extra_s": bald_s,
            "kernel_float64_bytes": big_n**2 * 8,
        })
        cycles[-1]["total_s"] = train_s + eval_s + kernel_s + fit_s + change_s + cycles[-1]["compile_s"]
    keys = ("train_s", "eval_s", "kernel_s", "lookahead_s", "compile_s", "total_s")
    whole = {key: sum(c[key] for c in cycles) for key in keys}
    per_cycle = {key: whole[key] / len(cycles) for key in keys}
    # the grid: every strategy trains/evaluates; the MLMOC family (3) computes kernel + proxy;
    # MLMOC and MLMOC-flips score once, EMOC once per class; BALD adds MC-dropout passes
    per_seed = sum(
        n_strategies * (c["train_s"] + c["eval_s"] + c["compile_train_eval_s"])
        + n_lookahead * (c["kernel_s"] + c["compile_kernel_s"] + c["fit_proxy_s"])
        + (n_lookahead - 1 + k) * c["posterior_change_s"]
        + c["bald_extra_s"]
        for c in cycles)
    emoc_share = sum((k - 1) * c["posterior_change_s"] for c in cycles) * SEEDS
    return {"label": LABEL, "cycles": cycles, "whole_run": whole, "per_cycle_mean": per_cycle,
            "grid": {"strategies": n_strategies, "seeds": SEEDS, "lookahead_strategies": n_lookahead,
                     "total_s": per_seed * SEEDS, "emoc_extra_posterior_change_s": emoc_share,
                     "rule": (f"{SEEDS} seeds x sum over cycles of [{n_strategies} x (train + eval + their "
                              f"compiles) + {n_lookahead} x (kernel + its compiles + fit_proxy) + "
                              f"({n_lookahead - 1} + k) x posterior_change (EMOC: one pass per class) + "
                              "BALD's mc_samples x subset forward passes]")}}


# ---------------------------------------------------------------------------------------------
# one preset
# ---------------------------------------------------------------------------------------------


def run_preset(name: str, args, la_cache: dict) -> dict:
    import jax

    from ntk_tutorial.active import run as al
    from ntk_tutorial.active import strategies as st
    from ntk_tutorial.models import num_params

    cfg = al.config_from_preset(name, strategy="mlmoc", seed=args.seed)
    d, image_shape, k, n_test = DATA[name]
    apply_fn, params = al.build_model(cfg, d, k, image_shape)
    n_params = num_params(params)
    bn = getattr(apply_fn, "batch_stats", None) is not None
    n_labels = [cfg.init + c * cfg.query for c in range(cfg.cycles)]
    big = [n + cfg.subset for n in n_labels]
    print(f"\n== {name}: {cfg.model} ({n_params:,} parameters{', batch norm' if bn else ''}), "
          f"init {cfg.init} + {cfg.query}/cycle, subset {cfg.subset}, {cfg.cycles} cycles, "
          f"{'full-batch GD' if cfg.batch_size is None else f'SGD batch {cfg.batch_size}'}, "
          f"{cfg.epochs} epochs/cycle; L u S = {big[0]}..{big[-1]} points", flush=True)
    out = {"config": cfg.to_dict(), "model": cfg.model, "params": n_params, "classes": k,
           "test_images": n_test, "batch_norm": bn}

    # 1. training
    t0 = time.perf_counter()
    steps = args.repeat
    if cfg.batch_size is None:
        sizes = sorted({n_labels[0], n_labels[-1]})
        rows = [measure_train(apply_fn, params, cfg, n, max(steps, 10), d, k, args.seed) for n in sizes]
    else:
        rows = [measure_train(apply_fn, params, cfg, 2 * cfg.batch_size, steps, d, k, args.seed)]
    train = {"rows": rows, "compile_s": statistics.median(r["compile_s"] for r in rows)}
    for r in rows:
        print(f"    train step (n={r['n']}): {r['step_s'] * 1e3:.1f} ms (median of {len(r['steps_s'])}; "
              f"first {r['first_step_s']:.2f} s)", flush=True)

    # 2. evaluation
    ev = measure_eval(apply_fn, params, d, args.eval_target_s, 2 if args.quick else args.repeat,
                      args.quick_eval_batch if args.quick else None, args.seed)
    print(f"    forward: {ev['per_example_s'] * 1e3:.3f} ms/example (batch {ev['batch']})", flush=True)

    # 3. kernel
    blk = kernel_block(apply_fn, params, d, big[-1])
    block = blk["block"]
    if args.quick and blk["method"] != "dense":
        block = min(block, args.quick_block)
    if block < big[-1]:
        sizes = [j * block for j in args.blocks if j * block <= big[-1]]
        if len(sizes) < 2:
            sizes = [j * block for j in args.blocks[:2]]
        regime = "blocked"
    else:  # one block: the whole set (dense MLP route, or a large budget)
        fracs = (1 / 16, 1 / 8) if args.quick else (1 / 8, 1 / 4, 1 / 2)
        sizes = [max(8, int(big[-1] * f)) for f in fracs]
        block = big[-1]
        regime = "single block"
    print(f"    pNTK route {blk['method']}, block {block} (package rule here: {blk['block']}; "
          f"Jacobian budget {fmt_bytes(blk['jacobian_budget_bytes'])}), {regime}", flush=True)
    km = measure_kernel(apply_fn, params, d, block, sizes, args.seed)
    kfit = fit_kernel(km["rows"])
    kern = {"method": blk["method"], "package_block": blk["block"], "block": block, "regime": regime,
            "jacobian_budget_bytes": blk["jacobian_budget_bytes"], "budget_env": blk["budget_env"],
            "quick_capped": regime == "blocked" and block != blk["block"], **km, "fit": kfit}

    # 4. look-ahead (NumPy, depends only on k): measured once per k
    if k not in la_cache:
        la_cache[k] = measure_lookahead(args.lookahead_sizes, k, args.repeat, args.seed)
    la = la_cache[k]
    print(f"    look-ahead: {la['gflops']:.1f} GFLOP/s fitted ({FLOP_MODEL})", flush=True)

    ext = extrapolate(cfg, k, n_test, train, ev, kern, kfit, la, bn, len(st.STRATEGIES), len(st.LOOKAHEAD))
    jac_block_bytes = (block * n_params * 4 * 2) if blk["method"] != "dense" else None
    out.update({
        "measured": {"train": train, "eval": ev, "kernel": kern, "lookahead": la,
                     "seconds": time.perf_counter() - t0},
        "fit": {"kernel": kfit, "lookahead_seconds_per_flop": la["seconds_per_flop"]},
        "extrapolated": ext,
        "memory": {"kernel_float64_bytes_max": big[-1] ** 2 * 8,
                   "kernel_float32_result_bytes_max": big[-1] ** 2 * 4,
                   "jacobian_block_bytes": jac_block_bytes,
                   "jacobian_block_bytes_package_rule": (blk["block"] * n_params * 4 * 2
                                                        if blk["method"] != "dense" else None),
                   "posterior_w_bytes_max": n_labels[-1] * cfg.subset * 8},
        "devices": [str(dv) for dv in jax.devices()],
    })
    print_cycles(name, ext)
    return out


def print_cycles(name: str, ext: dict) -> None:
    print(f"  {name}, one seed of MLMOC (pNTK), {LABEL}:")
    head = (f"  {'cycle':>5} {'labels':>6} {'|L u S|':>7} {'steps':>6} {'train':>9} {'eval':>9} "
            f"{'kernel':>9} {'look-ahd':>9} {'compile':>9} {'total':>9}")
    print(head)
    for c in ext["cycles"]:
        print(f"  {c['cycle']:>5} {c['n_labelled']:>6} {c['kernel_points']:>7} {c['train_steps']:>6} "
              f"{fmt(c['train_s']):>9} {fmt(c['eval_s']):>9} {fmt(c['kernel_s']):>9} "
              f"{fmt(c['lookahead_s']):>9} {fmt(c['compile_s']):>9} {fmt(c['total_s']):>9}")
    w = ext["whole_run"]
    print(f"  {'all':>5} {'':>6} {'':>7} {'':>6} {fmt(w['train_s']):>9} {fmt(w['eval_s']):>9} "
          f"{fmt(w['kernel_s']):>9} {fmt(w['lookahead_s']):>9} {fmt(w['compile_s']):>9} {fmt(w['total_s']):>9}",
          flush=True)


def markdown(results: dict, device: str) -> str:
    lines = [
        f"Estimated on {device}; {LABEL}.",
        "",
        ("| preset | model | params | per cycle (train / eval / kernel / look-ahead / total) "
         "| whole run (10 cycles, 1 seed) | all 9 strategies x 6 seeds |"),
        "|---|---|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:60]} | | | | |")
            continue
        p, w, g = r["extrapolated"]["per_cycle_mean"], r["extrapolated"]["whole_run"], r["extrapolated"]["grid"]
        capped = r["measured"]["kernel"]["quick_capped"]
        lines.append(
            f"| {name} | {r['model']} | {r['params'] / 1e6:.2f} M | "
            f"{fmt(p['train_s'])} / {fmt(p['eval_s'])} / {fmt(p['kernel_s'])}{'*' if capped else ''} / "
            f"{fmt(p['lookahead_s'])} / {fmt(p['total_s'])} | {fmt(w['total_s'])} | {fmt(g['total_s'])} |")
    lines += [
        "",
        ("Per cycle: mean over the 10 cycles (cycle c has init + c x query labels); eval = test accuracy + "
         "the network's logits on L u S; total also counts compilation (rough). One seed of MLMOC with "
         "the pNTK. All strategies x 6 seeds: every strategy trains and evaluates; the 3 MLMOC-family "
         "strategies compute the kernel and fit the proxy; MLMOC and MLMOC-flips score once, EMOC once "
         "per class (k passes); BALD adds mc_samples x subset forward passes."),
    ]
    if any(r.get("measured", {}).get("kernel", {}).get("quick_capped") for r in results.values()):
        lines.append("* --quick: Jacobian block capped below the package rule's, so this kernel time is "
                     "overestimated (smoke check only).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--quick", action="store_true", help="smallest sizes: a smoke check")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed training steps / repeats per measurement (default 3; quick 2)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help="kernel sizes in Jacobian blocks (default 1 2 3; quick 1 2)")
    parser.add_argument("--lookahead-sizes", nargs="+", default=None,
                        help="n:m sizes of the look-ahead measurement (default 500:1000 1000:2000; quick 200:400)")
    parser.add_argument("--eval-target-s", type=float, default=1.5,
                        help="grow the evaluation batch until one forward pass takes about this long")
    parser.add_argument("--quick-block", type=int, default=16, help="--quick: cap on the Jacobian block")
    parser.add_argument("--quick-eval-batch", type=int, default=32, help="--quick: evaluation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=1, help="NumPy BLAS threads (0: library default)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/presets.json; with --quick presets-quick.json, "
                             "so a smoke check does not overwrite the full numbers)")
    args = parser.parse_args()
    args.output = args.output or str(RESULTS / ("presets-quick.json" if args.quick else "presets.json"))
    args.repeat = args.repeat or (2 if args.quick else 3)
    args.blocks = args.blocks or ([1, 2] if args.quick else [1, 2, 3])
    sizes = args.lookahead_sizes or (["200:400"] if args.quick else ["500:1000", "1000:2000"])
    args.lookahead_sizes = [tuple(int(v) for v in s.split(":")) for s in sizes]

    start = time.perf_counter()
    load_start = os.getloadavg()
    import jax
    import scipy.linalg  # noqa: F401 - load SciPy's own BLAS before limiting its threads
    from threadpoolctl import threadpool_info, threadpool_limits

    import ntk_tutorial.lookahead  # noqa: F401
    from ntk_tutorial.plotting import versions

    if args.blas_threads:
        threadpool_limits(args.blas_threads, user_api="blas")

    blas = [{"api": i.get("internal_api"), "threads": i.get("num_threads"),
             "library": os.path.basename(i.get("filepath", ""))} for i in threadpool_info()
            if i.get("user_api") == "blas"]
    devices = [str(d) for d in jax.devices()]
    device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}, {len(devices)} device(s), " \
             f"{os.cpu_count()} CPU cores)"
    print(f"devices {jax.devices()}; BLAS threads {[b['threads'] for b in blas]}; load average "
          f"{load_start[0]:.2f}; {LABEL}"
          + (" (--quick: smoke-check sizes)" if args.quick else ""), flush=True)

    results, la_cache = {}, {}
    for name in args.presets:
        try:
            results[name] = run_preset(name, args, la_cache)
        except Exception as err:  # noqa: BLE001 - a measurement: report and go on
            print(f"  {name} failed: {type(err).__name__}: {err}", flush=True)
            results[name] = {"error": f"{type(err).__name__}: {err}"}

    table = markdown(results, device)
    load_end = os.getloadavg()
    wall = time.perf_counter() - start
    print("\nPer cycle: mean over the cycles; eval = test accuracy + logits on L u S; total also counts "
          "compilation (rough).")
    print(f"Look-ahead flop model {FLOP_MODEL} (n labels, m = subset candidates); kernel {KERNEL_MODEL}.")
    for name, r in results.items():
        if "error" in r:
            continue
        mem, g = r["memory"], r["extrapolated"]["grid"]
        kr = r["measured"]["kernel"]
        jb = mem["jacobian_block_bytes_package_rule"]
        jac = (f"one Jacobian block ({kr['package_block']} examples x {r['params']:,} params x 4 B x 2) "
               f"{fmt_bytes(jb)}" if jb else "dense route, no per-example Jacobians")
        print(f"{name}: peak memory: kernel on L u S (float64) up to "
              f"{fmt_bytes(mem['kernel_float64_bytes_max'])}; {jac}; W = L^-1 K(X, S) up to "
              f"{fmt_bytes(mem['posterior_w_bytes_max'])}. EMOC's extra posterior_change passes "
              f"(k - 1 per cycle) in the grid: {fmt(g['emoc_extra_posterior_change_s'])}")
    print(f"\nGrid rule: {next(iter(r['extrapolated']['grid']['rule'] for r in results.values() if 'error' not in r), '-')}")
    print(f"\n{table}\n")
    print(f"script wall time {fmt(wall)}; load average start {load_start[0]:.2f}, end {load_end[0]:.2f} "
          f"({os.cpu_count()} cores: other work makes the numbers noisy)")
    write_json(args.output, {
        "benchmark": "presets", "label": LABEL, "quick": args.quick, "strategy": "mlmoc", "kernel": "pntk",
        "models": {"lookahead_flops": FLOP_MODEL, "kernel_time": KERNEL_MODEL,
                   "training": "steps x median step time (every step a full batch); GD: linear in n"},
        "settings": {"repeat": args.repeat, "blocks": args.blocks, "lookahead_sizes": args.lookahead_sizes,
                     "eval_target_s": args.eval_target_s, "quick_block": args.quick_block,
                     "blas_threads": args.blas_threads, "seed": args.seed},
        "blas": blas,
        "devices": devices, "device": device,
        "load_average": {"start": load_start, "end": load_end},
        "presets": results, "table_markdown": table, "script_wall_s": wall, "versions": versions(),
    })


if __name__ == "__main__":
    main()
