"""The claims ledger: the helper's semantics, the notebooks' use of it, and the committed ledger
agreeing with the notebooks and with the table in figures/README.md."""

import ast
import json
import re
from pathlib import Path

import pytest

from ntk_tutorial import claims

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    monkeypatch.setenv(claims.CLAIMS_ENV, str(tmp_path / "claims"))
    claims.start("99_test")
    return tmp_path


def test_check_records_then_asserts(ledger):
    rec = claims.check("99.a", 0.3, 0.5, op="<", paper="P", claim="small")
    assert rec["holds"] and rec["status"] == "holds" and rec["mode"] in ("fast", "full")
    with pytest.raises(claims.ClaimError, match="99.b.*does not hold"):
        claims.check("99.b", 0.7, 0.5, op="<", paper="P", claim="small")
    # a paper claim reported as not reproduced must keep failing, or the prose is stale
    assert claims.check("99.c", 0.7, 0.5, op="<", paper="P", claim="c", expect="fails", reason="r")["status"] == \
        "not reproduced"
    with pytest.raises(claims.ClaimError, match="holds now"):
        claims.check("99.d", 0.3, 0.5, op="<", paper="P", claim="d", expect="fails", reason="r")
    assert not claims.check("99.e", 0.7, 0.5, op="<", paper="P", claim="e", expect="recorded", reason="r")["holds"]
    assert claims.check("99.f", 2.0, (1, 3), op="in", paper="P", claim="f")["holds"]
    with pytest.raises(claims.ClaimError):
        claims.check("99.g", float("nan"), 1.0, op="<", paper="P", claim="nan never holds")
    with pytest.raises(ValueError, match="twice"):
        claims.check("99.a", 0.3, 0.5, op="<", paper="P", claim="again")
    with pytest.raises(ValueError, match="reason"):
        claims.check("99.h", 1, 2, op="<", paper="P", claim="h", expect="fails")
    saved = json.loads((ledger / "claims" / "99_test.json").read_text())
    assert [r["id"] for r in saved["claims"]] == ["99.a", "99.b", "99.c", "99.d", "99.e", "99.f", "99.g"]


def test_write_ledger_replaces_the_table_between_its_markers(ledger):
    claims.check("99.a", 0.3, 0.5, op="<", paper="Paper, Eq. 1", claim="small")
    readme = ledger / "README.md"
    readme.write_text(f"# figures\n\nbefore\n{claims.BEGIN}\nold table\n{claims.END}\nafter\n")
    claims.write_ledger(ledger, readme)
    text = readme.read_text()
    assert "old table" not in text and "before" in text and "after" in text
    assert "| `99.a` small | 99 | Paper, Eq. 1 | 0.3 | < 0.5 | holds |" in text
    assert json.loads((ledger / "claims.json").read_text())["claims"][0]["id"] == "99.a"


# ---------------------------------------------------------------------------------------------
# the notebooks
# ---------------------------------------------------------------------------------------------


def code_cells(md: Path) -> list[str]:
    """The code of each MyST code cell, without its options block (``---`` ... ``---``)."""
    cells = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", md.read_text(), flags=re.S)
    return [re.sub(r"\A---\n.*?\n---\n", "", c, count=1, flags=re.S) for c in cells]


def literal_claim_ids(md: Path) -> list[str]:
    """Ids of ``claims.check("ID", ...)`` calls whose id is a string literal."""
    ids = []
    for cell in code_cells(md):
        src = "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("%", "!", ":")))
        for node in ast.walk(ast.parse(src)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "check"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                ids.append(node.args[0].value)
    return ids


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_claims_go_through_the_ledger(md):
    """No bare assert in a notebook; the ledger is started with the notebook's own name."""
    bare = [line.strip() for cell in code_cells(md) for line in cell.splitlines()
            if re.match(r"\s*assert\b", line)]
    assert not bare, f"{md.name}: bare asserts (use ntk_tutorial.claims.check): {bare}"
    text = md.read_text()
    if "claims.check" in text:
        assert re.search(rf"claims\.start\((NOTEBOOK|['\"]{md.stem}['\"])\)", text), md.name
        assert re.search(rf"NOTEBOOK = ['\"]{md.stem}['\"]", text) or f'claims.start("{md.stem}")' in text
    ids = literal_claim_ids(md)
    assert len(ids) == len(set(ids)), f"{md.name}: repeated claim ids"
    assert all(i.startswith(md.stem[:2] + ".") for i in ids), f"{md.name}: ids must start with {md.stem[:2]}."


def test_committed_ledger_agrees_with_the_notebooks_and_the_figure_map():
    """figures/claims.json comes from a full run of the current notebooks: every literal claim id
    of a notebook is in it, every record belongs to a notebook that still makes it, each record's
    status matches its outcome, and figures/README.md shows exactly its table."""
    ledger = json.loads((ROOT / "figures" / "claims.json").read_text())["claims"]
    by_notebook: dict[str, set] = {}
    for r in ledger:
        assert r["mode"] == "full", f"{r['id']}: the committed ledger must come from a full run"
        assert r["holds"] == (r["status"] == "holds") or r["status"] == "recorded", r["id"]
        by_notebook.setdefault(r["notebook"], set()).add(r["id"])
    stems = {md.stem for md in NOTEBOOKS}
    assert set(by_notebook) <= stems, f"records of notebooks that do not exist: {set(by_notebook) - stems}"
    for md in NOTEBOOKS:
        literal = set(literal_claim_ids(md))
        missing = literal - by_notebook.get(md.stem, set())
        assert not missing, f"{md.name}: claims not in figures/claims.json (rerun ntk-tutorial reproduce): {missing}"
        if "claims.check" in md.read_text():
            assert md.stem in by_notebook, f"{md.name} makes claims but the ledger has none of it"
    readme = (ROOT / "figures" / "README.md").read_text()
    assert f"{claims.BEGIN}\n{claims.table(ledger)}\n{claims.END}" in readme
