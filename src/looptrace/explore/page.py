"""The explorer as one self-contained HTML file: the data as JSON in a ``<script type="application/json">``
element, the page's own CSS and JavaScript inlined (no network, no CDN, no library; it opens from disk).

What the page embeds is :func:`looptrace.explore.explorer_data`'s dict, made smaller: a row's per-position
values are dropped where its example's steps x positions matrix is embedded (they are a row of it, or its
column sums) and every number keeps 4 significant digits.
"""

from __future__ import annotations

import copy
import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from looptrace.errors import ConfigError
from looptrace.explore.data import FORMAT
from looptrace.io import atomic_write_bytes

__all__ = ["render_explorer", "write_explorer"]

_SIZE = "@@LOOPTRACE_EXPLORER_SIZE@@"


def _asset(name: str) -> str:
    return (resources.files("looptrace.explore") / "assets" / name).read_text(encoding="utf-8")


def _rounded(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v, 6 if k in ("score", "tracin") else digits) for k, v in x.items()}
    return x


def compact(data: dict[str, Any]) -> dict[str, Any]:
    """The dict the page embeds: numbers at 4 significant digits (scores at 6), and rows without their
    per-position values where the example's matrix is embedded (the values are a row of it, or its column
    sums, which the page computes)."""
    out = copy.deepcopy(data)
    for q in out["queries"]:
        for lists in [q["overall"], *q["steps"]]:
            for role in ("proponents", "opponents"):
                for row in lists[role]:
                    if q["examples"][str(row["train"])]["matrix"] is not None or row.get("positions") is None:
                        row.pop("positions", None)
    return _rounded(out)


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def render_explorer(data: dict[str, Any], title: str = "looptrace explorer") -> str:
    """The explorer page for ``data`` (from :func:`~looptrace.explore.explorer_data`) as one HTML string."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError("write_explorer needs the dict returned by looptrace.explore.explorer_data")
    from looptrace import __version__

    payload = json.dumps(compact(data), separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\!--")  # nothing in the JSON can close the script
    b = data["bound"]
    n, m, tau, k = data["n_train"], data["n_query"], data["tau"], data["k"]
    src = data.get("source") or {}
    src_text = " · ".join(f"{key}: {val}" for key, val in src.items() if val not in (None, "", [], {}))
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="looptrace {html.escape(__version__)}">
<title>{html.escape(title)}</title>
<style>
{_asset("explorer.css")}
</style>
</head>
<body>
<header id="lt-header">
<h1>{html.escape(title)}</h1>
<p class="lt-summary">{n:,} training examples · {m:,} queries · τ = {tau} loop steps. SDI(z, z′)<sub>t</sub> =
η ∇ℓ(z) · φ<sub>t</sub>(z′), summed over checkpoints: <span class="pos">positive (blue)</span> means training on z
lowered the loss of the query z′ through loop step t (a proponent), <span class="neg">negative (red)</span> that it
raised it (an opponent). Summed over steps it is TracIn.</p>
</header>
<div id="lt-errors" hidden></div>
<div id="lt-app">
<nav id="lt-sidebar" aria-label="queries">
<input id="lt-search" type="search" placeholder="Search queries: index or text" autocomplete="off">
<div id="lt-query-count"></div>
<ul id="lt-query-list" role="listbox"></ul>
</nav>
<main id="lt-main">
<section id="lt-query-panel"></section>
<footer id="lt-footer">
<p id="lt-bound" data-k="{k}" data-queries="{b["queries_embedded"]}">This file embeds {html.escape(b["note"])}:
{b["numbers"]:,} numbers (cap {b["max_numbers"]:,}), about {_SIZE}. Rankings are over all {n:,} training examples.</p>
<p>{html.escape(src_text)}</p>
<p>Written by looptrace {html.escape(__version__)} (<code>looptrace explore</code> /
<code>looptrace.explore.write_explorer</code>). Keys: ← → change the step, ↑ ↓ the query; the view is in the
address (<code>#query=J&amp;step=T&amp;example=I</code>, step 0 = all steps).</p>
</footer>
</main>
</div>
<script type="application/json" id="lt-data">{payload}</script>
<script>
{_asset("explorer.js")}
</script>
</body>
</html>
"""
    size = len(page.encode())
    return page.replace(_SIZE, _human(size))


def write_explorer(data: dict[str, Any], path: str | os.PathLike[str], title: str = "looptrace explorer") -> Path:
    """Write the explorer for ``data`` as one self-contained HTML file (atomically); returns its path.

    The file needs no network and no server: open it from disk (``file://``). It shows, for each embedded
    query, its signed step profile (read-out step and influence horizon marked), its cancellation ratio,
    its top proponents and opponents overall and at a chosen loop step with the training text as a signed
    token heatmap, and one training example's steps x positions matrix.
    """
    path = Path(path)
    atomic_write_bytes(path, render_explorer(data, title).encode())
    return path
