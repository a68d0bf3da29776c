"""Write-ups whose every number comes from a committed file.

A write-up is a template (``README.template.md``) whose numbers are placeholders::

    {{results.json:lds.methods["TracIn (exact, all checkpoints)"].mean|.3f}}
    {{paper.json:parity.sdi_peak_step}}
    {{/benchmarks/results/latest.json:overhead_ratio|.2f}}x

``FILE:PATH|FORMAT``: ``FILE`` is relative to the template's directory (or to the repository root when it
starts with ``/``), ``PATH`` walks the JSON with ``.key``, ``[index]`` and ``["key with spaces"]``,
``FORMAT`` is a Python format spec (default: ``str``) or ``len``. ``python -m looptrace.apps.writeup DIR ...``
renders each ``DIR/README.template.md`` into ``DIR/README.md`` (``--sections``: the generated sections of
hand-written pages, :data:`SECTIONS`); the tests check that the committed page is
the rendering of its template and that the template writes no number outside a placeholder (except the
references allowed by :data:`ALLOWED`: figure, table, section and appendix numbers, file names, code).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from looptrace.errors import ConfigError
from looptrace.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[3]
PLACEHOLDER = re.compile(r"\{\{([^{}|]+?):([^{}|]+?)(?:\|([^{}]*?))?\}\}")
_STEP = re.compile(r'\.([A-Za-z_][\w-]*)|\[(-?\d+)\]|\["([^"]+)"\]')
#: numbers a template may write literally: references and names, not results
ALLOWED = re.compile(
    r"`[^`]*`"  # inline code (commands, file names, identifiers)
    r"|\]\([^)]*\)"  # link targets
    r"|(?:Fig(?:ure)?s?\.?|Table|Tables|[Ss]ection|[Aa]ppendix|issue|#)\s*[A-Z]?\d+(?:\.\d+)?[A-Za-z]?"
    r"|\b[A-Z]\.\d+\b"  # appendix D.3
    r"|\b\w*[A-Za-z_]\d+\w*\b"  # identifiers with digits (k-means is fine, sha256, fig2, m2048)
    r"|\b\d+(?:st|nd|rd|th)\b"
    r"|\b(?:step|steps|r|t|m|k|tau|seed)\s*=?\s*\d+\b"  # axis labels and method settings: step 3, r = 4, m = 2048
    r"|\b95% (?:CI|interval|confidence)"
    r"|\b\d+-core\b"
    r"|\b[A-Z][A-Za-z]*-\d+\b"  # method names: TRAK-50
)


def _walk(obj: Any, path: str, where: str) -> Any:
    pos = 0
    path = path.strip()
    if not path.startswith((".", "[")):
        path = "." + path
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ConfigError(f"{where}: cannot parse {path[pos:]!r} in the placeholder path {path!r}")
        key, index, quoted = m.groups()
        try:
            obj = obj[int(index)] if index is not None else obj[quoted if quoted is not None else key]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"{where}: {path!r} does not resolve ({type(exc).__name__}: {exc})") from exc
        pos = m.end()
    return obj


def render(template: str, base: Path) -> str:
    """The template with every placeholder replaced by its (formatted) value."""
    cache: dict[Path, Any] = {}

    def value(m: re.Match[str]) -> str:
        file, path, fmt = m.group(1).strip(), m.group(2), (m.group(3) or "").strip()
        src = ROOT / file.lstrip("/") if file.startswith("/") else base / file
        if src not in cache:
            try:
                cache[src] = json.loads(src.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"placeholder {m.group(0)}: cannot read {src} ({exc})") from exc
        v = _walk(cache[src], path, m.group(0))
        if fmt == "len":
            return str(len(v))
        return format(v, fmt) if fmt else str(v)

    return PLACEHOLDER.sub(value, template)


def bare_numbers(template: str) -> list[str]:
    """Numbers the template writes outside placeholders and allowed references (each one a defect)."""
    text = PLACEHOLDER.sub(" ", template)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = ALLOWED.sub(" ", text)
    return re.findall(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*%?", text)


def render_dir(directory: Path) -> Path:
    template = directory / "README.template.md"
    out = directory / "README.md"
    atomic_write_bytes(out, render(template.read_text(), directory).encode())
    return out


README_START = "<!-- results: rendered from docs/results/summary.template.md -->"
README_END = "<!-- results: end -->"


def render_readme() -> Path:
    """Replace the README's results section with the rendering of docs/results/summary.template.md."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ConfigError(f"README.md has no {README_START} ... {README_END} section")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    base = ROOT / "docs" / "results"
    body = render((base / "summary.template.md").read_text(), base).strip("\n")
    atomic_write_bytes(readme, f"{head}{README_START}\n{body}\n{README_END}{tail}".encode())
    return readme


#: Generated sections of hand-written pages: (page, template, marker name), paths relative to the repository.
#: The page holds ``<!-- NAME: rendered from TEMPLATE -->`` ... ``<!-- NAME: end -->``; placeholders in the
#: template are relative to the template's directory.
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("docs/guide/which-estimator.md", "docs/guide/which-estimator.lds.template.md", "lds"),
)


def section_markers(template: str, name: str) -> tuple[str, str]:
    return f"<!-- {name}: rendered from {template} -->", f"<!-- {name}: end -->"


def render_section(page: str, template: str, name: str) -> Path:
    """Replace ``page``'s generated section ``name`` with the rendering of ``template``."""
    target, src = ROOT / page, ROOT / template
    start, end = section_markers(template, name)
    text = target.read_text()
    if start not in text or end not in text:
        raise ConfigError(f"{page} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = render(src.read_text(), src.parent).strip("\n")
    atomic_write_bytes(target, f"{head}{start}\n{body}\n{end}{tail}".encode())
    return target


def main(argv: list[str]) -> None:
    if argv == ["--readme"]:
        print(f"rendered {render_readme()}")
        return
    if argv == ["--sections"]:
        for page, template, name in SECTIONS:
            print(f"rendered {render_section(page, template, name)}")
        return
    for d in argv or [str(p.parent) for p in (ROOT / "docs").rglob("README.template.md")]:
        print(f"rendered {render_dir(Path(d))}")
    if not argv:
        print(f"rendered {render_readme()}")
        for page, template, name in SECTIONS:
            print(f"rendered {render_section(page, template, name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
