"""Every notebook is paired, stripped, in sync, has the fast-mode parameter cell, and is run."""

import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
SOURCES = sorted(NB_DIR.glob("[0-9][0-9]_*.md"))


def test_there_are_notebooks_and_nothing_unpaired():
    assert SOURCES, "no notebooks/NN_*.md found"
    ipynbs = {p.stem for p in NB_DIR.glob("*.ipynb")}
    assert ipynbs == {p.stem for p in SOURCES}, "every .ipynb needs its .md source and vice versa"
    numbers = [p.name[:2] for p in SOURCES]
    assert len(numbers) == len(set(numbers)), "two notebooks share a number"


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_paired_in_sync_and_without_outputs(md):
    ipynb = md.with_suffix(".ipynb")
    nb = nbformat.read(ipynb, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} carries outputs"
    assert "md:myst" in nb.metadata.get("jupytext", {}).get("formats", ""), "not paired with MyST"
    text = jupytext.read(md)
    pairs_md = [(c.cell_type, c.source.strip()) for c in text.cells]
    pairs_nb = [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert pairs_md == pairs_nb, f"{md.name} and {ipynb.name} differ: run jupytext --sync {md}"


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_template_parts(md):
    nb = jupytext.read(md)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    src = params[0].source
    assert "pick(" in src and re.search(r"key\s*=\s*jax\.random\.key\(SEED\)", src), (
        "the parameter cell sets sizes with pick(full=..., fast=...) and key = jax.random.key(SEED)"
    )
    text = md.read_text()
    for part in ("What you will learn", "Prerequisites", "Run time", "Summary", "References", "(notation.md)"):
        assert part in text, f"{md.name} lacks the '{part}' part of the template"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "claims.check(" in code, "claims are checked through the ledger (ntk_tutorial.claims.check)"


def test_the_notation_page_names_what_the_notebooks_use():
    page = (NB_DIR / "notation.md").read_text()
    for symbol in (r"\Theta", r"\hat\Theta", r"\tau", r"\tau_\mathrm{hp}", r"\rho", r"\mathcal A(x')", "p^*"):
        assert symbol in page, symbol


def test_pytest_collects_every_notebook():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", str(NB_DIR)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if ".ipynb::" in line}
    expected = {str(p.with_suffix(".ipynb").relative_to(ROOT)) for p in SOURCES}
    assert expected <= collected, f"not collected by pytest: {sorted(expected - collected)}"
