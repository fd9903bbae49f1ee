"""The command line under misuse and faults (issue 16): one line, never a traceback.

Usage errors exit with status 2 and one line saying what was wrong, what was expected and what
to do; failed runs with 1; Ctrl-C with 130 and SIGTERM with 143, every worker process stopped,
the completed cycles kept and a line saying how to resume.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import lock_held_elsewhere, write_notebook
from ntk_tutorial import remote
from ntk_tutorial.active import run as R

CLI = [sys.executable, "-m", "ntk_tutorial.cli"]
TINY = ["--preset", "cpu-digits", "--init", "10", "--query", "5", "--subset", "40", "--hidden", "16",
        "--epochs", "5"]


def cli(args, cwd, timeout=300, env=None, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})}, **kw)


def one_line_error(res, status, *fragments):
    err = res.stderr.strip()
    assert res.returncode == status, (res.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("misuse")
    (d / "afile").write_text("not a folder")
    (d / "hidden_str.json").write_text('{"hidden": "256"}')
    (d / "broken.json").write_text('{"epochs": 0')
    (d / "list.json").write_text("[1, 2]")
    (d / "typo.json").write_text('{"epoch": 3}')
    (d / "zero.json").write_text('{"epochs": 0}')
    (d / "empty").mkdir()
    return d


MISUSE = [
    (["al", "--hidden", "256,a"], ["--hidden", "comma-separated positive integers", "'256,a'"]),
    (["al", "--batch-size", "0"], ["--batch-size", "integer >= 1", "got 0"]),
    (["al", "--batch-size", "x"], ["--batch-size", "'x'"]),
    (["al", "--lr", "nan"], ["--lr", "finite number > 0", "nan"]),
    (["al", "--epochs", "0"], ["--epochs", "integer >= 1"]),
    (["al", "--epochs", "-5"], ["--epochs", "integer >= 1"]),
    (["al", "--retrain-every", "-1"], ["--retrain-every", "integer >= 0"]),
    (["al", "--seeds=-1"], ["--seeds", "integers >= 0, got -1"]),
    (["al", "--seeds", "0-99999999"], ["--seeds", "at most 10000"]),
    (["al", "--dataset", "mnist5k"], ["--dataset", "did you mean 'mnist-5k'"]),
    (["al", "--config", "hidden_str.json"], ["hidden in --config hidden_str.json", "a string"]),
    (["al", "--config", "zero.json"], ["epochs in --config zero.json", "integer >= 1"]),
    (["al", "--config", "broken.json"], ["--config broken.json is not valid JSON"]),
    (["al", "--config", "list.json"], ["--config list.json holds list"]),
    (["al", "--config", "typo.json"], ["unknown configuration keys ['epoch']", "did you mean 'epochs'"]),
    (["al", "--config", "missing.json"], ["--config missing.json: cannot be read"]),
    (["al", "--out", "afile"], ["--out afile is a file", "expected a folder"]),
    (["al", "--out", "afile/sub"], ["afile is a file, so the folder cannot be created"]),
    (["al", "--jobs", "0"], ["--jobs must be a positive number"]),
    (["al", "--query", "400"], ["query (400) must not exceed subset (300)"]),
    (["al", "--init", "5000", "--subset", "5000", "--cycles", "1", "--out", "empty/run"], ["exceeds the 1300 training points"]),
    (["al", "--strategy", "bald"], ["dropout > 0"]),
    (["al", "--show"], ["--show prints a preset"]),
    (["al", "--nope"], ["unrecognized arguments: --nope"]),
    (["al-plot", "nowhere"], ["nowhere does not exist"]),
    (["al-plot", "afile"], ["afile is a file"]),
    (["al-plot", "empty"], ["no *.jsonl results in empty"]),
    (["al-reproduce", "nope"], ["unknown experiment 'nope'"]),
    (["al-reproduce", "demo-mnist-5k", "--seeds", "x"], ["--seeds 'x'", "expected seeds"]),
    (["data", "fetch", "mnist5k"], ["'mnist-5k' ships offline"]),
    (["data", "fetch"], ["name a data set to fetch"]),
    (["reproduce", "--notebooks", "nowhere"], ["no notebooks found"]),
    (["reproduce", "--timeout", "0"], ["--timeout must be a positive number"]),
    (["list", "--notebooks", "nowhere"], ["no notebooks found"]),
]


@pytest.mark.parametrize("args,fragments", MISUSE, ids=[" ".join(a) for a, _ in MISUSE])
def test_misuse_ends_in_one_line_and_status_2(folder, args, fragments, monkeypatch, capsys):
    """In-process (``cli.main``, what the console script calls): every misuse returns 2 (argparse's
    own errors raise SystemExit(2)) after one line on stderr."""
    from ntk_tutorial import cli as main_module

    monkeypatch.chdir(folder)
    try:
        status = main_module.main(args)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess(args, status, captured.out, captured.err), 2, *fragments)
    assert not list(folder.rglob("*.jsonl")), "a misuse must not record results"


def test_misuse_from_the_shell_prints_no_traceback(folder):
    for args, fragments in (MISUSE[0], MISUSE[10], MISUSE[24]):
        one_line_error(cli(args, folder), 2, *fragments)


def test_failures_end_in_one_line_and_status_1(folder, tmp_path):
    # a paper preset without its data: how to fetch it, no traceback
    env = {remote.DATA_ENV: str(tmp_path / "empty-cache"), remote.TIMEOUT_ENV: "1"}
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    res = cli(["al", "--preset", "mnist", "--out", tmp_path / "out"], folder, env={**env, **offline})
    one_line_error(res, 1, "ntk-tutorial data fetch mnist")
    # a cache that cannot be written
    res = cli(["data", "fetch", "mnist"], folder, env={remote.DATA_ENV: str(folder / "afile" / "cache")})
    err = one_line_error(res, 1, "cannot write to the data cache")
    assert remote.DATA_ENV in err
    # the memory guard, before anything is trained
    res = cli(["al", *TINY, "--strategy", "mlmoc", "--kernel", "entk", "--out", tmp_path / "mem"], folder,
              env={"NTK_TUTORIAL_MAX_BYTES": "1000000"})
    one_line_error(res, 1, "needs about", "--kernel pntk")
    assert not list((tmp_path / "mem").glob("*.jsonl"))


def test_a_second_run_on_the_same_folder_names_the_process_holding_it(tmp_path):
    cfg = R.config_from_preset("cpu-digits", init=10, query=5, subset=40, hidden=(16,), epochs=5, strategy="random")
    path = R.results_path(tmp_path, cfg)
    with lock_held_elsewhere(path) as pid:
        res = cli(["al", *TINY, "--cycles", "1", "--out", tmp_path], tmp_path)
        one_line_error(res, 1, f"process {pid}", "being written by another run")
        assert not path.exists()
    res = cli(["al", *TINY, "--cycles", "1", "--out", tmp_path], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(path.read_text().splitlines()) == 1


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _lines(out: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in out.glob("*.jsonl")) if out.exists() else 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupting_al_jobs_stops_every_worker_and_keeps_the_cycles(tmp_path, how):
    """Ctrl-C did not stop `al --jobs N` (30 more cycles over 36 s) and SIGTERM to the parent left
    its workers running."""
    out = tmp_path / "out"
    args = CLI + ["al", "--preset", "cpu-digits", "--strategy", "random", "entropy", "--seeds", "0-1",
                  "--cycles", "60", "--init", "10", "--query", "2", "--subset", "40", "--hidden", "16",
                  "--epochs", "50", "--jobs", "2", "--out", str(out)]
    # as from a terminal: Ctrl-C's default action (a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and the command would then rightly go on)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(3000):  # until the workers have written a few cycles (at most ~10 minutes)
            if _lines(out) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        workers = _children(proc.pid)
        assert workers
        if how == "ctrl-c":  # a terminal's Ctrl-C reaches the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # SIGTERM to the parent only
            os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if how == "ctrl-c" else 143), err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "run the same command again to resume" in last and str(out) in last
    for _ in range(100):
        if not any(_alive(w) for w in workers):
            break
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "worker processes left running"
    saved = _lines(out)
    time.sleep(2)
    assert _lines(out) == saved, "cycles written after the command ended"
    assert not list(out.glob("*.lock")), "locks left behind"
    # resuming goes on after the last complete cycle of every run
    per_file = max(len(f.read_text().splitlines()) for f in out.glob("*.jsonl"))
    res = subprocess.run(args[:args.index("--cycles") + 1] + [str(per_file + 1)] + args[args.index("--cycles") + 2:],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    assert all(len(R.read_results(f)) == per_file + 1 for f in out.glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------
# al-plot
# ---------------------------------------------------------------------------------------------


def _run(out, *extra):
    return cli(["al", *TINY, "--cycles", "2", "--out", out, *extra], out.parent)


def test_al_plot_refuses_seeds_run_with_different_settings(tmp_path):
    """One --epochs 0 seed moved random's AUC from 0.63 to 0.46 without a word: seeds of one run
    written with different settings are refused, naming the files and the settings."""
    out = tmp_path / "mixed"
    assert _run(out, "--seeds", "0").returncode == 0
    assert _run(out, "--seeds", "1", "--epochs", "2").returncode == 0
    err = one_line_error(cli(["al-plot", out], tmp_path), 1, "random_seed0.jsonl", "random_seed1.jsonl", "epochs")
    assert "different settings" in err
    assert not (out / "al_curves.png").exists()


def test_al_plot_names_a_file_with_an_invalid_configuration(tmp_path):
    out = tmp_path / "bad"
    assert _run(out).returncode == 0
    path = out / "random_seed0.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for r in recs:
        r["config"]["epochs"] = 0  # what an untrained run recorded before the checks
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    one_line_error(cli(["al-plot", out], tmp_path), 1, "random_seed0.jsonl", "invalid configuration", "epochs")


def test_al_plot_output_errors_and_partial_files(tmp_path):
    out = tmp_path / "ok"
    assert _run(out).returncode == 0
    (out / "subdir").mkdir()
    one_line_error(cli(["al-plot", out, "--output", out / "subdir"], tmp_path), 2, "is a folder")
    one_line_error(cli(["al-plot", out, "--output", out / "random_seed0.jsonl" / "x.png"], tmp_path), 2, "is a file")
    with open(out / "random_seed0.jsonl", "a") as fh:
        fh.write("garbage line\n")  # a corrupt line: skipped with a warning, the valid cycles plotted
    res = cli(["al-plot", out], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "line 3: corrupt" in res.stderr and "Traceback" not in res.stderr
    empty = tmp_path / "partial"
    empty.mkdir()
    (empty / "random_seed0.jsonl").write_text('{"cycle": 0, "strat')
    one_line_error(cli(["al-plot", empty], tmp_path), 1, "no complete cycle")


# ---------------------------------------------------------------------------------------------
# reproduce: a broken notebook or an unwritable executed folder is that notebook failing
# ---------------------------------------------------------------------------------------------


def test_reproduce_reports_an_invalid_notebook_and_an_unwritable_executed_folder_and_goes_on(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    (nbs / "01_broken.ipynb").write_text("{ this is not json")
    write_notebook(nbs / "02_works.ipynb", ["x = 1 + 1", "assert x == 2"])
    res = cli(["reproduce", "--fast", "--notebooks", nbs, "--figures", tmp_path / "figs",
               "--executed", tmp_path / "done"], tmp_path, timeout=600)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "01_broken" in res.stdout and "not a valid notebook" in res.stdout
    assert "1 passed, 1 failed" in res.stdout
    assert (tmp_path / "done" / "02_works.ipynb").exists()
    # the executed copies cannot be written (a file where the folder should be): each notebook
    # is reported as failing, the run goes on to the end and prints its table
    (tmp_path / "blocked").write_text("a file")
    res = cli(["reproduce", "--fast", "--notebooks", nbs, "--figures", tmp_path / "figs",
               "--executed", tmp_path / "blocked" / "executed"], tmp_path, timeout=600)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "0 passed, 2 failed" in res.stdout and "could not be saved" in res.stdout
    if os.geteuid() != 0:  # a read-only folder (root writes anywhere)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        res = cli(["reproduce", "--fast", "--notebooks", nbs, "02", "--figures", tmp_path / "figs",
                   "--executed", ro], tmp_path, timeout=600)
        assert res.returncode == 1 and "could not be saved" in res.stdout and "Traceback" not in res.stderr
