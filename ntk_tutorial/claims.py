"""The claims ledger: every claim a notebook makes is measured, bounded, recorded, then asserted.

A notebook starts its ledger once and checks each claim with :func:`check` instead of a bare
``assert``::

    from ntk_tutorial import claims
    claims.start("03_lookahead_and_infinite_width")
    claims.check("03.width-slope", slope, -0.5, op="<=",
                 paper="Mohamadi, Bae & Sutherland 2022, Thm. 3.1",
                 claim="the proxy's relative error falls at least as fast as width^-1/2")

Each check records the claim's id, where it comes from, a one-line statement, the measured value,
the bound and its direction, the mode (fast or full) and whether it holds, in
``<figures>/claims/<notebook>.json``; ``ntk-tutorial reproduce`` gathers them into
``claims.json`` and the table of ``figures/README.md``.  Then it asserts, according to
``expect``:

* ``"holds"`` (default): the claim must hold; the cell fails when it does not.
* ``"fails"``: a claim of a paper that this notebook finds does *not* hold here (status
  ``"not reproduced"``, with ``reason``).  The cell fails if it starts to hold, so the prose
  that reports it is corrected.
* ``"recorded"``: measured and recorded but not asserted in this mode, with ``reason`` (e.g.
  fast mode's two seeds cannot support a claim about six).

Bounds: ``op`` is one of ``<=, <, >=, >, in`` (``in``: ``bound = (low, high)``, inclusive).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .config import is_fast

OPS = ("<=", "<", ">=", ">", "in")
EXPECT = ("holds", "fails", "recorded")
STATUS = {"holds": "holds", "fails": "not reproduced", "recorded": "recorded"}
CLAIMS_ENV = "NTK_TUTORIAL_CLAIMS"

_state: dict[str, Any] = {"notebook": None, "records": []}


class ClaimError(AssertionError):
    """A claim did not come out as its notebook says."""


def _folder() -> Path:
    env = os.environ.get(CLAIMS_ENV)
    if env:
        return Path(env)
    from .plotting import figures_dir

    return figures_dir() / "claims"


def start(notebook: str) -> None:
    """Begin (or restart) the ledger of ``notebook``: earlier records of it are dropped."""
    _state["notebook"] = str(notebook)
    _state["records"] = []
    _write()


def _write() -> None:
    if _state["notebook"] is None:
        return
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_state['notebook']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"notebook": _state["notebook"], "claims": _state["records"]}, indent=1) + "\n")
    os.replace(tmp, path)


def _holds(value: float, bound: Any, op: str) -> bool:
    if op == "in":
        low, high = bound
        return bool(low <= value <= high)
    return bool({"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[op])


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"a claim's value must be a number, got {x!r}") from None


def check(id: str, value: Any, bound: Any, *, op: str, paper: str, claim: str, expect: str = "holds",
          reason: str | None = None, unit: str = "") -> dict:
    """Record a claim and assert it (see the module docstring).  Returns the record.

    Args:
      id: unique in the notebook, ``"NN.short-name"``.
      value: the measured number.
      bound: the number the prose states (a ``(low, high)`` pair for ``op="in"``).
      op: ``"<="``, ``"<"``, ``">="``, ``">"`` or ``"in"``: the claim is ``value op bound``.
      paper: where the claim comes from (paper and equation / figure), or ``"this notebook"``.
      claim: one line saying what is claimed, in words.
      expect: ``"holds"``, ``"fails"`` (not reproduced here) or ``"recorded"`` (not asserted).
      reason: why a claim fails or is not asserted (required for those).
      unit: printed after the value.
    """
    if _state["notebook"] is None:
        raise RuntimeError("call claims.start(NOTEBOOK) once before the first claims.check")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if expect not in EXPECT:
        raise ValueError(f"expect must be one of {EXPECT}, got {expect!r}")
    if expect != "holds" and not reason:
        raise ValueError(f"claim {id}: expect={expect!r} needs a reason")
    if any(r["id"] == id for r in _state["records"]):
        raise ValueError(f"claim id {id!r} is used twice in {_state['notebook']}")
    value = _number(value)
    bound = tuple(_number(b) for b in bound) if op == "in" else _number(bound)
    holds = (not math.isnan(value)) and _holds(value, bound, op)
    record = {"id": id, "notebook": _state["notebook"], "paper": paper, "claim": claim, "value": value,
              "op": op, "bound": list(bound) if op == "in" else bound, "unit": unit,
              "mode": "fast" if is_fast() else "full", "holds": holds, "expect": expect,
              "status": STATUS[expect], "reason": reason}
    _state["records"].append(record)
    _write()
    shown = f"[{bound[0]:.4g}, {bound[1]:.4g}]" if op == "in" else f"{bound:.4g}"
    print(f"claim {id}: {value:.4g}{unit} {op} {shown}: {'holds' if holds else 'does not hold'}"
          + ("" if expect == "holds" else f" ({STATUS[expect]}: {reason})"))
    if expect == "holds" and not holds:
        raise ClaimError(f"claim {id} ({claim}) does not hold: measured {value:.6g}{unit}, "
                         f"bound {op} {shown}")
    if expect == "fails" and holds:
        raise ClaimError(f"claim {id} ({claim}) is reported as not reproduced, but it holds now: "
                         f"measured {value:.6g}{unit} {op} {shown}; update the notebook's text")
    return record


def collect(folder: str | os.PathLike, notebooks: list[str] | None = None) -> list[dict]:
    """Every record of ``folder/claims/*.json`` (optionally only those notebooks), in order."""
    out = []
    for path in sorted(Path(folder, "claims").glob("*.json")):
        data = json.loads(path.read_text())
        if notebooks is None or data["notebook"] in notebooks:
            out.extend(data["claims"])
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def table(records: list[dict]) -> str:
    """The Markdown table of ``figures/README.md``: claim, paper, measured, bound, status."""
    lines = ["| claim | notebook | paper | measured | bound | status |", "|---|---|---|---|---|---|"]
    for r in records:
        bound = (f"in [{_fmt(r['bound'][0])}, {_fmt(r['bound'][1])}]" if r["op"] == "in"
                 else f"{r['op']} {_fmt(r['bound'])}")
        status = {"holds": "holds" if r["holds"] else "FAILS",
                  "not reproduced": "not reproduced" + (f": {r['reason']}" if r.get("reason") else ""),
                  "recorded": "recorded, not asserted" + (f": {r['reason']}" if r.get("reason") else "")}[r["status"]]
        lines.append(f"| `{r['id']}` {r['claim']} | {r['notebook'][:2]} | {r['paper']} | "
                     f"{_fmt(r['value'])}{r.get('unit', '')} | {bound} | {status} |")
    return "\n".join(lines)


BEGIN, END = "<!-- claims table: generated by ntk-tutorial reproduce -->", "<!-- end of claims table -->"


def write_ledger(figures: str | os.PathLike, readme: str | os.PathLike | None = None) -> Path:
    """Gather ``figures/claims/*.json`` into ``figures/claims.json`` and, when ``readme`` is
    given, replace the table between the markers of that file (added at its end if missing)."""
    figures = Path(figures)
    records = collect(figures)
    path = figures / "claims.json"
    path.write_text(json.dumps({"claims": records}, indent=1) + "\n")
    if readme is not None:
        readme = Path(readme)
        text = readme.read_text() if readme.exists() else ""
        block = f"{BEGIN}\n{table(records)}\n{END}"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Claims\n\n" + block + "\n"
        readme.write_text(text)
    return path
