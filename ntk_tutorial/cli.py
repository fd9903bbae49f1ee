"""The ``ntk-tutorial`` command.

``ntk-tutorial reproduce [--fast] [NOTEBOOK ...]`` executes the numbered notebooks headless, in
order, writes the figures they save and prints a summary table; a failing notebook is reported
with its failing cell and the run goes on with the next one.  ``ntk-tutorial list`` shows the
notebooks, ``ntk-tutorial info`` the versions and JAX devices, ``ntk-tutorial data fetch NAME``
downloads a real data set and ``ntk-tutorial data list`` shows the cache.

Every misuse ends in one line on stderr saying what was wrong, what was expected and what to do:
exit status 2 for usage errors (a bad option, a bad ``--config`` file, a folder that cannot be
written), 1 for a run that failed (results that cannot be resumed, data that cannot be loaded,
a computation too large for memory), 130 after Ctrl-C and 143 after SIGTERM, with a line saying
how to resume.  Never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import FAST_ENV, is_fast
from .plotting import FIGURES_ENV

NOTEBOOK_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")


class UsageError(Exception):
    """A misuse of the command (exit status 2): the message says what was wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit status 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def writable_folder(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a folder this process can create or write in, else :class:`UsageError` naming
    ``option``."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {path} is a file; expected a folder (it is created if missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path} is not writable; choose a folder you can write to")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is a file, so the folder cannot be created; "
                         "choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path} cannot be created ({parent} is not writable); choose a folder "
                         "you can write to")
    return path


def find_notebooks_dir(explicit: str | None = None) -> Path:
    """``--notebooks`` if given, else ``./notebooks`` or the one beside this package's checkout."""
    candidates = [Path(explicit)] if explicit else [
        Path.cwd() / "notebooks",
        Path(__file__).resolve().parents[1] / "notebooks",
    ]
    for c in candidates:
        if c.is_dir() and any(NOTEBOOK_RE.match(p.name) for p in c.iterdir()):
            return c.resolve()
    raise UsageError(
        "no notebooks found (looked in: " + ", ".join(str(c) for c in candidates) + "); run "
        "ntk-tutorial from the repository checkout, or pass --notebooks DIR"
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
            raise UsageError(f"no notebook matches {w!r}; available: {names}")
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
                     kernel_name: str = "python3", progress: bool = False) -> Outcome:
    """Run one notebook with nbclient in its own folder; never raises for the notebook's own
    problems: a failing cell, a file that is not a valid notebook, or an executed copy that
    cannot be saved are all reported as this notebook failing."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    start = time.perf_counter()
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:  # noqa: BLE001 - invalid JSON, a wrong schema, an unreadable file
        return Outcome(path.stem, False, time.perf_counter() - start,
                       f"not a valid notebook ({type(err).__name__}: {_one_line(err)[:200]}); restore it "
                       "from git or re-pair it from its .md with jupytext --sync")
    from . import nbrun

    cells = nbrun.CellProgress(nb, path.stem, enabled=progress)  # progress over the cells
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
        config=nbrun.kernel_config(), extra_arguments=nbrun.kernel_arguments(), **cells.hooks(),
    )
    error = ""
    try:
        client.execute()
    except CellExecutionError as err:
        error = _failing_cell(nb) or str(err).strip().splitlines()[-1]
    except CellTimeoutError:
        error = (f"{cells.where()} timed out after {timeout} s; raise the limit with --timeout SECONDS "
                 "or run the notebook in Jupyter to see where it spends its time")
    except (DeadKernelError, TimeoutError) as err:
        error = (f"{type(err).__name__} in {cells.where()}: "
                 f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    finally:
        cells.close()
    seconds = time.perf_counter() - start
    nb.metadata[nbrun.METADATA_KEY] = {"mode": "fast" if is_fast() else "full"}
    if executed_dir is not None:
        try:
            executed_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, executed_dir / path.name)
        except OSError as err:
            error = (error + "; " if error else "") + (
                f"the executed copy could not be saved to {executed_dir} ({err.strerror or err}); pass "
                "--executed DIR with a writable folder")
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

    if args.timeout < 1:
        raise UsageError(f"--timeout must be a positive number of seconds per cell, got {args.timeout}")
    nb_dir = find_notebooks_dir(args.notebooks)
    chosen = select(list_notebooks(nb_dir), args.names)
    args.fast = bool(args.fast) or is_fast()  # --fast, or NTK_TUTORIAL_FAST=1 in the environment
    os.environ[FAST_ENV] = "1" if args.fast else "0"
    from .nbrun import use_inline_backend

    use_inline_backend()  # plt.show() leaves its image in the executed copy, as in Jupyter
    if args.figures:
        os.environ[FIGURES_ENV] = str(Path(args.figures).resolve())
    repo = nb_dir.parent
    executed = Path(args.executed).resolve() if args.executed else repo / "build" / "executed"
    mode = "fast" if args.fast else "full"
    print(f"ntk-tutorial reproduce: {len(chosen)} notebook(s) from {nb_dir}, {mode} mode")
    kernel = use_current_python_kernel()
    outcomes = []
    args.on_interrupt = lambda: (f"; {len(outcomes)} of {len(chosen)} notebook(s) finished "
                                 f"({sum(o.ok for o in outcomes)} passed); rerun with the remaining names to go on")
    bar = tqdm(chosen, desc="notebooks", unit="nb", file=sys.stdout, position=0)
    for path in bar:
        bar.set_postfix_str(path.stem)
        outcome = execute_notebook(path, timeout=args.timeout, executed_dir=executed,
                                   kernel_name=kernel, progress=True)
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

    from .provenance import git_state, versions

    for name, v in versions().items():
        print(f"{name:>12}: {v}")
    git = git_state()
    print(f"{'git':>12}: " + ("not a git checkout" if git["commit"] is None
                              else f"{git['commit'][:12]}" + (" (uncommitted changes)" if git["dirty"] else "")))
    print(f"{'devices':>12}: {jax.devices()}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from . import data, remote

    if args.action == "list":
        print(f"cache: {remote.cache_dir()}  (set ${remote.DATA_ENV} to move it)")
        print(f"{'data set':14} {'file':30} {'status':10} {'MiB':>8}")
        for row in remote.cached():
            status = "verified" if row["verified"] else ("CORRUPT" if row["present"] else "missing")
            print(f"{row['dataset']:14} {row['file']:30} {status:10} {row['bytes'] / 2**20:8.1f}")
        return 0
    if not args.names:
        raise UsageError(f"name a data set to fetch: {', '.join(sorted(remote.REMOTE))}")
    for name in args.names:
        if name not in remote.REMOTE:
            import difflib

            close = difflib.get_close_matches(name, sorted(set(remote.REMOTE) | set(data.OFFLINE)), n=1)
            hint = ""
            if close and close[0] in data.OFFLINE:
                hint = f" ({close[0]!r} ships offline: no fetch needed, use --dataset {close[0]})"
            elif close:
                hint = f" (did you mean {close[0]!r}?)"
            raise UsageError(f"unknown remote data set {name!r}{hint}; available: {', '.join(sorted(remote.REMOTE))}")
    failed = 0
    for name in args.names:
        try:
            for path in remote.fetch(name):
                print(f"{name}: {path}")
        except (remote.DownloadError, ValueError, OSError) as err:
            print(f"ntk-tutorial data: {name}: FAILED: {_one_line(err)}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


# --- active learning (issue 5): ntk-tutorial al / al-plot --------------------------------------


# configuration fields with their own options (several strategies, a seed list)
_PER_RUN = ("strategy", "seed")


def _config_fields() -> list[str]:
    from dataclasses import fields

    from .active.run import ALConfig

    return [f.name for f in fields(ALConfig) if f.name not in _PER_RUN]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_error(err, cli_keys: set, file_keys: set, config_file: str | None) -> UsageError:
    """A :class:`ConfigError` as a usage error naming where the bad value came from."""
    name = getattr(err, "field", None)
    if name in cli_keys:
        return UsageError(f"{_option(name)}: {err.reason}")
    if name in file_keys:
        return UsageError(f"{name} in --config {config_file}: {err.reason}")
    return UsageError(str(err))


def _read_config_file(path: str) -> dict:
    import json

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"--config {path}: cannot be read ({err.strerror or err}); expected a JSON file of "
                         'configuration fields such as {"epochs": 100}') from None
    try:
        fields = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--config {path} is not valid JSON ({err}); expected an object of configuration "
                         'fields such as {"epochs": 100, "hidden": [256]}') from None
    if not isinstance(fields, dict):
        raise UsageError(f"--config {path} holds {type(fields).__name__}, not an object of configuration fields "
                         'such as {"epochs": 100}')
    return fields


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises :class:`Interrupted` in the main thread while the block runs."""

    def handler(signum, frame):
        raise Interrupted(signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _saved_cycles(al, configs, out) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = 0
        for c in configs:
            try:
                total += len(al.read_results(al.results_path(out, c)))
            except Exception:  # noqa: BLE001 - only for the message
                pass
        return total


def cmd_al(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .active import run as al

    if args.show:
        if not args.preset:
            raise UsageError(f"--show prints a preset: name it with --preset ({', '.join(al.PRESETS)})")
        print(al.format_preset(args.preset))
        return 0
    if args.jobs < 1:
        raise UsageError(f"--jobs must be a positive number of parallel processes, got {args.jobs}")
    try:
        seeds = al.parse_seeds(args.seeds)
    except ValueError as err:
        raise UsageError(f"--seeds {args.seeds!r}: {err}") from None
    cli = {k: getattr(args, k) for k in _config_fields() if getattr(args, k, None) is not None}
    from_file: dict = {}
    if args.config:
        from_file = _read_config_file(args.config)
        from_file = {k: v for k, v in from_file.items() if k not in _PER_RUN}
    overrides = {**from_file, **cli}
    try:
        configs = [al.config_from_preset(args.preset, **overrides, strategy=s, seed=k)
                   for s in dict.fromkeys(args.strategy) for k in dict.fromkeys(seeds)]
    except al.ConfigError as err:
        raise _config_error(err, set(cli), set(from_file), args.config) from None
    out = writable_folder(args.out, "--out")
    args.on_interrupt = lambda: (f"; {_saved_cycles(al, configs, out)} complete cycle(s) are kept in {out}; "
                                 "run the same command again to resume after the last complete cycle")
    total = sum(c.cycles for c in configs)
    bar = None
    try:
        done = {(c.strategy, c.seed): len(al.read_results(al.results_path(out, c), c)) for c in configs}
        bar = tqdm(total=total, initial=sum(min(v, c.cycles) for v, c in zip(done.values(), configs)),
                   desc="al (strategy, seed, cycle)", unit="cycle", file=sys.stdout)
        with _sigterm_interrupts():
            _al_loop(al, configs, args, bar, done, out)
    finally:
        if bar is not None:
            bar.close()
    print(f"results: {out.resolve()}  (plot with: ntk-tutorial al-plot {out})")
    return 0


def _worker_init() -> None:
    """In each worker process: Ctrl-C is the parent's to handle (it stops the workers), SIGTERM
    ends the worker at once, and the worker dies with its parent (Linux ``PR_SET_PDEATHSIG``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warnings.showwarning = _warning_line
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _stop_workers(pool) -> None:
    """Terminate every worker process of ``pool`` now and wait for them (never leaves one behind)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _al_loop(al, configs, args, bar, done, out) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    if args.jobs <= 1 or len(configs) <= 1:
        for c in configs:
            bar.set_postfix_str(f"{c.strategy} seed {c.seed}")
            al.run_experiment(c, out, progress=lambda rec: bar.update(1))
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(args.jobs, len(configs)), mp_context=ctx,
                               initializer=_worker_init)
    try:
        futures = {pool.submit(al._run_one, c.to_dict(), str(out)): c for c in configs}
        try:
            for fut in as_completed(futures):
                c = futures[fut]
                n = fut.result()
                bar.update(max(0, n - min(done[(c.strategy, c.seed)], c.cycles)))
                bar.set_postfix_str(f"done {c.strategy} seed {c.seed}")
        except KeyboardInterrupt:
            raise
        except BaseException:  # one run failed: the others that are running finish their cycles
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    except BaseException:
        _stop_workers(pool)
        _clear_stale_locks(al, configs, out)
        raise
    pool.shutdown(wait=True)


def _clear_stale_locks(al, configs, out) -> None:
    """Remove the lock files of stopped workers (their locks died with them; the files remain)."""
    for c in configs:
        lock = al.RunLock(al.results_path(out, c))
        if lock.path.exists():
            try:
                lock.acquire().release()
            except al.ResultsError:  # still held: by another command, leave it
                pass


def cmd_al_reproduce(args: argparse.Namespace) -> int:
    from .active import experiments

    if args.list or not args.name:
        width = max(len(name) for name in experiments.EXPERIMENTS)
        for name, exp in experiments.EXPERIMENTS.items():
            print(f"{name:{width}s} preset {exp.preset}, {len(exp.runs)} runs x seeds {exp.seeds} -> {exp.folder}\n"
                  f"{'':{width}s} {exp.description}")
        return 0
    if args.name not in experiments.EXPERIMENTS:
        import difflib

        close = difflib.get_close_matches(args.name, list(experiments.EXPERIMENTS), n=1)
        raise UsageError(f"unknown experiment {args.name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; choose one of {', '.join(experiments.EXPERIMENTS)} (--list shows them)")
    from tqdm.auto import tqdm

    from .active import run as al

    try:
        configs = experiments.configs(args.name, args.seeds)
    except ValueError as err:
        raise UsageError(f"--seeds {args.seeds!r}: {err}" if args.seeds else str(err)) from None
    out = writable_folder(args.out or experiments.EXPERIMENTS[args.name].folder, "--out")
    args.on_interrupt = lambda: (f"; {_saved_cycles(al, configs, out)} complete cycle(s) are kept in {out}; "
                                 "run the same command again to resume after the last complete cycle")
    bar = tqdm(total=sum(c.cycles for c in configs), desc=f"{args.name} (seed, run, cycle)", unit="cycle",
               file=sys.stdout)
    try:
        with _sigterm_interrupts():
            for c in configs:
                bar.set_postfix_str(f"{al.run_name(c)} seed {c.seed}")
                before = len(al.read_results(al.results_path(out, c), c))
                bar.update(min(before, c.cycles))
                al.run_experiment(c, out, progress=lambda rec: bar.update(1))
    finally:
        bar.close()
    print(f"results: {out.resolve()}  (plot with: ntk-tutorial al-plot {out})")
    return 0


def cmd_al_plot(args: argparse.Namespace) -> int:
    from .active import plot
    from .active import run as al

    folder = Path(args.results)
    if not folder.exists():
        raise UsageError(f"{folder} does not exist; expected the results folder of ntk-tutorial al (its --out)")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file; expected the results folder of ntk-tutorial al (its --out), "
                         "which holds *.jsonl files")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UsageError(f"no *.jsonl results in {folder}; run `ntk-tutorial al --out {folder}` first")
    # every file's recorded configuration, checked here so that an error names its file
    complete = 0
    for f in files:
        recs = al.read_results(f)
        if recs:
            try:
                al.ALConfig.from_dict(recs[0]["config"])
            except al.ConfigError as err:
                raise al.ResultsError(f"{f} records an invalid configuration ({err}); these cycles did not run "
                                      "the experiment it names: move the file out of the folder") from None
        complete += len(recs)
    if not complete:
        raise al.ResultsError(f"the *.jsonl files in {folder} hold no complete cycle yet; run (or resume) "
                              f"`ntk-tutorial al --out {folder}`")
    output = Path(args.output) if args.output else folder / "al_curves.png"
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; expected a PNG file name such as {output / 'al_curves.png'}")
    writable_folder(output.parent, "--output's folder")
    with warnings.catch_warnings():  # the files' set-aside lines were reported above
        warnings.simplefilter("ignore", al.ResultsWarning)
        png, rows, diffs = plot.plot_curves(folder, output, baseline=args.baseline)
    print(plot.format_table(rows, diffs))
    print(f"figure: {png}")
    return 0


_AL_HELP = {
    "dataset": "data set (ntk_tutorial.data.available(); remote ones need `ntk-tutorial data fetch NAME`)",
    "mode": "batch (top-b), sequential (one label at a time through the proxy) or hybrid (--step per update)",
    "kernel": "kernel of the look-ahead proxy: pntk (default), entk (k^2 larger), trace",
    "model": "mlp, cnn, wrn (the released code's wide ResNet: --stages, --depth, --widen), resnet18",
    "relative_to": "measure the look-ahead change from the network (batch default) or the proxy "
                   "(sequential default)",
    "proxy": "approximation of retraining (Fig. 1b)",
    "probabilities": "class probabilities for every strategy (default: simplex for EMOC under mse)",
    "bn_stats": "batch-norm statistics after training",
    "lr_schedule": "learning rate over each cycle's training: constant, onecycle (--lr is the peak), cosine",
    "hidden": "hidden widths of the MLP, e.g. 256,256",
    "batch_size": "SGD mini-batch (default: full batch)",
    "init": "labelled points at the start (drawn at random by --seeds)",
    "query": "labels queried per cycle",
    "subset": "unlabelled candidates scored per query round (a random subset of the pool)",
    "cycles": "query cycles (train, evaluate, query)",
    "stages": "wrn: stages of the released wide ResNet",
    "depth": "wrn: depth 6n + 4",
    "widen": "wrn: widening factor k (channels 16k, then 32k, 64k, 128k per stage)",
    "width": "resnet18: channels of the first stage",
    "dropout": "dropout rate of the network (BALD needs > 0)",
    "loss": "training loss: mse on one-hot labels (the paper's) or xent",
    "lr": "learning rate (the peak under --lr-schedule onecycle)",
    "epochs": "training epochs per cycle",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay of SGD",
    "ridge": "ridge added to the kernel of the look-ahead proxy",
    "mc_samples": "dropout masks sampled by BALD",
    "step": "hybrid mode: labels per proxy update",
    "retrain_every": "sequential mode: retrain the network by SGD every N labels (0: once per cycle)",
    "data_seed": "seed of the train/test split (the same for every --seeds)",
    "n_train": "training pool size (default: the data set's)",
    "n_test": "test set size (default: the data set's)",
    "normalize": "input normalisation (default: the data set's loader)",
}
# the al commands and their one-line help (here, so `ntk-tutorial --help` lists them without JAX)
_AL_COMMANDS = {
    "al": "active-learning experiments (resumable; results as JSON lines)",
    "al-reproduce": "rerun one of the experiments notebook 04 reads (resumable); --list shows them",
    "al-plot": "accuracy vs labels of an al results folder, with an AUC table",
}


def _field_parser(name: str):
    """argparse ``type=`` for configuration field ``name``: its :class:`FieldSpec` parses and
    checks the text (argparse then reports ``argument --NAME: <what was wrong>``)."""
    from .active.run import ConfigError, field_spec

    spec = field_spec(name)

    def parse(text: str):
        try:
            return spec.parse(name, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(err.reason) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _metavar(spec) -> str:
    if spec.kind == "choice":
        return "{" + ",".join(spec.allowed()) + "}"
    return {"int": "N", "float": "X", "widths": "W1,W2,..."}[spec.kind]


def add_al_parsers(sub, al_options: bool = True) -> None:
    """The ``al``, ``al-reproduce`` and ``al-plot`` subcommands (issue 5); ``al_options=False``:
    ``al`` without its options (declaring them imports JAX)."""
    if not al_options:
        sub.add_parser("al", help=_AL_COMMANDS["al"])
        _add_al_reproduce_and_plot(sub)
        return
    from .active.run import PRESETS, field_spec
    from .active.strategies import STRATEGIES

    al = sub.add_parser("al", help=_AL_COMMANDS["al"])
    al.add_argument("--preset", choices=list(PRESETS), help="protocol: demo-mnist-5k (fast MLP demo), cpu-mnist-5k (the MNIST protocol, narrow "
                         "one-stage WRN), mnist, svhn, cifar10, cifar100 (the paper's); --show prints it")
    al.add_argument("--config", help="JSON file of configuration fields (command-line options win)")
    al.add_argument("--strategy", nargs="+", default=["random"], choices=list(STRATEGIES), metavar="NAME",
                    help="query strategies, one run each (default random): " + ", ".join(STRATEGIES))
    al.add_argument("--seeds", default="0", help="e.g. 0-5 or 0,2,4 (default 0)")
    al.add_argument("--out", default="results/al", help="results folder (default results/al)")
    al.add_argument("--jobs", type=int, default=1, help="(strategy, seed) pairs run in parallel processes")
    al.add_argument("--show", action="store_true",
                    help="print every setting of --preset and where it comes from (paper, released code, ours)")
    # one option per configuration field, parsed and checked by the field's own declaration
    for name in _config_fields():
        spec = field_spec(name)
        if spec is None:  # a field without a declaration: only --config sets it
            continue
        al.add_argument(_option(name), dest=name, type=_field_parser(name), metavar=_metavar(spec),
                        help=f"{_AL_HELP[name]} ({spec.expected()})" if name in _AL_HELP else spec.expected())
    al.set_defaults(func=cmd_al)
    _add_al_reproduce_and_plot(sub)


def _add_al_reproduce_and_plot(sub) -> None:
    rep = sub.add_parser("al-reproduce", help=_AL_COMMANDS["al-reproduce"])
    rep.add_argument("name", nargs="?", help="experiment name (see --list)")
    rep.add_argument("--list", action="store_true", help="list the experiments")
    rep.add_argument("--seeds", help="override the experiment's seeds, e.g. 0-1")
    rep.add_argument("--out", help="results folder (default: the experiment's, under results/al/)")
    rep.set_defaults(func=cmd_al_reproduce)
    alp = sub.add_parser("al-plot", help=_AL_COMMANDS["al-plot"])
    alp.add_argument("results", help="folder of *.jsonl results")
    alp.add_argument("--output", help="PNG path (default RESULTS/al_curves.png)")
    alp.add_argument("--baseline", default="random", help="run the paired differences are taken to (default random)")
    alp.set_defaults(func=cmd_al_plot)



def cmd_site(args: argparse.Namespace) -> int:
    """Execute the notebooks (or take executed copies with --from), then build the HTML book."""
    from . import site

    site.require_tools()
    nb_dir = find_notebooks_dir(args.notebooks)
    repo = nb_dir.parent
    out = writable_folder(args.out or repo / "build" / "site", "--out").resolve()
    if args.from_dir:
        if args.fast:
            raise UsageError("--fast chooses how to execute the notebooks, and --from executes nothing; "
                             "drop one of them")
        executed = Path(args.from_dir).resolve()
        if not executed.is_dir():
            raise UsageError(f"--from {executed} is not a folder; expected the executed notebooks of "
                             "ntk-tutorial reproduce (build/executed/)")
    else:
        executed = repo / "build" / "executed"
        status = cmd_reproduce(argparse.Namespace(
            names=[], fast=args.fast, notebooks=str(nb_dir), figures=None, executed=str(executed),
            timeout=args.timeout))
        if status:
            raise site.SiteError("the site is not built: a notebook failed (see the table above); fix it, "
                                 "or build from earlier copies with --from DIR")
    print(f"ntk-tutorial site: building the book from {executed}")
    index = site.build(repo, executed, out)
    print(f"site: {index}\nopen it in a browser (file://{index}), or serve it: python -m http.server -d {out}")
    if args.open:
        import webbrowser

        webbrowser.open(index.as_uri())
    return 0


def add_site_parser(sub) -> None:
    site = sub.add_parser("site", help="build the HTML book of the executed notebooks (build/site/index.html)")
    site.add_argument("--fast", action="store_true", help="execute in fast mode (small sizes) before building")
    site.add_argument("--from", dest="from_dir", metavar="DIR",
                      help="build from notebooks already executed into DIR (e.g. build/executed/ of "
                           "ntk-tutorial reproduce), executing nothing")
    site.add_argument("--out", help="folder of the site (default build/site/)")
    site.add_argument("--notebooks", help="folder of the notebooks (default: ./notebooks)")
    site.add_argument("--timeout", type=int, default=3600, help="seconds per cell when executing (default 3600)")
    site.add_argument("--open", action="store_true", help="open the built site in the web browser")
    site.set_defaults(func=cmd_site)


def build_parser(al_options: bool = True) -> argparse.ArgumentParser:
    """The command's parser. ``al_options=False`` leaves out the options of the ``al`` command
    (declaring them imports JAX): ``ntk-tutorial --help`` and the other commands answer at once."""
    from . import __version__

    parser = OneLineParser(prog="ntk-tutorial", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"ntk-tutorial {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    rep = sub.add_parser("reproduce", help="execute the notebooks and write their figures")
    rep.add_argument("names", nargs="*", help="notebook numbers or name fragments (default: all)")
    rep.add_argument("--fast", action="store_true", help="small sizes (the same as NTK_TUTORIAL_FAST=1 in the environment)")
    rep.add_argument("--notebooks", help="folder of the notebooks (default: ./notebooks)")
    rep.add_argument("--figures", help="folder for figures (default: figures/, figures/fast/)")
    rep.add_argument("--executed", help="folder for executed copies (default: build/executed/)")
    rep.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    rep.set_defaults(func=cmd_reproduce)
    lst = sub.add_parser("list", help="list the notebooks")
    lst.add_argument("--notebooks", help="folder of the notebooks (default: ./notebooks)")
    lst.set_defaults(func=cmd_list)
    dat = sub.add_parser("data", help="download real data sets (fetch NAME) or show the cache (list)")
    dat.add_argument("action", choices=["fetch", "list"], help="fetch NAME: download and verify a data set; list: what is cached")
    dat.add_argument("names", nargs="*", help="mnist, fashion-mnist, svhn, cifar10, cifar100")
    dat.set_defaults(func=cmd_data)
    info = sub.add_parser("info", help="package versions and JAX devices")
    info.set_defaults(func=cmd_info)
    add_site_parser(sub)
    add_al_parsers(sub, al_options)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ntk-tutorial: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def _package_errors() -> tuple[tuple, tuple]:
    """``(usage errors, failures)``: the exception classes a command reports as one line (exit
    status 2 and 1).  The package's own classes are taken from their modules only when those are
    imported (a command that never imported them cannot have raised them), so ``list`` and
    ``--help`` import no JAX."""
    usage, failed = [UsageError], [RuntimeError, NotImplementedError, ValueError, OSError]
    run = sys.modules.get(f"{__package__}.active.run")
    if run is not None:
        usage.append(run.ConfigError)
        failed.append(run.ResultsError)
    kernels = sys.modules.get(f"{__package__}.kernels")
    if kernels is not None:
        failed.append(kernels.KernelTooLargeError)
    return tuple(usage), tuple(failed)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed, 2 usage error, 130 Ctrl-C,
    143 SIGTERM) after printing any error as one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(al_options="al" in argv).parse_args(argv)
    prog = f"ntk-tutorial {args.command}"
    old_show = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Interrupted)
        hint = ""
        if getattr(args, "on_interrupt", None) is not None:
            try:
                hint = args.on_interrupt()
            except Exception:  # noqa: BLE001 - the message must still come
                hint = ""
        print(f"{prog}: {'stopped by SIGTERM' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as err:  # noqa: BLE001 - the package's own errors become one line; others propagate
        usage, failed = _package_errors()
        if isinstance(err, usage):
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        if not isinstance(err, failed):
            raise
        text = _one_line(err)
        if isinstance(err, OSError) and getattr(err, "filename", None) and str(err.filename) not in text:
            text += f" ({err.filename})"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
