"""The notebooks' exercises (CONTRIBUTING.md, "Exercises") and ntk_tutorial.exercises.

Structure, from each notebooks/NN_*.md: three to five ``### Exercise NN.i: title`` headings,
numbered 1..n with NN the notebook's number; after each heading, before the next heading, at
least one code cell tagged ``solution`` (and ``hide-cell``, hidden in Jupyter) that calls
``exercises.check_close`` or ``exercises.check_that``; solution Markdown (``<details>`` blocks) is
tagged ``solution``; no solution calls ``claims.check`` (exercises are not claims) or uses a bare
``assert``. That the solutions run and their checks pass is the notebooks' own test: ``pytest``
runs every notebook under nbval, solution cells included.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import numpy as np
import pytest

from ntk_tutorial import exercises
from ntk_tutorial.exercises import ExerciseMismatch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
EXERCISE = re.compile(r"^### Exercise (\d\d)\.(\d+): \S", re.MULTILINE)
HEADING = re.compile(r"^#{1,6} ", re.MULTILINE)
# Notebooks whose exercises are not written yet: number -> reason, e.g.
# {"04": "notebook 04's exercises are not written yet"}. The mark is strict: the structure tests
# of such a notebook fail as soon as its exercises are there, and then its entry must go.
NOT_WRITTEN: dict[str, str] = {}


def _tags(cell):
    return cell.metadata.get("tags", [])


def _is_solution(cell):
    return "solution" in _tags(cell)


def _calls(source, module, names):
    """Whether the code calls ``module.name(...)`` for one of ``names`` (comments do not count)."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            return True
    return False


def exercise_segments(md):
    """[(NN, i, [cells from the exercise's heading to the next heading])] in the order of the text.

    A Markdown cell may hold text before the heading and a later heading; the segment is cut at
    headings, wherever they are."""
    segments, current = [], None
    for cell in jupytext.read(md).cells:
        if cell.cell_type != "markdown" or _is_solution(cell):
            if current is not None:
                current[2].append(cell)
            continue
        for line in cell.source.splitlines():
            if HEADING.match(line):
                m = EXERCISE.match(line)
                current = (m.group(1), int(m.group(2)), []) if m else None
                if current is not None:
                    segments.append(current)
    return segments


def _structure_param(md):
    reason = NOT_WRITTEN.get(md.name[:2])
    return pytest.param(md, id=md.stem, marks=pytest.mark.xfail(strict=True, reason=reason) if reason else ())


def test_the_parser_sees_headings_and_solutions():
    segments = exercise_segments(ROOT / "notebooks" / "03_lookahead_and_infinite_width.md")
    assert [(nn, i) for nn, i, _ in segments] == [("03", 1), ("03", 2), ("03", 3)]
    assert all(any(c.cell_type == "code" and _is_solution(c) for c in cells) for _, _, cells in segments)


@pytest.mark.parametrize("md", [_structure_param(md) for md in SOURCES])
def test_three_to_five_exercises_numbered_in_order(md):
    segments = exercise_segments(md)
    numbers = [(nn, i) for nn, i, _ in segments]
    assert 3 <= len(segments) <= 5, f"{md.name} has {len(segments)} '### Exercise NN.i: title' headings, not 3 to 5"
    assert numbers == [(md.name[:2], i) for i in range(1, len(segments) + 1)], (
        f"{md.name}: exercises must be numbered {md.name[:2]}.1, {md.name[:2]}.2, ... without gaps, got {numbers}")


@pytest.mark.parametrize("md", [_structure_param(md) for md in SOURCES])
def test_every_exercise_has_a_checked_solution(md):
    segments = exercise_segments(md)
    assert segments, f"{md.name} has no exercise"
    for nn, i, cells in segments:
        solutions = [c for c in cells if c.cell_type == "code" and _is_solution(c)]
        assert solutions, f"Exercise {nn}.{i} of {md.name}: no code cell tagged 'solution' before the next heading"
        assert any(_calls(c.source, "exercises", {"check_close", "check_that"}) for c in solutions), (
            f"Exercise {nn}.{i} of {md.name}: no solution cell calls exercises.check_close or exercises.check_that")
        for cell in solutions:
            assert cell.source.startswith(f"# @title Solution of Exercise {nn}.{i}"), (
                f"Exercise {nn}.{i} of {md.name}: a solution cell starts with '# @title Solution of Exercise "
                f"{nn}.{i} ...', not {cell.source.splitlines()[0]!r}")


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_solutions_are_tagged_hidden_and_not_claims(md):
    cells = jupytext.read(md).cells
    for cell in cells:
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        if cell.cell_type == "markdown":
            if "<details" in cell.source:
                assert _is_solution(cell), f"{md.name}: a <details> block is not tagged 'solution': {first!r}"
            if _is_solution(cell):
                assert '<details class="ntk-solution">' in cell.source, (
                    f"{md.name}: solution Markdown must sit in a <details class=\"ntk-solution\"> block: {first!r}")
            continue
        if first.startswith("# @title Solution of Exercise"):
            assert _is_solution(cell), f"{md.name}: {first!r} is not tagged 'solution'"
        if not _is_solution(cell):
            continue
        assert "hide-cell" in _tags(cell), f"{md.name}: solution cell {first!r} lacks the 'hide-cell' tag"
        hidden = cell.metadata.get("jupyter", {})
        assert hidden.get("source_hidden") is True and hidden.get("outputs_hidden") is True, (
            f"{md.name}: solution cell {first!r} needs jupyter: {{source_hidden: true, outputs_hidden: true}}")
        assert "claims.check" not in cell.source and not _calls(cell.source, "claims", {"check"}), (
            f"{md.name}: solution cell {first!r} calls claims.check; exercises are not claims")
        assert not any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(cell.source))), (
            f"{md.name}: solution cell {first!r} uses a bare assert; use exercises.check_close / check_that")


def test_not_written_names_existing_notebooks():
    assert SOURCES
    for nn in NOT_WRITTEN:
        assert any(md.name.startswith(nn + "_") for md in SOURCES), f"NOT_WRITTEN names notebook {nn}, which is gone"


# ---------------------------------------------------------------------------------------------
# ntk_tutorial.exercises
# ---------------------------------------------------------------------------------------------


def test_check_close_passes_within_rtol(capsys):
    rel = exercises.check_close(1.0 + 1e-7, 1.0, rtol=1e-6, what="scalar")
    assert rel == pytest.approx(1e-7, rel=1e-3)
    assert "scalar: right" in capsys.readouterr().out
    want = np.array([[1.0, -2.0], [3.0, 4.0]])
    # the difference is measured against the largest entry of want, not entry by entry
    assert exercises.check_close(want + np.array([[0.0, 0.0], [0.0, 3e-6]]), want, rtol=1e-6) == pytest.approx(7.5e-7)
    assert exercises.check_close([1, 2, 3], np.array([1.0, 2.0, 3.0]), rtol=0) == 0.0  # lists, ints, exact
    assert exercises.check_close(0.0, 0.0) == 0.0  # want = 0: the absolute difference


@pytest.mark.parametrize("got, want, rtol", [
    (1.1, 1.0, 1e-2),  # beyond rtol
    (np.array([1.0, 2.0]), np.array([1.0, 2.001]), 1e-4),
    (1e-3, 0.0, 1e-6),  # want = 0: the absolute difference counts
])
def test_check_close_raises_beyond_rtol(got, want, rtol):
    with pytest.raises(ExerciseMismatch, match=r"my value: relative difference .* is above"):
        exercises.check_close(got, want, rtol=rtol, what="my value")


def test_check_close_raises_on_shape_mismatch():
    with pytest.raises(ExerciseMismatch, match=r"shape \(3,\), expected \(1, 3\)"):
        exercises.check_close(np.ones(3), np.ones((1, 3)), rtol=1.0)


@pytest.mark.parametrize("got, want", [(np.nan, 1.0), (1.0, np.nan), ([1.0, np.inf], [1.0, 2.0]), (np.nan, 0.0)])
def test_check_close_raises_on_nan_and_inf(got, want):
    with pytest.raises(ExerciseMismatch):
        exercises.check_close(got, want, rtol=1e9)


def test_check_that(capsys):
    exercises.check_that(True, "it holds")
    exercises.check_that(np.bool_(True), "numpy booleans too")
    out = capsys.readouterr().out
    assert "as expected: it holds" in out and "as expected: numpy booleans too" in out
    with pytest.raises(ExerciseMismatch, match="not as expected: it fails"):
        exercises.check_that(1 > 2, "it fails")
    assert issubclass(ExerciseMismatch, ValueError)


def test_checks_still_raise_under_python_O():
    code = ("from ntk_tutorial.exercises import check_close, check_that, ExerciseMismatch\n"
            "for call in (lambda: check_close(2.0, 1.0), lambda: check_that(False, 'x')):\n"
            "    try:\n        call()\n    except ExerciseMismatch:\n        pass\n"
            "    else:\n        raise SystemExit('no ExerciseMismatch under -O')\n")
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
