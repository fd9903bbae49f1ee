"""The ``ntk-tutorial`` command.

``ntk-tutorial reproduce [--fast] [NOTEBOOK ...]`` executes the numbered notebooks headless, in
order, writes the figures they save and prints a summary table; a failing notebook is reported
with its failing cell and the run goes on with the next one.  ``ntk-tutorial list`` shows the
notebooks, ``ntk-tutorial info`` the versions and JAX devices, ``ntk-tutorial data fetch NAME``
downloads a real data set and ``ntk-tutorial data list`` shows the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import FAST_ENV
from .plotting import FIGURES_ENV

NOTEBOOK_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")


def find_notebooks_dir(explicit: str | None = None) -> Path:
    """``--notebooks`` if given, else ``./notebooks`` or the one beside this package's checkout."""
    candidates = [Path(explicit)] if explicit else [
        Path.cwd() / "notebooks",
        Path(__file__).resolve().parents[1] / "notebooks",
    ]
    for c in candidates:
        if c.is_dir() and any(NOTEBOOK_RE.match(p.name) for p in c.iterdir()):
            return c.resolve()
    raise SystemExit(
        "no notebooks found (looked in: " + ", ".join(str(c) for c in candidates) + "). Run "
        "ntk-tutorial from the repository checkout, or pass --notebooks DIR."
    )


def list_notebooks(nb_dir: Path) -> list[Path]:
    """The numbered notebooks ``NN_name.ipynb`` of a folder, in order."""
    return sorted(p for p in nb_dir.iterdir() if NOTEBOOK_RE.match(p.name))


def select(notebooks: list[Path], wanted: list[str]) -> list[Path]:
    """Notebooks matching each ``wanted`` item by number (``02``, ``2``) or name fragment."""
    if not wanted:
        return notebooks
    chosen = []
    for w in wanted:
        hits = [
            p for p in notebooks
            if (w.isdigit() and int(p.name[:2]) == int(w)) or (not w.isdigit() and w in p.stem)
        ]
        if not hits:
            names = ", ".join(p.stem for p in notebooks)
            raise SystemExit(f"no notebook matches {w!r}; available: {names}")
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen)


@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    error: str = ""


def _failing_cell(nb) -> str:
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first = cell.source.strip().splitlines()
                head = first[0] if first else ""
                return f"cell {i} ({head[:60]!r}): {out.get('ename')}: {out.get('evalue')}"
    return ""


KERNEL_NAME = "ntk-tutorial-current-python"


def use_current_python_kernel() -> str:
    """Register a kernelspec that runs *this* interpreter and return its name.

    A machine can carry a system-wide "python3" kernelspec that points to another Python
    (without ntk_tutorial); the notebooks must run in the environment the command runs in.
    """
    import json
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ntk-tutorial-kernels-"))
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    )
    return KERNEL_NAME


def execute_notebook(path: Path, *, timeout: int, executed_dir: Path | None,
                     kernel_name: str = "python3") -> Outcome:
    """Run one notebook with nbclient in its own folder; never raises for notebook errors."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except CellExecutionError as err:
        error = _failing_cell(nb) or str(err).strip().splitlines()[-1]
    except (CellTimeoutError, DeadKernelError, TimeoutError) as err:
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    seconds = time.perf_counter() - start
    if executed_dir is not None:
        executed_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed_dir / path.name)
    return Outcome(path.stem, not error, seconds, error)


def format_table(outcomes: list[Outcome]) -> str:
    """A plain-text summary table: notebook, status, seconds."""
    width = max([len(o.name) for o in outcomes] + [8])
    lines = [f"{'notebook':<{width}}  status  seconds", f"{'-' * width}  ------  -------"]
    for o in outcomes:
        lines.append(f"{o.name:<{width}}  {'ok' if o.ok else 'FAILED':<6}  {o.seconds:7.1f}")
    failed = [o for o in outcomes if not o.ok]
    lines.append(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    for o in failed:
        lines.append(f"  {o.name}: {o.error}")
    return "\n".join(lines)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    nb_dir = find_notebooks_dir(args.notebooks)
    chosen = select(list_notebooks(nb_dir), args.names)
    os.environ[FAST_ENV] = "1" if args.fast else "0"
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.figures:
        os.environ[FIGURES_ENV] = str(Path(args.figures).resolve())
    repo = nb_dir.parent
    executed = Path(args.executed).resolve() if args.executed else repo / "build" / "executed"
    mode = "fast" if args.fast else "full"
    print(f"ntk-tutorial reproduce: {len(chosen)} notebook(s) from {nb_dir}, {mode} mode")
    kernel = use_current_python_kernel()
    outcomes = []
    bar = tqdm(chosen, desc="notebooks", unit="nb", file=sys.stdout)
    for path in bar:
        bar.set_postfix_str(path.stem)
        outcome = execute_notebook(path, timeout=args.timeout, executed_dir=executed,
                                   kernel_name=kernel)
        outcomes.append(outcome)
        if not outcome.ok:
            tqdm.write(f"FAILED {outcome.name}: {outcome.error}", file=sys.stdout)
    bar.close()
    print(format_table(outcomes))
    from . import claims
    from .plotting import figures_dir

    where = figures_dir()
    readme = repo / "figures" / "README.md"
    ledger = claims.write_ledger(where, readme=readme if where == (repo / "figures").resolve() else None)
    records = claims.collect(where)
    failing = [r["id"] for r in records if r["status"] == "holds" and not r["holds"]]
    print(f"claims: {len(records)} recorded in {ledger}" + (f"; FAILING: {', '.join(failing)}" if failing else ""))
    print(f"figures: {where}   executed notebooks: {executed}")
    return 0 if all(o.ok for o in outcomes) else 1


def cmd_list(args: argparse.Namespace) -> int:
    for p in list_notebooks(find_notebooks_dir(args.notebooks)):
        print(p.stem)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import jax

    from .plotting import versions

    for name, v in versions().items():
        print(f"{name:>12}: {v}")
    print(f"{'devices':>12}: {jax.devices()}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from . import remote

    if args.action == "list":
        print(f"cache: {remote.cache_dir()}  (set ${remote.DATA_ENV} to move it)")
        print(f"{'data set':14} {'file':30} {'status':10} {'MiB':>8}")
        for row in remote.cached():
            status = "verified" if row["verified"] else ("CORRUPT" if row["present"] else "missing")
            print(f"{row['dataset']:14} {row['file']:30} {status:10} {row['bytes'] / 2**20:8.1f}")
        return 0
    if not args.names:
        raise SystemExit(f"name a data set to fetch: {', '.join(sorted(remote.REMOTE))}")
    failed = 0
    for name in args.names:
        try:
            for path in remote.fetch(name):
                print(f"{name}: {path}")
        except (remote.DownloadError, ValueError) as err:
            print(f"{name}: FAILED\n{err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


# --- active learning (issue 5): ntk-tutorial al / al-plot --------------------------------------


def cmd_al(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .active import run as al

    if args.show:
        if not args.preset:
            raise SystemExit(f"ntk-tutorial al --show: name a preset with --preset ({', '.join(al.PRESETS)})")
        print(al.format_preset(args.preset))
        return 0
    try:
        seeds = al.parse_seeds(args.seeds)
    except ValueError as err:
        raise SystemExit(f"ntk-tutorial al: --seeds: {err}")
    overrides = {k: getattr(args, k) for k in (
        "dataset", "init", "query", "subset", "cycles", "model", "loss", "kernel", "lr", "epochs",
        "mode", "step", "retrain_every", "dropout", "ridge", "normalize", "stages", "depth", "widen", "width",
        "batch_size", "momentum", "weight_decay", "n_train", "n_test", "relative_to", "proxy", "probabilities",
        "bn_stats")}
    if args.hidden:
        overrides["hidden"] = tuple(int(h) for h in args.hidden.split(","))
    if args.config:
        import json

        overrides = {**json.loads(Path(args.config).read_text()), **{k: v for k, v in overrides.items() if v is not None}}
        overrides.pop("strategy", None)
        overrides.pop("seed", None)
    try:
        configs = [al.config_from_preset(args.preset, **overrides, strategy=s, seed=k)
                   for s in dict.fromkeys(args.strategy) for k in dict.fromkeys(seeds)]
    except ValueError as err:
        raise SystemExit(f"ntk-tutorial al: {err}")
    total = sum(c.cycles for c in configs)
    bar = None
    try:
        done = {(c.strategy, c.seed): len(al.read_results(al.results_path(args.out, c), c))
                for c in configs}
        bar = tqdm(total=total, initial=sum(min(v, c.cycles) for v, c in zip(done.values(), configs)),
                   desc="al (strategy, seed, cycle)", unit="cycle", file=sys.stdout)
        _al_loop(al, configs, args, bar, done)
    except (al.ResultsError, NotImplementedError, RuntimeError, ValueError) as err:
        raise SystemExit(f"ntk-tutorial al: {err}")
    finally:
        if bar is not None:
            bar.close()
    print(f"results: {Path(args.out).resolve()}  (plot with: ntk-tutorial al-plot {args.out})")
    return 0


def _al_loop(al, configs, args, bar, done) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    if args.jobs <= 1:
        for c in configs:
            bar.set_postfix_str(f"{c.strategy} seed {c.seed}")
            al.run_experiment(c, args.out, progress=lambda rec: bar.update(1))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(al._run_one, c.to_dict(), str(args.out)): c for c in configs}
            for fut in as_completed(futures):
                c = futures[fut]
                n = fut.result()
                bar.update(max(0, n - min(done[(c.strategy, c.seed)], c.cycles)))
                bar.set_postfix_str(f"done {c.strategy} seed {c.seed}")


def cmd_al_reproduce(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .active import experiments
    from .active import run as al

    if args.list or not args.name:
        for name, exp in experiments.EXPERIMENTS.items():
            print(f"{name:16s} preset {exp.preset}, {len(exp.runs)} runs x seeds {exp.seeds} -> {exp.folder}\n"
                  f"{'':16s} {exp.description}")
        return 0
    try:
        configs = experiments.configs(args.name, args.seeds)
    except ValueError as err:
        raise SystemExit(f"ntk-tutorial al-reproduce: {err}")
    out = Path(args.out or experiments.EXPERIMENTS[args.name].folder)
    bar = tqdm(total=sum(c.cycles for c in configs), desc=f"{args.name} (seed, run, cycle)", unit="cycle",
               file=sys.stdout)
    try:
        for c in configs:
            bar.set_postfix_str(f"{al.run_name(c)} seed {c.seed}")
            before = len(al.read_results(al.results_path(out, c), c))
            bar.update(min(before, c.cycles))
            al.run_experiment(c, out, progress=lambda rec: bar.update(1))
    except (al.ResultsError, NotImplementedError, RuntimeError, ValueError) as err:
        raise SystemExit(f"ntk-tutorial al-reproduce: {err}")
    finally:
        bar.close()
    print(f"results: {out.resolve()}  (plot with: ntk-tutorial al-plot {out})")
    return 0


def cmd_al_plot(args: argparse.Namespace) -> int:
    from .active.plot import format_table, plot_curves

    png, rows, diffs = plot_curves(args.results, args.output, baseline=args.baseline)
    print(format_table(rows, diffs))
    print(f"figure: {png}")
    return 0


def add_al_parsers(sub) -> None:
    """The ``al`` and ``al-plot`` subcommands (issue 5)."""
    from .active.run import BN_STATS, MODELS, MODES, PRESETS
    from .active.strategies import KERNELS, PROBABILITIES, PROXIES, REFERENCES, STRATEGIES

    al = sub.add_parser("al", help="active-learning experiments (resumable; results as JSON lines)")
    al.add_argument("--preset", choices=list(PRESETS), help="protocol: demo-mnist-5k (fast MLP demo), cpu-mnist-5k (the MNIST protocol, narrow "
                         "one-stage WRN), mnist, svhn, cifar10, cifar100 (the paper's); --show prints it")
    al.add_argument("--config", help="JSON file of configuration fields (command-line options win)")
    al.add_argument("--strategy", nargs="+", default=["random"], choices=list(STRATEGIES))
    al.add_argument("--seeds", default="0", help="e.g. 0-5 or 0,2,4 (default 0)")
    al.add_argument("--out", default="results/al", help="results folder (default results/al)")
    al.add_argument("--jobs", type=int, default=1, help="(strategy, seed) pairs run in parallel processes")
    al.add_argument("--mode", choices=list(MODES))
    al.add_argument("--kernel", choices=list(KERNELS))
    al.add_argument("--dataset")
    al.add_argument("--show", action="store_true",
                    help="print every setting of --preset and where it comes from (paper, released code, ours)")
    al.add_argument("--model", choices=list(MODELS),
                    help="mlp, cnn, wrn (the released code's wide ResNet: --stages, --depth, --widen), resnet18")
    al.add_argument("--relative-to", choices=list(REFERENCES),
                    help="measure the look-ahead change from the network (batch default) or the proxy "
                         "(sequential default)")
    al.add_argument("--proxy", choices=list(PROXIES), help="approximation of retraining (Fig. 1b)")
    al.add_argument("--probabilities", choices=list(PROBABILITIES),
                    help="class probabilities for every strategy (default: simplex for EMOC under mse)")
    al.add_argument("--bn-stats", choices=list(BN_STATS), help="batch-norm statistics after training")
    al.add_argument("--hidden", help="hidden widths of the MLP, e.g. 256,256")
    al.add_argument("--loss", choices=["mse", "xent"])
    al.add_argument("--normalize", choices=["standardize", "unit-norm", "none"])
    for name, typ in (("init", int), ("query", int), ("subset", int), ("cycles", int), ("lr", float),
                      ("epochs", int), ("step", int), ("retrain-every", int), ("dropout", float),
                      ("ridge", float), ("stages", int), ("depth", int), ("widen", int), ("width", int),
                      ("batch-size", int),
                      ("momentum", float), ("weight-decay", float), ("n-train", int), ("n-test", int)):
        al.add_argument(f"--{name}", type=typ)
    al.set_defaults(func=cmd_al)
    rep = sub.add_parser("al-reproduce", help="rerun one of the experiments notebook 04 reads (resumable); "
                                              "--list shows them")
    rep.add_argument("name", nargs="?", help="experiment name (see --list)")
    rep.add_argument("--list", action="store_true", help="list the experiments")
    rep.add_argument("--seeds", help="override the experiment's seeds, e.g. 0-1")
    rep.add_argument("--out", help="results folder (default: the experiment's, under results/al/)")
    rep.set_defaults(func=cmd_al_reproduce)
    alp = sub.add_parser("al-plot", help="accuracy vs labels of an al results folder, with an AUC table")
    alp.add_argument("results", help="folder of *.jsonl results")
    alp.add_argument("--output", help="PNG path (default RESULTS/al_curves.png)")
    alp.add_argument("--baseline", default="random", help="run the paired differences are taken to (default random)")
    alp.set_defaults(func=cmd_al_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntk-tutorial", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="execute the notebooks and write their figures")
    rep.add_argument("names", nargs="*", help="notebook numbers or name fragments (default: all)")
    rep.add_argument("--fast", action="store_true", help="small sizes (NTK_TUTORIAL_FAST=1)")
    rep.add_argument("--notebooks", help="folder of the notebooks (default: ./notebooks)")
    rep.add_argument("--figures", help="folder for figures (default: figures/, figures/fast/)")
    rep.add_argument("--executed", help="folder for executed copies (default: build/executed/)")
    rep.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    rep.set_defaults(func=cmd_reproduce)
    lst = sub.add_parser("list", help="list the notebooks")
    lst.add_argument("--notebooks")
    lst.set_defaults(func=cmd_list)
    dat = sub.add_parser("data", help="download real data sets (fetch NAME) or show the cache (list)")
    dat.add_argument("action", choices=["fetch", "list"])
    dat.add_argument("names", nargs="*", help="mnist, fashion-mnist, svhn, cifar10, cifar100")
    dat.set_defaults(func=cmd_data)
    info = sub.add_parser("info", help="package versions and JAX devices")
    info.set_defaults(func=cmd_info)
    add_al_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
