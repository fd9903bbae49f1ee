"""How ``ntk-tutorial reproduce`` runs a notebook (``cli.execute_notebook`` with ``nbrun``), on
tiny synthetic notebooks with a real kernel: images kept, a timed-out cell named, progress over
the cells, no "running over TCP without encryption" warning."""

from __future__ import annotations

import io
import os

import nbformat
import pytest

from ntk_tutorial import cli, nbrun


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))
    nbrun.use_inline_backend()  # what reproduce does; monkeypatch restores MPLBACKEND afterwards
    return cli.use_current_python_kernel()


def _write(tmp_path, *sources: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a title")] + [nbformat.v4.new_code_cell(s) for s in sources]
    path = tmp_path / "00_tiny.ipynb"
    nbformat.write(nb, path)
    return path


def test_executed_copy_keeps_the_figure(tmp_path, kernel, capfd):
    path = _write(tmp_path, "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()",
                  "import matplotlib\nprint(matplotlib.get_backend())")
    out = cli.execute_notebook(path, timeout=120, executed_dir=tmp_path / "exe", kernel_name=kernel)
    assert out.ok, out.error
    nb = nbformat.read(tmp_path / "exe" / path.name, as_version=4)
    images = [o for o in nb.cells[1].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    import base64

    assert base64.b64decode(images[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "inline" in "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert nb.metadata["ntk_tutorial"]["mode"] in {"fast", "full"}
    assert "without encryption" not in capfd.readouterr().err


def test_a_timeout_names_the_cell(tmp_path, kernel):
    path = _write(tmp_path, "x = 1", "import time\ntime.sleep(30)  # the slow one", "y = 2")
    out = cli.execute_notebook(path, timeout=3, executed_dir=None, kernel_name=kernel)
    assert not out.ok
    assert "cell 2 ('import time')" in out.error and "timed out after 3 s" in out.error


def test_a_failing_cell_is_named(tmp_path, kernel):
    path = _write(tmp_path, "x = 1", "raise ValueError('the reason')")
    out = cli.execute_notebook(path, timeout=60, executed_dir=None, kernel_name=kernel)
    assert not out.ok and "cell 2 (\"raise ValueError('the reason')\")" in out.error
    assert "ValueError: the reason" in out.error


def test_progress_counts_code_cells_and_names_the_running_one():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("a = 1"),
                nbformat.v4.new_markdown_cell("text"), nbformat.v4.new_code_cell("b = 2\nc = 3")]
    stream = io.StringIO()
    bar = nbrun.CellProgress(nb, "00_tiny", file=stream)
    assert bar.bar.total == 2 and bar.where() == "before the first cell"
    seen = []
    for i, cell in enumerate(nb.cells):
        bar.on_cell_start(cell=cell, cell_index=i)
        seen.append(bar.where())
        if cell.cell_type == "code":
            bar.on_cell_executed(cell=cell, cell_index=i)
    # a Markdown cell never becomes "the running cell"
    assert seen == ["before the first cell", "cell 1 ('a = 1')", "cell 1 ('a = 1')", "cell 3 ('b = 2')"]
    assert bar.bar.n == 2
    bar.close()
    assert "00_tiny" in stream.getvalue()


@pytest.mark.skipif(os.name != "posix", reason="IPC sockets (and their folder) only on POSIX")
def test_the_socket_folder_it_makes_is_removed_when_the_process_exits(tmp_path):
    """Every notebook run made a private socket folder in the temporary directory and left it
    behind (50 empty folders after a day of work); the folder goes when the process exits, and
    a folder the caller names is the caller's to keep."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from ntk_tutorial import nbrun; import sys; "
            "print(nbrun.kernel_config().KernelManager.ip); "
            "print(nbrun.kernel_config(sys.argv[1]).KernelManager.ip)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mine")], capture_output=True, text=True,
                         check=True).stdout.split()
    made, given = Path(out[0]).parent, Path(out[1]).parent
    assert made.name.startswith("ntk-tutorial-kernel-") and not made.exists()
    assert given == tmp_path / "mine" and given.is_dir()
