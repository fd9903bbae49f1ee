import json
import subprocess
import sys

import pytest

from helpers import write_notebook
from ntk_tutorial import cli, config
from ntk_tutorial.plotting import save_figure


def test_pick_follows_the_environment(monkeypatch):
    monkeypatch.setenv(config.FAST_ENV, "1")
    assert config.pick(full=100, fast=3) == 3
    monkeypatch.setenv(config.FAST_ENV, "0")
    assert config.pick(full=100, fast=3) == 100
    monkeypatch.delenv(config.FAST_ENV)
    assert not config.is_fast()


def test_save_figure_writes_png_and_numbers(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    monkeypatch.setenv("NTK_TUTORIAL_FIGURES", str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, "demo", {"y": np.array([1.0, 0.0])}, seed=7, notebook="99_demo")
    meta = json.loads((tmp_path / "demo.json").read_text())
    assert png.exists() and png.stat().st_size > 1000
    assert meta["data"]["y"] == [1.0, 0.0] and meta["seed"] == 7 and "jax" in meta["versions"]
    assert set(meta["git"]) == {"commit", "dirty"}
    with pytest.raises(ValueError, match="bare file stem"):
        save_figure(fig, "sub/demo.png")


def test_select_by_number_and_name(tmp_path):
    for name in ("00_start_here.ipynb", "01_paths.ipynb", "02_pntk.ipynb", "notes.ipynb"):
        (tmp_path / name).write_text("{}")
    nbs = cli.list_notebooks(tmp_path)
    assert [p.stem for p in nbs] == ["00_start_here", "01_paths", "02_pntk"]
    assert [p.stem for p in cli.select(nbs, ["2"])] == ["02_pntk"]
    assert [p.stem for p in cli.select(nbs, ["paths", "00"])] == ["00_start_here", "01_paths"]
    with pytest.raises(cli.UsageError, match="no notebook matches '7'"):
        cli.select(nbs, ["7"])


def test_reproduce_reports_the_failing_cell_and_continues(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    write_notebook(nbs / "01_fails.ipynb", ["x = 1", "assert x == 2, 'claim broken'", "print('unreached')"])
    write_notebook(nbs / "02_works.ipynb", [
        "import os\nfrom ntk_tutorial import is_fast\nassert is_fast()",
        "import matplotlib.pyplot as plt\nfrom ntk_tutorial.plotting import save_figure\n"
        "fig, ax = plt.subplots(); save_figure(fig, 'tiny', {'a': 1})",
    ])
    figs = tmp_path / "figs"
    proc = subprocess.run(
        [sys.executable, "-m", "ntk_tutorial.cli", "reproduce", "--fast", "--notebooks", str(nbs),
         "--figures", str(figs), "--executed", str(tmp_path / "done")],
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "01_fails" in out and "FAILED" in out and "cell 1" in out and "claim broken" in out
    assert "02_works" in out and "1 passed, 1 failed" in out
    assert (figs / "tiny.png").exists() and (tmp_path / "done" / "02_works.ipynb").exists()


def test_provenance_records_the_commit_and_whether_the_code_was_changed(tmp_path):
    """git_state names the checkout's commit (as `git rev-parse HEAD` gives it) and calls the tree
    dirty only when a tracked file of the code or the notebooks changed, not an output."""
    import shutil
    import subprocess

    from ntk_tutorial import provenance

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    assert provenance.git_state(str(tmp_path)) == {"commit": None, "dirty": None}  # not a checkout
    provenance.git_state.cache_clear()
    git("init", "-q")
    for path in ("ntk_tutorial/x.py", "figures/a.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    states = []
    for change in (None, "figures/a.json", "ntk_tutorial/x.py"):
        if change:
            (tmp_path / change).write_text("1\n")
        provenance.git_state.cache_clear()
        states.append(provenance.git_state(str(tmp_path)))
    provenance.git_state.cache_clear()
    head = git("rev-parse", "HEAD")
    assert [s["commit"] for s in states] == [head] * 3
    assert [s["dirty"] for s in states] == [False, False, True]
    rec = provenance.record()
    assert set(rec) == {"versions", "git"} and "jax" in rec["versions"]


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["al-reproduce", "--list"], ["nosuchcommand"]])
def test_help_and_list_import_no_jax(argv):
    """`ntk-tutorial --help`, `list` and `al-reproduce --list` answer without importing JAX (issue
    15: they start in well under a second), and a usage error still ends in one line."""
    import subprocess
    import sys

    code = ("import sys\nfrom ntk_tutorial.cli import main\n"
            "try:\n    status = main(sys.argv[1:])\nexcept SystemExit as e:\n    status = e.code\n"
            "print('JAX-IMPORTED' if 'jax' in sys.modules else 'NO-JAX', status)")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().splitlines()[-1].startswith("NO-JAX"), res.stdout + res.stderr
    if argv == ["nosuchcommand"]:
        assert res.stdout.strip().endswith(" 2") and "invalid choice" in res.stderr
