"""Sphinx configuration of the scdca docs (MyST Markdown pages, API reference from docstrings).

The models page is generated here from the model registry, so it lists exactly what
`scdca benchmark --models` accepts.
"""

import inspect
from pathlib import Path

project = "scdca"
author = "the scdca developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "scdca"
exclude_patterns = ["_build", "generated", "archive"]  # generated pages are included, not built alone
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures show them; the docstrings say what they mean
napoleon_google_docstring = True
suppress_warnings = ["myst.xref_missing"]

HERE = Path(__file__).parent


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def write_models_page() -> None:
    """docs/generated/models.md: one row per registered model, from the registry itself."""
    from scdca.models import MODELS

    rows = ["| model | class | what it is | options it takes |", "| --- | --- | --- | --- |"]
    for name in MODELS.names():
        cls = MODELS.get(name)
        about = _first_paragraph(cls).replace("|", "/")
        options = ", ".join(f"`{o}`" for o in cls.options) or "none (closed form)"
        saved = " Savable (`scdca train`)." if cls.savable else ""
        rows.append(f"| `{name}` | `{cls.__module__}.{cls.__qualname__}` | {about}{saved} | {options} |")
    out = HERE / "generated" / "models.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(rows) + "\n")


write_models_page()
