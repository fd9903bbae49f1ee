"""Repository-wide pytest set-up: notebooks run in fast mode, headless, figures kept apart.

The notebooks' kernels draw with matplotlib's inline backend, as in Jupyter, so every
``plt.show()`` leaves an image; the test process itself and its other children stay on Agg. With
``NTK_TUTORIAL_SAVE_EXECUTED=DIR`` every notebook nbval runs is also written to ``DIR`` with the
outputs of its cells, so that CI builds the site from the one execution that the tests check
(``ntk-tutorial site --from DIR``); a cell that failed keeps its error, and cells after a
failure have no execution count, so the site refuses such a copy.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NTK_TUTORIAL_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

SAVE_ENV = "NTK_TUTORIAL_SAVE_EXECUTED"
_runs: dict[str, dict[int, list]] = {}


def _is_notebook_cell(item) -> bool:
    return hasattr(item, "cell_num") and hasattr(item, "test_outputs") and str(item.fspath).endswith(".ipynb")


def _save(path: str, outputs: dict[int, list], folder: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    count = 0
    for i, cell in enumerate(code):
        if i in outputs:
            count += 1
            cell.execution_count = count
            cell.outputs = [nbformat.from_dict(dict(o)) for o in outputs[i]]
            for out in cell.outputs:
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = count
    fast = os.environ.get("NTK_TUTORIAL_FAST", "0").strip().lower() not in {"", "0", "false", "no", "off"}
    nb.metadata["ntk_tutorial"] = {"mode": "fast" if fast else "full"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / Path(path).name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """nbval starts a notebook's kernel while its first cell is set up: with the inline backend."""
    if not _is_notebook_cell(item):
        yield
        return
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old


def pytest_runtest_teardown(item, nextitem):
    folder = os.environ.get(SAVE_ENV)
    if not folder or not _is_notebook_cell(item):
        return
    path = str(item.fspath)
    if item.test_outputs is not None:
        _runs.setdefault(path, {})[item.cell_num] = list(item.test_outputs)
    if nextitem is None or str(getattr(nextitem, "fspath", "")) != path:
        _save(path, _runs.pop(path, {}), Path(folder))
