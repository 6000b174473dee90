"""Rendering a report's sections as Markdown and as one self-contained HTML page (figures inlined)."""

from __future__ import annotations

import html
from pathlib import Path

from scdca import storage

STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:12px}h2{border-bottom:1px solid #ddd}"
    "img{max-width:100%}"
)


def write_markdown(path: Path, title: str, sections) -> None:
    """`# title`, then one `## section` each; multi-line bodies (tables) as code blocks."""
    md = [f"# {title}\n"]
    for name, body, _ in sections:
        md.append(f"## {name}\n\n```\n{body}\n```\n" if "\n" in body else f"## {name}\n\n{body}\n")
    storage.write_text(path, "\n".join(md))


def write_html(path: Path, title: str, sections) -> None:
    """One HTML page: each section's text (tables preformatted) and its figure as an inline PNG."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, body, img in sections:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f"<pre>{html.escape(body)}</pre>" if "\n" in body else f"<p>{html.escape(body)}</p>")
        if img:
            parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{img}'>")
    parts.append("</body></html>")
    storage.write_text(path, "\n".join(parts))
