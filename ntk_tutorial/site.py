"""The HTML book: the executed notebooks, the notation page, the figure map and the claims.

``ntk-tutorial site`` (:func:`build`) assembles a Sphinx project in ``build/site-src/`` from

* ``docs/`` (``conf.py``: Sphinx + myst-nb + sphinx-book-theme; ``index.md``: the landing page),
* the *executed* notebooks (``build/executed/*.ipynb`` from ``ntk-tutorial reproduce``, or the
  copies the tests save with ``NTK_TUTORIAL_SAVE_EXECUTED``), checked first: every code cell
  ran, none failed, and each copy matches its notebook's current source,
* ``notebooks/notation.md`` and ``figures/README.md`` (the figure map and the claims table) with
  the committed figures,
* MathJax, copied from the ``sphinx-mathjax-offline`` package into the site, so that pages
  render their math without a network;

then runs Sphinx with warnings as errors (a broken cross-reference fails the build) and checks
the HTML it wrote: every local link, image and script exists (anchors included), and nothing
is loaded from another host. myst-nb renders the stored outputs and never executes anything.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .nbrun import METADATA_KEY

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
SETUP_CELL_START = "# Set-up, the same first cell in every notebook"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ('<p class="ntk-widget-note"><em>An interactive explorer: open this notebook in Jupyter '
               'or Colab to use it. The static figure above shows the same plot.</em></p>')
# the MathJax 3 parts a page needs: the TeX-to-CommonHTML component, its fonts, the TeX
# extensions it loads on demand, and the menu's accessibility parts
MATHJAX_PARTS = ("tex-chtml.js", "output/chtml", "input/tex", "a11y", "ui", "adaptors", "sre")
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3", "file_extension": ".py",
                 "mimetype": "text/x-python", "codemirror_mode": {"name": "ipython", "version": 3}}
TOOLS = {"sphinx": "sphinx", "myst_nb": "myst-nb", "sphinx_book_theme": "sphinx-book-theme"}


class SiteError(RuntimeError):
    """The site cannot be built: the message says what is wrong and what to do."""


def missing_tools() -> list[str]:
    """The distributions the site needs that are not installed (``pip install -e ".[docs]"``)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, distribution

    missing = [dist for module, dist in TOOLS.items() if importlib.util.find_spec(module) is None]
    try:
        distribution("sphinx-mathjax-offline")
    except PackageNotFoundError:
        missing.append("sphinx-mathjax-offline")
    return missing


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise SiteError(f"the site needs {', '.join(missing)}, which are not installed; install the docs "
                        "extra: pip install -e \".[docs]\"")


def mathjax_dir() -> Path:
    """MathJax 3 as shipped by the ``sphinx-mathjax-offline`` package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("sphinx-mathjax-offline").locate_file("sphinx-mathjax-offline/static/mathjax"))
    except PackageNotFoundError:
        path = None
    if path is None or not (path / "tex-chtml.js").is_file():
        raise SiteError("MathJax not found (it ships with sphinx-mathjax-offline); install the docs extra: "
                        "pip install -e \".[docs]\"")
    return path


# --- the executed notebooks -------------------------------------------------------------------


def _code_sources(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


def _pair_agrees(ipynb: Path, md: Path) -> bool:
    """Whether the jupytext pair holds the same cells (the .md is the source that is edited and
    reviewed; the .ipynb is what runs): the book must show what the sources say."""
    import jupytext

    def cells(path):
        return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]

    return cells(ipynb) == cells(md)


def check_executed(notebooks: list[Path], executed_dir: Path) -> str:
    """Check the executed copy of every notebook in ``executed_dir``; returns the mode they ran
    in (``fast`` or ``full``) or raises :class:`SiteError` listing every problem.

    A copy is accepted when every non-empty code cell has run (an execution count), no output
    is an error, and its code cells are the current notebook's (a stale copy is refused); a
    notebook whose MyST twin (``NN_topic.md``) says something else is refused too."""
    import nbformat

    problems, modes = [], set()
    for src in notebooks:
        copy = executed_dir / src.name
        if not copy.is_file():
            problems.append(f"{src.stem}: no executed copy in {executed_dir}")
            continue
        try:
            nb = nbformat.read(copy, as_version=4)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            problems.append(f"{src.stem}: {copy} is not a readable notebook ({type(err).__name__})")
            continue
        modes.add(nb.metadata.get(METADATA_KEY, {}).get("mode", "unknown"))
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            head = (cell.source.strip().splitlines() or [""])[0][:50]
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors:
                problems.append(f"{src.stem}: cell {i} ({head!r}) failed: {errors[0].get('ename')}: "
                                f"{str(errors[0].get('evalue', ''))[:120]}")
                break
            if cell.source.strip() and cell.get("execution_count") is None:
                problems.append(f"{src.stem}: cell {i} ({head!r}) did not run")
                break
        if _code_sources(nb) != _code_sources(nbformat.read(src, as_version=4)):
            problems.append(f"{src.stem}: the executed copy is older than the notebook (its code differs)")
        twin = src.with_suffix(".md")
        if twin.is_file() and not _pair_agrees(src, twin):
            problems.append(f"{src.stem}: {twin.name} and {src.name} differ (an edit not synced); run "
                            f"jupytext --sync {twin}, then execute again")
    if problems:
        raise SiteError("the executed notebooks cannot be published: " + "; ".join(problems)
                        + ". Run `ntk-tutorial site` (it executes them) or `ntk-tutorial reproduce` first")
    if len(modes) > 1:
        raise SiteError(f"the executed notebooks in {executed_dir} mix modes ({', '.join(sorted(modes))}); "
                        "execute them all in one mode: ntk-tutorial site [--fast]")
    return modes.pop() if modes else "unknown"


def _for_the_page(nb) -> None:
    """Outputs a static page can show: an explorer widget becomes a note, a progress-bar widget
    disappears, and no widget state is kept (it would load the widget JavaScript from a CDN).
    The set-up cell's code (installing the package) is folded; its output stays visible."""
    import nbformat

    nb.metadata.pop("widgets", None)
    # the copies the tests save come from the output-free .ipynb, which has no language_info:
    # myst-nb needs its lexer to highlight the code cells
    if not nb.metadata.get("language_info", {}).get("pygments_lexer"):
        nb.metadata["language_info"] = {**nb.metadata.get("language_info", {}), **LANGUAGE_INFO}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = cell.metadata.setdefault("tags", [])
        if cell.source.startswith(SETUP_CELL_START):  # the install logic: folded, as in a lesson's header
            if "hide-input" not in tags and "hide-cell" not in tags:
                tags.append("hide-input")
            cell.metadata["mystnb"] = {"code_prompt_show": "Show the set-up cell",
                                       "code_prompt_hide": "Hide the set-up cell"}
        elif "solution" in tags:  # folded by its hide-cell tag: say what opening it shows
            cell.metadata["mystnb"] = {"code_prompt_show": "Solution (click to open)",
                                       "code_prompt_hide": "Hide the solution"}
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data:
                if str(data.get("text/plain", "")).startswith("interactive"):
                    kept.append(nbformat.v4.new_output(
                        "display_data", data={"text/html": WIDGET_NOTE, "text/plain": "(interactive explorer)"}))
                continue
            kept.append(out)
        cell["outputs"] = kept


# --- assembling the Sphinx project ------------------------------------------------------------


_FIGURE_ROW = re.compile(r"^\| `([0-9][0-9]_[A-Za-z0-9_]+)\.png` \| ([^|]*)\|", re.MULTILINE)


def _figure_label(stem: str) -> str:
    return "fig-" + stem.replace("_", "-").lower()


_NOTEBOOK_CELL = re.compile(r"\| `([0-9][0-9]_[A-Za-z0-9_]+)` (?=\|)")


def _figure_page(readme: str, figures: Path, notebooks: set[str] = frozenset()) -> str:
    """The page of the figure map and the claims table, from ``figures/README.md``.

    Each figure named in the map that exists is linked to its picture in a gallery at the end
    of the page (shown with the map's caption); when the README carries no generated claims
    table (it is written by a full ``ntk-tutorial reproduce``), the table is made here from the
    committed ``figures/claims/*.json``."""
    from . import claims

    shown: list[tuple[str, str]] = []

    def link(m: re.Match) -> str:
        stem, caption = m.group(1), m.group(2).strip()
        if not (figures / f"{stem}.png").is_file():
            return m.group(0)
        shown.append((stem, caption))
        return f"| [`{stem}.png`](#{_figure_label(stem)}) | {m.group(2)}|"

    text = _FIGURE_ROW.sub(link, readme)
    # a lesson named in the map links to its page
    text = _NOTEBOOK_CELL.sub(lambda m: f"| [`{m.group(1)}`](../notebooks/{m.group(1)}.ipynb) "
                              if m.group(1) in notebooks else m.group(0), text)
    if claims.BEGIN not in text:
        records = claims.collect(figures)
        if records:
            # a "|" in a claim's text (a norm, ||x||) would end its table cell
            table = claims.table([{k: v.replace("|", "\\|") if isinstance(v, str) and k != "status" else v
                                   for k, v in r.items()} for r in records])
            if re.search(r"^## Claims[ \t]*$", text, re.MULTILINE):
                head, rest = re.split(r"^## Claims[ \t]*$", text, maxsplit=1, flags=re.MULTILINE)
                # the section's own paragraph, then the table, then whatever follows
                parts = re.split(r"^(?=## )", rest, maxsplit=1, flags=re.MULTILINE)
                text = (head + "## Claims\n\n" + parts[0].strip() + "\n\n" + table + "\n\n"
                        + (parts[1] if len(parts) > 1 else ""))
            else:
                text = text.rstrip() + "\n\n## Claims\n\n" + table + "\n"
    if shown:
        gallery = ["", "## The figures", "",
                   "The committed figures, in the order of the map above (full mode).", ""]
        for stem, caption in shown:
            gallery += [f":::{{figure}} {stem}.png", f":name: {_figure_label(stem)}", ":width: 100%", "",
                        f"`{stem}.png`: {caption}", ":::", ""]
        text = text.rstrip() + "\n" + "\n".join(gallery)
    return text


def assemble(repo: Path, executed_dir: Path, src: Path, *, mode: str) -> Path:
    """Write the Sphinx project into ``src`` (emptied first) and return it."""
    import nbformat

    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(repo / "docs", src, ignore=shutil.ignore_patterns("_build", "__pycache__"))
    (src / "notebooks").mkdir()
    for nb_path in sorted((repo / "notebooks").glob(NOTEBOOK_GLOB)):
        nb = nbformat.read(executed_dir / nb_path.name, as_version=4)
        _for_the_page(nb)
        nbformat.write(nb, src / "notebooks" / nb_path.name)
    shutil.copy2(repo / "notebooks" / "notation.md", src / "notebooks" / "notation.md")
    figures = repo / "figures"
    (src / "figures").mkdir()
    for png in figures.glob("*.png"):
        shutil.copy2(png, src / "figures" / png.name)
    lessons = {p.stem for p in (src / "notebooks").glob(NOTEBOOK_GLOB)}
    (src / "figures" / "README.md").write_text(_figure_page((figures / "README.md").read_text(), figures, lessons))
    static = src / "_static" / "mathjax"
    origin = mathjax_dir()
    for part in MATHJAX_PARTS:
        if (origin / part).is_dir():
            shutil.copytree(origin / part, static / part)
        elif (origin / part).is_file():
            static.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin / part, static / part)
    (src / "_build_info.json").write_text(json.dumps({"mode": mode}) + "\n")
    return src


def sphinx_build(src: Path, out: Path, *, quiet: bool = True) -> None:
    """``sphinx-build -b html -W --keep-going`` in a child process; :class:`SiteError` with the
    warnings on failure."""
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-j", "1",
           "-d", str(src.parent / (src.name + "-doctrees")), str(src), str(out)]
    if quiet:
        cmd.insert(3, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        warnings = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln] or lines[-10:]
        raise SiteError("Sphinx failed (warnings are errors here: a broken link or cross-reference fails the "
                        "build): " + " | ".join(w.strip() for w in warnings[:20]))


# --- checking the HTML --------------------------------------------------------------------------


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("id", "name"):
            if attrs.get(name):
                self.ids.add(attrs[name])
        for attr in ("href", "src"):
            if attrs.get(attr):
                self.links.append((tag, attr, attrs[attr]))


def check_site(out: Path) -> list[str]:
    """Problems in the built site: local links, images or scripts that do not exist, anchors
    that no element carries, and resources (scripts, styles, images, fonts) loaded from another
    host, which would break the page offline. Links (``<a href>``) to other sites are allowed."""
    pages = {p.resolve(): None for p in out.rglob("*.html") if "_static" not in p.relative_to(out).parts}
    parsed: dict[Path, _Refs] = {}

    def refs(path: Path) -> _Refs:
        if path not in parsed:
            r = _Refs()
            r.feed(path.read_text(errors="replace"))
            parsed[path] = r
        return parsed[path]

    problems = []
    for page in pages:
        for tag, attr, value in refs(page).links:
            parts = urlsplit(value)
            if parts.scheme in ("mailto", "data", "javascript"):
                continue
            if parts.scheme or value.startswith("//"):
                if tag != "a":
                    problems.append(f"{page.relative_to(out.resolve())}: <{tag} {attr}={value!r}> loads from another host")
                continue
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{page.relative_to(out.resolve())}: broken link {value!r}")
                continue
            if parts.fragment and target.suffix == ".html" and tag == "a":
                if unquote(parts.fragment) not in refs(target).ids:
                    problems.append(f"{page.relative_to(out.resolve())}: no anchor #{parts.fragment} in "
                                    f"{target.relative_to(out.resolve())}")
    for css in out.rglob("*.css"):
        if re.search(r"url\(\s*['\"]?(https?:)?//", css.read_text(errors="replace")):
            problems.append(f"{css.relative_to(out)}: loads a font or image from another host")
    return problems


def build(repo: Path, executed_dir: Path, out: Path, *, quiet: bool = True) -> Path:
    """Check the executed notebooks, assemble, run Sphinx, check the HTML; returns ``index.html``."""
    require_tools()
    notebooks = sorted((repo / "notebooks").glob(NOTEBOOK_GLOB))
    if not notebooks:
        raise SiteError(f"no notebooks in {repo / 'notebooks'}")
    mode = check_executed(notebooks, executed_dir)
    src = assemble(repo, executed_dir, out.parent / (out.name + "-src"), mode=mode)
    if out.exists():
        shutil.rmtree(out)
    sphinx_build(src, out, quiet=quiet)
    problems = check_site(out)
    if problems:
        raise SiteError(f"the built site has {len(problems)} problem(s): " + "; ".join(problems[:20]))
    return out / "index.html"
