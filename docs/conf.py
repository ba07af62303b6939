"""Sphinx configuration for imtl-jax.

Builds offline (no intersphinx, no remote theme): ``python -m sphinx -W --keep-going -b html docs
docs/_build/html``. Pages are MyST Markdown; the API reference comes from the docstrings
(autodoc + napoleon, Google style).
"""

from __future__ import annotations

import os
import pkgutil
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's imtl_jax, not an installed copy

import imtl_jax  # noqa: E402
import imtl_jax.methods  # noqa: E402

project = "imtl-jax"
author = "imtl-jax developers"
copyright = "2025, imtl-jax developers"
release = imtl_jax.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# Pages written by colleagues are pulled into other pages with {include}; they are not pages of
# their own (a document outside every toctree is a warning, hence an error under -W).
exclude_patterns = ["_build", "methods_table.md", "performance.md", "README.md"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Included pages may start at any heading level.
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = ["Reference", "References"]

html_theme = "furo"
html_title = f"imtl-jax {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# --------------------------------------------------------------------------------------------
# Optional includes: ```{include} methods_table.md``` (and performance.md) are written by other
# pages' authors and may not exist yet; a missing target becomes a note instead of an error.

_INCLUDE = re.compile(r"^(?P<fence>```+|:::+)\{include\}[ \t]+(?P<path>\S+)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                      re.MULTILINE | re.DOTALL)


def _optional_includes(app, docname, source):
    text = source[0]
    doc_dir = (Path(app.srcdir) / docname).parent

    def replace(match):
        target = (doc_dir / match["path"]).resolve()
        if target.is_file():
            return match.group(0)
        return (":::{note}\nThis section (`" + match["path"] + "`) has not been written yet.\n:::")

    source[0] = _INCLUDE.sub(replace, text)


# --------------------------------------------------------------------------------------------
# The API page lists one ``automodule`` per method family, discovered here so that a new file in
# imtl_jax/methods/ is documented without editing the page.

_METHOD_MODULES_MARKER = "<!-- method-modules -->"


def _method_family_modules() -> list[str]:
    return sorted(f"imtl_jax.methods.{m.name}" for m in pkgutil.iter_modules(imtl_jax.methods.__path__)
                  if not m.name.startswith("_"))


def _expand_method_modules(app, docname, source):
    if _METHOD_MODULES_MARKER not in source[0]:
        return
    blocks = []
    for name in _method_family_modules():
        blocks.append(f"### `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n   :members:\n```\n")
    source[0] = source[0].replace(_METHOD_MODULES_MARKER, "\n".join(blocks))


# --------------------------------------------------------------------------------------------
# Pages that other contributors add to docs/ (e.g. priorities.md) join the user guide's toctree
# automatically, so that a new page never breaks the -W build as "not included in any toctree".

_EXTRA_PAGES_MARKER = "<!-- extra-pages -->"
_TOCTREE_ENTRY = re.compile(r"^([A-Za-z0-9_./-]+)$", re.MULTILINE)


def _extra_pages(index_text: str) -> list[str]:
    listed = set()
    for block in re.findall(r"```\{toctree\}(.*?)```", index_text, re.DOTALL):
        listed.update(m.group(1) for m in _TOCTREE_ENTRY.finditer(block))
    excluded = {Path(x).stem for x in exclude_patterns}
    return sorted(p.stem for p in DOCS.glob("*.md")
                  if p.stem not in listed and p.stem not in excluded and p.stem != root_doc)


def _expand_extra_pages(app, docname, source):
    if docname == root_doc and _EXTRA_PAGES_MARKER in source[0]:
        source[0] = source[0].replace(_EXTRA_PAGES_MARKER, "\n".join(_extra_pages(source[0])))


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields are documented by the class docstring's "Attributes:" section; autodoc
    # would document them again as "Alias for field number N" (a duplicate description).
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("source-read", _optional_includes)
    app.connect("source-read", _expand_method_modules)
    app.connect("source-read", _expand_extra_pages)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    return {"parallel_read_safe": True}
