"""The set-up cell every notebook opens with, in a simulated Colab: a fresh kernel whose Python
does not have ntk-tutorial, a working directory outside the repository, no network.

The simulated runtime is a virtual environment without pip whose only packages are those of
the test environment, seen through a ``.pth`` line (so ipykernel, pip and setuptools are there,
but not the editable install of ntk-tutorial, whose finder only that environment's own ``.pth``
files install). pip runs with ``--no-index --no-deps --no-build-isolation`` through
``NTK_TUTORIAL_PIP_ARGS``: nothing is downloaded.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
OFFLINE = "--no-index --no-deps --no-build-isolation"


def setup_cell(md: Path) -> str:
    return next(c.source for c in jupytext.read(md).cells if c.cell_type == "code")


def test_every_notebook_starts_with_the_same_setup_cell():
    cells = {md.stem: setup_cell(md) for md in SOURCES}
    first = cells[SOURCES[0].stem]
    assert first.startswith("# Set-up, the same first cell in every notebook"), first[:80]
    for name, cell in cells.items():
        assert cell == first, f"{name}'s first code cell differs from {SOURCES[0].stem}'s set-up cell"
    for part in ("NTK_TUTORIAL_SOURCE", "pyproject.toml", "RESTART THE RUNTIME", "git clone", "pip"):
        assert part in first, part


def _runtime(tmp_path: Path) -> Path:
    """A Python without ntk-tutorial: a pip-less venv that sees this environment's packages."""
    venv = tmp_path / "runtime"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = subprocess.run([str(python), "-c", "import ntk_tutorial"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert probe.returncode != 0, "the simulated runtime must not see ntk-tutorial"
    return python


def _clone(where: Path) -> Path:
    """The files of the repository that pip needs to install it."""
    where.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, where / name)
    shutil.copytree(ROOT / "ntk_tutorial", where / "ntk_tutorial", ignore=shutil.ignore_patterns("__pycache__"))
    (where / "notebooks").mkdir()
    return where


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "NTK_TUTORIAL_SOURCE")}
    env.update(NTK_TUTORIAL_PIP_ARGS=OFFLINE, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run_cell(python: Path, cwd: Path, env: dict, before: str = "") -> subprocess.CompletedProcess:
    code = before + "\n" + setup_cell(SOURCES[0])
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_colab_fresh_kernel_installs_from_the_clone(tmp_path):
    """Colab's layout: the kernel runs in /content, the clone is /content/ntk-tutorial."""
    python = _runtime(tmp_path)
    content = tmp_path / "content"
    clone = _clone(content / "ntk-tutorial")
    kernel_dir = tmp_path / "kernels" / "colab"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        '{"argv": ["%s", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "colab", '
        '"language": "python"}' % str(python).replace("\\", "\\\\"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(setup_cell(SOURCES[0])),
                nbformat.v4.new_code_cell("import ntk_tutorial\nprint('FROM', ntk_tutorial.__file__)")]
    from nbclient import NotebookClient

    env = _env(JUPYTER_PATH=str(tmp_path))
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        NotebookClient(nb, kernel_name="colab", timeout=300,
                       resources={"metadata": {"path": str(content)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.outputs)
    assert "installing ntk-tutorial with pip from" in text and "no restart needed" in text, text
    assert f"FROM {clone / 'ntk_tutorial' / '__init__.py'}" in text, text
    # a restarted runtime imports it too (the editable install, not only the path of this kernel)
    again = subprocess.run([str(python), "-c", "import ntk_tutorial; print(ntk_tutorial.__file__)"],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and str(clone) in again.stdout, again.stderr
    # and the cell, run again, only reports what is installed
    second = _run_cell(python, content, _env())
    assert second.returncode == 0 and "installing" not in second.stdout, second.stdout + second.stderr


def test_a_source_named_by_the_environment_variable(tmp_path):
    python = _runtime(tmp_path)
    clone = _clone(tmp_path / "elsewhere" / "ntk-tutorial")
    work = tmp_path / "work"
    work.mkdir()
    proc = _run_cell(python, work, _env(NTK_TUTORIAL_SOURCE=str(clone)))
    assert proc.returncode == 0, proc.stderr
    assert f"from {clone}" in proc.stdout and "no restart needed" in proc.stdout, proc.stdout


def test_outside_any_clone_it_says_what_to_do(tmp_path):
    python = _runtime(tmp_path)
    lost = tmp_path / "somewhere"
    lost.mkdir()
    proc = _run_cell(python, lost, _env())
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "is not inside a clone" in message and "git clone" in message, message
    assert "NTK_TUTORIAL_SOURCE" in message, message
    assert "installing" not in proc.stdout


def test_it_says_to_restart_when_pip_replaced_an_imported_package(tmp_path):
    """A package this kernel already imported (``ntkfake`` 1.0) is upgraded by the install: the
    cell stops and says to restart the runtime."""
    python = _runtime(tmp_path)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "ntkfake").mkdir()
    (site / "ntkfake" / "__init__.py").write_text("VERSION = '1.0'\n")
    info = site / "ntkfake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ntkfake\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("ntkfake\n")
    (info / "INSTALLER").write_text("test\n")
    (info / "RECORD").write_text("ntkfake/__init__.py,,\nntkfake-1.0.dist-info/METADATA,,\n"
                                 "ntkfake-1.0.dist-info/top_level.txt,,\nntkfake-1.0.dist-info/INSTALLER,,\n"
                                 "ntkfake-1.0.dist-info/RECORD,,\n")
    newer = tmp_path / "ntkfake-2.0"
    (newer / "ntkfake").mkdir(parents=True)
    (newer / "ntkfake" / "__init__.py").write_text("VERSION = '2.0'\n")
    (newer / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "ntkfake"
        version = "2.0"
        """))
    work = tmp_path / "work"
    work.mkdir()
    proc = _run_cell(python, work, _env(NTK_TUTORIAL_SOURCE=str(newer)), before="import ntkfake")
    assert proc.returncode != 0, proc.stdout
    message = proc.stderr.strip().splitlines()[-1]
    assert "RESTART THE RUNTIME NOW" in message and "ntkfake" in message, proc.stderr[-2000:]


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_the_setup_cell_runs_first_in_the_tests_too(md):
    """nbval runs the cell like any other (the package is installed there: it only reports it)."""
    nb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "_setup_ntk_tutorial()" in first.source
    assert not {"nbval-skip", "skip-execution"} & set(first.metadata.get("tags", []))
