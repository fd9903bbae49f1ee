"""``ntk-tutorial site``: small books built from synthetic executed notebooks in a temporary repo.

Each test builds (a few seconds each) a site from two tiny notebooks whose outputs are written
here, with the repository's own ``docs/`` (its ``conf.py``, the landing page, the style), and
compares the HTML with facts known independently of the site code: the bytes of the PNG put into
the notebook, the TeX written into its Markdown, the MathJax file the ``sphinx-mathjax-offline``
distribution ships, the figure and the claim put into ``figures/``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from importlib.metadata import distribution
from pathlib import Path

import nbformat
import pytest

from ntk_tutorial import site

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(bool(site.missing_tools()), reason="the docs extra is not installed")

TEX = r"\Theta(x, x') = J(x)\, J(x')^\top"


def _png(color: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [2, 0, 1], color=color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _notebook(title: str, markdown: str, code: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\n{markdown}"),
                nbformat.v4.new_code_cell(code),
                nbformat.v4.new_markdown_cell("## Afterwards\n\nThe end.")]
    return nb


def _executed(nb: nbformat.NotebookNode, outputs: list, *, mode: str = "fast") -> nbformat.NotebookNode:
    """The executed copy, as the tests' saved copies are (no language_info: the .ipynb has none)."""
    done = nbformat.from_dict(json.loads(json.dumps(nb)))
    code = [c for c in done.cells if c.cell_type == "code"]
    code[0].execution_count = 1
    code[0].outputs = outputs
    done.metadata["ntk_tutorial"] = {"mode": mode}
    return done


@pytest.fixture
def repo(tmp_path):
    """A repository with docs/, two notebooks and their executed copies, notation, figures."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "docs", root / "docs", ignore=shutil.ignore_patterns("_build", "__pycache__"))
    (root / "notebooks").mkdir(parents=True)
    executed = tmp_path / "executed"
    executed.mkdir()
    png = _png("C0")
    a = _notebook("Lesson alpha", f"The eNTK is $${TEX}$$ and inline $k\\times k$.\n\n"
                  "See the [notation](notation.md) and the [next lesson](01_beta.ipynb).",
                  "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()")
    b = _notebook("Lesson beta", "Back to the [first lesson](00_alpha.ipynb).", "print(6 * 7)")
    nbformat.write(a, root / "notebooks" / "00_alpha.ipynb")
    nbformat.write(b, root / "notebooks" / "01_beta.ipynb")
    nbformat.write(_executed(a, [nbformat.v4.new_output(
        "display_data", data={"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"})]),
        executed / "00_alpha.ipynb")
    nbformat.write(_executed(b, [nbformat.v4.new_output("stream", name="stdout", text="42\n")]),
                   executed / "01_beta.ipynb")
    (root / "notebooks" / "notation.md").write_text("# Notation\n\n| symbol | meaning |\n|---|---|\n"
                                                    "| $\\Theta$ | the empirical NTK |\n")
    figures = root / "figures"
    (figures / "claims").mkdir(parents=True)
    (figures / "00_alpha_curve.png").write_bytes(_png("C3"))
    (figures / "README.md").write_text(
        "# Reproduced figures\n\n| figure | what it shows | notebook |\n|---|---|---|\n"
        "| `00_alpha_curve.png` | a red curve | `00_alpha` |\n"
        "| `00_not_made_yet.png` | a figure nobody wrote | `00_alpha` |\n\n"
        "## Claims\n\nEvery claim the notebooks make.\n")
    (figures / "claims" / "00_alpha.json").write_text(json.dumps({"notebook": "00_alpha", "claims": [{
        "id": "00.norm-small", "notebook": "00_alpha", "claim": "||Theta - Theta_hat||_F is small",
        "paper": "a paper", "value": 0.012, "bound": 0.1, "op": "<=", "status": "holds", "holds": True}]}))
    return root, executed, png


def _build(repo_root: Path, executed: Path, tmp_path: Path) -> Path:
    return site.build(repo_root, executed, tmp_path / "site")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_site_pages_figures_math_offline(repo, tmp_path):
    root, executed, png = repo
    index = _build(root, executed, tmp_path)
    out = index.parent
    assert index == out / "index.html" and index.is_file()
    for page in ("notebooks/00_alpha.html", "notebooks/01_beta.html", "notebooks/notation.html",
                 "figures/README.html"):
        assert (out / page).is_file(), page

    # navigation: the landing page's table of contents lists both lessons and the reference pages
    landing = _text(index)
    for target in ("notebooks/00_alpha.html", "notebooks/01_beta.html", "notebooks/notation.html",
                   "figures/README.html"):
        assert f'href="{target}"' in landing, target

    # the stored figure is on the page, byte for byte
    alpha = _text(out / "notebooks" / "00_alpha.html")
    images = re.findall(r'<img [^>]*src="([^"]+)"', alpha)
    assert images, "no image on the lesson page"
    assert png in [(out / "notebooks" / unquote_src(src)).resolve().read_bytes() for src in images]
    # the stored stream output and the code are there too
    assert "42" in _text(out / "notebooks" / "01_beta.html")

    # math: the TeX is left for MathJax, and MathJax is this site's own copy of the shipped file
    assert html.escape(TEX, quote=False) in html.unescape(alpha) or TEX in html.unescape(alpha)
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', alpha)
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax and all("://" not in s for s in mathjax), mathjax
    local = (out / "notebooks" / mathjax[0].split("?")[0]).resolve()
    shipped = Path(distribution("sphinx-mathjax-offline").locate_file(
        "sphinx-mathjax-offline/static/mathjax/tex-chtml.js"))
    assert local.read_bytes() == shipped.read_bytes()
    # the web fonts MathJax's CommonHTML output asks for (relative to the script) are shipped
    assert list((local.parent / "output" / "chtml" / "fonts" / "woff-v2").glob("MathJax_Main-Regular.woff"))
    # and nothing a page needs is loaded from another host
    for page in out.rglob("*.html"):
        if "_static" in page.parts:
            continue
        for tag, _attr, value in re.findall(r"<(script|link|img)\b[^>]*?\b(src|href)=\"([^\"]+)\"", _text(page)):
            assert "://" not in value and not value.startswith("//"), f"{page.name}: {tag} {value}"


def unquote_src(src: str) -> str:
    from urllib.parse import unquote

    return unquote(src.split("?")[0])


def test_figure_map_and_claims_page(repo, tmp_path):
    root, executed, _ = repo
    out = _build(root, executed, tmp_path).parent
    page = _text(out / "figures" / "README.html")
    # the existing figure is shown (its bytes), the missing one is named but not linked
    shown = [(out / "figures" / unquote_src(s)).resolve() for s in re.findall(r'<img [^>]*src="([^"]+)"', page)]
    assert (root / "figures" / "00_alpha_curve.png").read_bytes() in [p.read_bytes() for p in shown]
    assert "00_not_made_yet.png" in page
    assert not re.search(r'href="[^"]*00_not_made_yet', page)
    # the claims table, made from figures/claims/*.json: one row, six cells, the norm's bars kept
    row = next(r for r in re.findall(r"<tr[^>]*>(.*?)</tr>", page, re.S) if "00.norm-small" in r)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    assert len(cells) == 6, cells
    assert "||Theta - Theta_hat||_F is small" in html.unescape(re.sub(r"<[^>]+>", "", cells[0]))
    assert re.sub(r"<[^>]+>", "", cells[-1]).strip() == "holds"


def test_widget_outputs_become_a_note(repo, tmp_path):
    root, executed, _ = repo
    nb = nbformat.read(executed / "01_beta.ipynb", as_version=4)
    nb.cells[1].outputs.append(nbformat.v4.new_output("display_data", data={
        site.WIDGET_MIME: {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "interactive(children=(Dropdown(...),))"}))
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nbformat.write(nb, executed / "01_beta.ipynb")
    out = _build(root, executed, tmp_path).parent
    page = _text(out / "notebooks" / "01_beta.html")
    assert "open this notebook in Jupyter" in page
    assert "widget-state" not in page and "jupyter-widgets" not in page.lower()


@pytest.mark.parametrize("problem, message", [
    ("not run", "did not run"),
    ("error", "failed: ValueError"),
    ("missing", "no executed copy"),
    ("stale", "older than the notebook"),
])
def test_refuses_notebooks_that_did_not_execute(repo, tmp_path, problem, message):
    root, executed, _ = repo
    copy = executed / "01_beta.ipynb"
    nb = nbformat.read(copy, as_version=4)
    if problem == "not run":
        nb.cells[1].execution_count = None
        nb.cells[1].outputs = []
    elif problem == "error":
        nb.cells[1].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])]
    elif problem == "stale":
        nb.cells[1].source = "print(6 * 9)"
    if problem == "missing":
        copy.unlink()
    else:
        nbformat.write(nb, copy)
    with pytest.raises(site.SiteError, match=message) as err:
        _build(root, executed, tmp_path)
    assert "01_beta" in str(err.value)
    assert not (tmp_path / "site" / "index.html").exists()


def test_refuses_mixed_modes(repo, tmp_path):
    root, executed, _ = repo
    nb = nbformat.read(executed / "01_beta.ipynb", as_version=4)
    nb.metadata["ntk_tutorial"] = {"mode": "full"}
    nbformat.write(nb, executed / "01_beta.ipynb")
    with pytest.raises(site.SiteError, match="mix modes"):
        _build(root, executed, tmp_path)


@pytest.mark.parametrize("target", ["07_missing.ipynb", "#no-such-section", "../figures/nothing.png"])
def test_refuses_a_broken_link(repo, tmp_path, target):
    root, executed, _ = repo
    for folder in (root / "notebooks", executed):
        nb = nbformat.read(folder / "01_beta.ipynb", as_version=4)
        nb.cells[2].source += f"\n\nSee [this]({target})."
        nbformat.write(nb, folder / "01_beta.ipynb")
    with pytest.raises(site.SiteError, match=re.escape(target.lstrip("#"))) as err:
        _build(root, executed, tmp_path)
    assert "01_beta" in str(err.value)


def test_check_site_finds_broken_links_and_remote_resources(tmp_path):
    """The HTML check alone, on hand-written pages: what it must report and what it must not."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "good.html").write_text('<h1 id="top">x</h1><a href="sub/page.html#here">ok</a>'
                                        '<a href="https://example.org/">an outside link is fine</a>'
                                        '<img src="sub/pic.png"><a href="#top">self</a>')
    (tmp_path / "sub" / "pic.png").write_bytes(b"png")
    (tmp_path / "sub" / "page.html").write_text(
        '<p id="here">here</p><a href="../gone.html">gone</a><a href="../good.html#nowhere">no anchor</a>'
        '<script src="https://cdn.example.org/mathjax.js"></script><img src="missing.png">')
    problems = site.check_site(tmp_path)
    joined = " | ".join(problems)
    assert len(problems) == 4, problems
    assert "'../gone.html'" in joined and "#nowhere" in joined
    assert "cdn.example.org" in joined and "'missing.png'" in joined
    assert "good.html: " not in joined.replace("sub/page.html", "")


def test_command_line(repo, tmp_path, capsys):
    """``ntk-tutorial site --from DIR``: exit 0 and the path of index.html; a refused copy: one
    line on stderr, exit 1, no traceback."""
    from ntk_tutorial.cli import main

    root, executed, _ = repo
    out = tmp_path / "book"
    assert main(["site", "--from", str(executed), "--notebooks", str(root / "notebooks"), "--out", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    (executed / "00_alpha.ipynb").unlink()
    assert main(["site", "--from", str(executed), "--notebooks", str(root / "notebooks"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "00_alpha: no executed copy" in err[0] and "Traceback" not in err[0]
    assert main(["site", "--fast", "--from", str(executed), "--notebooks", str(root / "notebooks")]) == 2


def test_refuses_a_notebook_whose_markdown_twin_differs(repo, tmp_path):
    """The .md is the source people edit: a book built from an .ipynb it was not synced to would
    publish an old lesson."""
    import jupytext

    root, executed, _ = repo
    ipynb = root / "notebooks" / "01_beta.ipynb"
    md = ipynb.with_suffix(".md")
    jupytext.write(nbformat.read(ipynb, as_version=4), md, fmt="md:myst")
    _build(root, executed, tmp_path)  # a pair that agrees is fine
    md.write_text(md.read_text().replace("The end.", "The end, rewritten in the Markdown only."))
    with pytest.raises(site.SiteError, match=r"01_beta: 01_beta.md and 01_beta.ipynb differ.*jupytext --sync"):
        _build(root, executed, tmp_path)


def test_builds_from_the_copies_the_tests_save(repo, tmp_path):
    """What CI does: ``NTK_TUTORIAL_SAVE_EXECUTED=DIR pytest`` (conftest.py saves each notebook
    nbval ran, with the inline backend's images), then ``ntk-tutorial site --from DIR``."""
    import os
    import subprocess
    import sys

    root, _, _ = repo
    runner = tmp_path / "runner"
    runner.mkdir()
    shutil.copy2(REPO / "conftest.py", runner / "conftest.py")
    (runner / "pytest.ini").write_text("[pytest]\naddopts = --nbval-lax --nbval-current-env -p no:cacheprovider\n")
    for name in ("00_alpha.ipynb", "01_beta.ipynb"):
        shutil.copy2(root / "notebooks" / name, runner / name)
    saved = tmp_path / "saved"
    env = {**os.environ, "NTK_TUTORIAL_SAVE_EXECUTED": str(saved), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "00_alpha.ipynb", "01_beta.ipynb"],
                          cwd=runner, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    alpha = nbformat.read(saved / "00_alpha.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for o in alpha.cells[1].outputs), alpha.cells[1].outputs
    out = site.build(root, saved, tmp_path / "site").parent
    assert re.search(r"<img [^>]*src=", _text(out / "notebooks" / "00_alpha.html"))
    assert "42" in _text(out / "notebooks" / "01_beta.html")


def test_solutions_and_the_setup_cell_are_folded(repo, tmp_path):
    root, executed, _ = repo
    setup = site.SETUP_CELL_START + ": ...\nprint('ntk-tutorial 0.1.0')"
    for folder in (root / "notebooks", executed):
        nb = nbformat.read(folder / "01_beta.ipynb", as_version=4)
        solution = nbformat.v4.new_code_cell("answer = 6 * 7  # the solution's code", metadata={
            "tags": ["solution", "hide-cell"], "jupyter": {"source_hidden": True, "outputs_hidden": True}})
        first = nbformat.v4.new_code_cell(setup)
        if folder == executed:
            solution.execution_count, first.execution_count = 3, 0
            solution.outputs = [nbformat.v4.new_output("stream", name="stdout", text="right\n")]
            first.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ntk-tutorial 0.1.0\n")]
        nb.cells.insert(1, first)
        nb.cells.append(solution)
        nbformat.write(nb, folder / "01_beta.ipynb")
    out = _build(root, executed, tmp_path).parent
    page = _text(out / "notebooks" / "01_beta.html")
    folded = re.findall(r"<details[^>]*>(.*?)</details>", page, re.S)
    solution_block = [d for d in folded if "the solution" in d]
    assert len(solution_block) == 1 and "Solution (click to open)" in solution_block[0]
    assert "right" in solution_block[0]  # its output is folded with it
    setup_block = [d for d in folded if "Set-up, the same first cell" in d]
    assert len(setup_block) == 1 and "Show the set-up cell" in setup_block[0]
    # the set-up cell's output stays visible, outside the fold
    assert "ntk-tutorial 0.1.0" in re.sub(r"<details.*?</details>", "", page, flags=re.S)
