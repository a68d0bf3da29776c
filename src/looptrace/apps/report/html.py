"""A self-contained HTML report: figures embedded as base64 PNG, numbers as tables, provenance."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from looptrace.io import atomic_write_bytes, atomic_write_json


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(
    out: str | os.PathLike[str],
    title: str,
    sections: list[dict[str, Any]],
    provenance: dict[str, Any],
) -> Path:
    """Write ``out/report.html``.

    ``sections``: dicts with ``heading``, optional ``text`` (paragraphs), ``figure`` (a PNG path) with
    ``caption`` and ``source`` (the JSON key or file the figure was drawn from), and ``table`` (rows).
    """
    out = Path(out)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "figcaption{font-size:14px;color:#444}.src{font-size:12px;color:#777}pre{background:#f7f7f7;padding:8px;overflow:auto}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['heading'])}</h2>")
        for para in sec.get("text", []):
            parts.append(f"<p>{html.escape(para)}</p>")
        if sec.get("figure"):
            data = base64.b64encode(Path(sec["figure"]).read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{html.escape(sec.get('caption', ''))}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(sec.get('caption', ''))}</figcaption>"
                f"<div class='src'>source data: {html.escape(str(sec.get('source', '')))}</div></figure>"
            )
        if sec.get("table"):
            parts.append(_table(sec["table"]))
    parts.append(
        "<h2>Provenance</h2><pre>"
        + html.escape(json.dumps(provenance, indent=2, sort_keys=True, default=str))
        + "</pre>"
    )
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def write_study(
    out: str | os.PathLike[str],
    title: str,
    results: dict[str, Any],
    sections: list[dict[str, Any]],
    provenance: dict[str, Any],
) -> Path:
    """A study's outputs: ``results.json`` (every number the figures and tables show) and the report."""
    atomic_write_json(results, Path(out) / "results.json")
    return write_report(out, title, sections, provenance)
