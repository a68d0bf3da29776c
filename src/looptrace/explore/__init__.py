"""The explorer: browse step-resolved attributions in one self-contained HTML file.

``explorer_data`` turns SDI arrays (and optional per-position values and token ids) into a bounded,
JSON-able dict; ``write_explorer`` writes it as a page that opens from disk with no network. The command
``looptrace explore --store STORE --out explorer.html`` does both from a feature store.
"""

from looptrace.explore.data import explorer_data
from looptrace.explore.page import render_explorer, write_explorer

__all__ = ["explorer_data", "render_explorer", "write_explorer"]
