"""The repository's habits: the linter passes, the pre-commit hooks turn a notebook saved from
JupyterLab into a clean pair, and the licence and citation agree with the package and README.

(That every ``notebooks/*.md`` has its output-free ``.ipynb`` and the two agree is checked by
``tests/test_notebooks_registry.py``.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e \".[test]\")")
    return str(found)


def test_ruff_check_passes():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _hooks() -> list[dict]:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    return [hook for repo in config["repos"] for hook in repo["hooks"]]


def test_precommit_hooks_clean_up_a_notebook_saved_from_jupyterlab(tmp_path):
    """A JupyterLab save: the .ipynb has an edited cell, outputs and execution counts and is newer
    than its .md. The notebook hooks, run in their configured order on that file, must leave a
    pair that agrees, holds the edit in the .md, and has no outputs: the committed .ipynb's form."""
    name = "00_start_here"
    (tmp_path / "notebooks").mkdir()
    for ext in (".md", ".ipynb"):
        shutil.copy2(REPO / "notebooks" / f"{name}{ext}", tmp_path / "notebooks" / f"{name}{ext}")
    md, ipynb = tmp_path / "notebooks" / f"{name}.md", tmp_path / "notebooks" / f"{name}.ipynb"
    committed = json.loads(ipynb.read_text())

    nb = nbformat.read(ipynb, as_version=4)
    edited = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
    sentence = "An edit made in JupyterLab, to be carried into the Markdown."
    nb.cells[edited].source += "\n\n" + sentence
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {n}\n")]
    nb.metadata["language_info"] = {"name": "python", "version": "3.11"}
    nbformat.write(nb, ipynb)
    later = md.stat().st_mtime + 60
    os.utime(ipynb, (later, later))

    ran = []
    for hook in _hooks():
        if hook["id"] == "ruff" or not re.search(hook["files"], f"notebooks/{ipynb.name}"):
            continue
        cmd = shlex.split(hook["entry"])
        cmd[0] = _tool(cmd[0])
        proc = subprocess.run(cmd + [f"notebooks/{ipynb.name}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, f"{hook['id']}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        ran.append(hook["id"])
    assert ran == ["jupytext-sync", "nbstripout"], ran

    assert sentence in md.read_text()
    after = nbformat.read(ipynb, as_version=4)
    code = [c for c in after.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    pair_md = [(c.cell_type, c.source.strip()) for c in jupytext.read(md).cells]
    pair_nb = [(c.cell_type, c.source.strip()) for c in jupytext.read(ipynb).cells]
    assert pair_md == pair_nb
    # the same form as the committed file, but for the edit
    want = [(c["cell_type"], "".join(c["source"]).strip()) for c in committed["cells"]]
    want[edited] = (want[edited][0], want[edited][1] + "\n\n" + sentence)
    assert pair_nb == want
    assert after.metadata == nbformat.from_dict(committed["metadata"])
    assert [c.get("id") for c in after.cells] == [c.get("id") for c in committed["cells"]]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_licence_covers_code_and_prose():
    text = (REPO / "LICENSE").read_text()
    assert _pyproject()["project"]["license"] == "MIT"
    assert "MIT License" in text and "Permission is hereby granted, free of charge" in text
    assert "CC BY 4.0" in text and "creativecommons.org/licenses/by/4.0" in text


def test_citation_matches_the_package_and_the_papers():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"].startswith("1.2")
    assert cff["version"] == _pyproject()["project"]["version"]
    assert set(cff["license"]) == {"MIT", "CC-BY-4.0"}
    readme = (REPO / "README.md").read_text()
    papers = readme.split("## Papers", 1)[1]
    titles = re.findall(r"^\d+\. .*?\s\*([A-Z][^*]+)\*", papers, re.MULTILINE)
    assert len(titles) == 5, titles
    cited = [ref["title"] for ref in cff["references"]]
    assert sorted(t.rstrip(".") for t in titles) == sorted(cited)
    assert all(ref.get("year") and ref.get("authors") for ref in cff["references"])


def test_changelog_names_the_version():
    version = _pyproject()["project"]["version"]
    assert re.search(rf"^## \[?{re.escape(version)}\]?", (REPO / "CHANGELOG.md").read_text(), re.MULTILINE)
