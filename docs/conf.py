"""Sphinx configuration of the ntk-tutorial book (built by `ntk-tutorial site`, never by hand).

`ntk-tutorial site` copies this folder into build/site-src/ beside the executed notebooks, the
notation page, the figure map and MathJax, then runs Sphinx with warnings as errors. myst-nb
renders the outputs stored in the executed notebooks; it executes nothing.
"""

import json
from pathlib import Path

import ntk_tutorial

_info_file = Path(__file__).with_name("_build_info.json")
_info = json.loads(_info_file.read_text()) if _info_file.exists() else {"mode": "unknown"}

project = "ntk-tutorial"
author = "the ntk-tutorial authors"
copyright = "the ntk-tutorial authors; code MIT, text and figures CC BY 4.0"
release = version = ntk_tutorial.__version__

extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_build_info.json"]
root_doc = "index"

# MyST: $...$ and $$...$$ math, ```{directive}``` and ::: fences, {{ substitutions }},
# heading anchors so that links like figures/README.md#claims resolve (and are checked)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "substitution"]
myst_heading_anchors = 3
myst_substitutions = {"mode": _info["mode"]}

# notebooks: render what the executed copies hold, never run them here
nb_execution_mode = "off"
nb_merge_streams = True
nb_ipywidgets_js = {}  # no widget JavaScript from a CDN: explorers are replaced by a note

# MathJax from this site's own _static/mathjax/ (copied there by `ntk-tutorial site`): offline
mathjax_path = "mathjax/tex-chtml.js"

html_theme = "sphinx_book_theme"
html_title = "ntk-tutorial: empirical neural tangent kernels"
html_static_path = ["_static"]
html_css_files = ["ntk.css"]
html_last_updated_fmt = None
html_show_sourcelink = False
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": True,
    "show_navbar_depth": 1,
}
